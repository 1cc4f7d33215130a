"""`fastkl report DEST`: the HTML page about a finished job, from its manifest (docs/guide/report.md).

`render(manifest)` makes the page; `fastkl.jobs.report` reads DEST's manifest
(through the storage layer) and writes the file.

Why it needs nothing but the manifest. A job's summary (`_fastkl.json`)
already holds, per measure and per group, exact counts, moments, quantiles
and the sketch's counts in log bins (`MeasureSummary.log_bins`, 16 per
factor 2): enough to draw a histogram on a log axis, a box per group and the
tables, for a job of any size, with one small read of DEST (through the same
storage layer as jobs: local paths, `file://`, `s3://`, `memory://`, ...).
The parts are never read.

Why matplotlib to inline SVG. It renders without a server, a browser or a
CDN; the SVG goes into the page as text (fonts as text, not paths, so each
plot is a few tens of KB), and the page opens offline. Plots:

* per measure, a histogram: linear (20 equal bins from min to max, the
  summary's own) for measures whose values stay within a few factors of
  their median; on a log x axis (log bins) for heavy-tailed ones (median in
  the first tenth of the range, or p99 > 10 x p50, as KL usually has), with zeros, +inf
  and the smallest 1% of the values (which may reach 1e-300) counted
  beside it rather than drawn;
* per measure and job with group_by, a box per group: p25-p75 (from the log
  bins, within ~4%), the median, whiskers p10-p90, a dot at p99, a diamond
  at the mean (the largest `PLOTTED_GROUPS` groups; the table lists more).
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
from typing import Any

import numpy as np

from .stats import MeasureSummary, Summary, _fmt, group_label, log_bin_edges

MANIFEST = "_fastkl.json"
PLOTTED_GROUPS = 30      # boxes per group plot (the groups with the most rows)
TABLED_GROUPS = 200      # rows of a group table
MAX_LOG_BARS = 64        # bars of a log-x histogram at most (log bins are merged to stay below)
_ACCENT = "#3b6ea8"


# --------------------------------------------------------------------------
# numbers from a measure's summary


def _runs(runs: list) -> tuple[np.ndarray, np.ndarray]:
    """(bin numbers, counts) of a run-length list [[first, [counts...]], ...], zeros dropped."""
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    b = np.concatenate([np.arange(first, first + len(c), dtype=np.int64) for first, c in runs])
    c = np.concatenate([np.asarray(c, np.int64) for _, c in runs])
    keep = c > 0
    return b[keep], c[keep]


def _bins(m: MeasureSummary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower edges, upper edges, counts) of the log bins, ascending in value, negatives and 0 included."""
    lb = m.log_bins or {}
    los, his, cs = [], [], []
    b, c = _runs(lb.get("neg", []))
    lo, hi = log_bin_edges(b)
    los.append(-hi[::-1]), his.append(-lo[::-1]), cs.append(c[::-1])
    if lb.get("zero"):
        los.append(np.zeros(1)), his.append(np.zeros(1)), cs.append(np.asarray([lb["zero"]], np.int64))
    b, c = _runs(lb.get("pos", []))
    lo, hi = log_bin_edges(b)
    los.append(lo), his.append(hi), cs.append(c)
    return np.concatenate(los), np.concatenate(his), np.concatenate(cs)


def quantile(m: MeasureSummary, q: float) -> float | None:
    """The q-quantile of the finite values from the log bins (the bin's geometric middle, within ~4%)."""
    lo, hi, c = _bins(m)
    n = int(c.sum())
    if n == 0 or m.min is None:
        return None
    i = min(int(np.searchsorted(np.cumsum(c), q * (n - 1), side="right")), c.size - 1)
    a, b = float(lo[i]), float(hi[i])
    mid = 0.0 if a == b == 0 else math.copysign(math.sqrt(a * b), a + b)
    return float(min(max(mid, m.min), m.max))


def heavy_tailed(m: MeasureSummary) -> bool:
    """Draw on a log x axis: non-negative values whose median sits in the first tenth of their
    range (most of a linear histogram would be one or two bars), or whose p99 is over 10 x the median."""
    if m.min is None or m.max is None or m.min < 0 or m.max <= 0:
        return False
    if not m.p50:  # more than half the values are 0: the positive ones on a log axis
        return True
    return m.p50 < m.max / 10 or (m.p99 or 0) > 10 * m.p50


# --------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "svg.fonttype": "none",     # text stays text: small files, crisp in the browser
        "svg.hashsalt": "fastkl",   # the same ids every time: the same report for the same job
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "axes.grid": True,
        "grid.alpha": 0.25,
        "figure.dpi": 96,
    })
    return plt


def _svg(fig, label: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(label)}" class="plot" ', 1)


def histogram_svg(name: str, m: MeasureSummary, log_x: bool) -> tuple[str, list[str]]:
    """The histogram of a measure as SVG, and notes on what it does not show."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 2.5))
    notes = []
    if log_x:
        b, c = _runs((m.log_bins or {}).get("pos", []))
        if b.size:
            # the smallest 1% of the positive values may reach down to 1e-300: the axis starts
            # where they end (at most at 3 decades below the top), and says how many it leaves out
            cum = np.cumsum(c)
            first = int(np.searchsorted(cum, 0.01 * cum[-1], side="right"))
            top_lo, _ = log_bin_edges(b[-1])
            first = min(first, int(np.searchsorted(log_bin_edges(b)[0], float(top_lo) / 1e3)))
            first = min(first, b.size - 1)
            below = int(cum[first - 1]) if first > 0 else 0
            if below:
                notes.append(f"{below:,} values below {_num(float(log_bin_edges(b[first])[0]))}")
            b, c = b[first:], c[first:]
            span = int(b[-1] - b[0] + 1)
            f = next((f for f in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if span / f <= MAX_LOG_BARS), 64)
            g0 = int(b[0] // f)
            counts = np.zeros(int(b[-1] // f) - g0 + 1, np.int64)
            np.add.at(counts, b // f - g0, c)
            ks = np.arange(g0, g0 + counts.size + 1, dtype=np.int64) * f
            edges, _ = log_bin_edges(ks)
            width = np.diff(np.log2(edges))
            height = counts * (width.mean() / width)  # bins of unequal log width: rows per equal width
            ax.stairs(height, edges, fill=True, color=_ACCENT, alpha=0.85)
            ax.set_xscale("log")
        zeros = (m.log_bins or {}).get("zero", 0)
        if zeros:
            notes.append(f"{zeros:,} zeros")
        ax.set_xlabel(f"{name} (log scale)")
        ax.set_ylabel("rows per bin (equal log widths)")
    else:
        if m.histogram:
            edges = [m.histogram[0][0]] + [h for _, h, _ in m.histogram]
            counts = [c for _, _, c in m.histogram]
            if edges[0] == edges[-1]:
                edges = [edges[0] - 0.5, edges[0] + 0.5]
            ax.stairs(counts, edges, fill=True, color=_ACCENT, alpha=0.85)
        ax.set_xlabel(name)
        ax.set_ylabel("rows per bin")
    if m.inf:
        notes.append(f"{m.inf:,} +inf")
    for q, style, ha in (("p50", "-", "right"), ("p99", ":", "left")):
        v = getattr(m, q)
        if v is not None and (not log_x or v > 0):
            ax.axvline(v, color="#222", lw=1, ls=style)
            ax.text(v, 1.01, f" {q} ", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom", ha=ha)
    return _svg(fig, f"histogram of {name}"), notes


def groups_svg(name: str, groups: list[tuple[str, MeasureSummary]], log_x: bool) -> str:
    plt = _plt()
    stats, labels = [], []
    means = []
    for label, m in groups:
        if not m.finite:
            continue
        # summaries written before log bins existed: a box from p50 to p90
        q = {k: quantile(m, v) if m.log_bins else (m.p50 if v < 0.5 else m.p90)
             for k, v in (("p10", 0.1), ("p25", 0.25), ("p75", 0.75))}
        stats.append({"label": label, "med": m.p50, "q1": q["p25"], "q3": q["p75"],
                      "whislo": q["p10"], "whishi": m.p90, "fliers": [m.p99]})
        means.append(m.mean)
        labels.append(label)
    height = 0.9 + 0.32 * max(1, len(stats))
    fig, ax = plt.subplots(figsize=(6.2, height))
    if stats:
        if log_x:  # a box on a log axis needs positive ends: 0 is drawn at the smallest positive value
            floor = min([s[k] for s in stats for k in ("q1", "whislo", "med", "q3", "whishi") if s[k] > 0]
                        + [m.p99 for _, m in groups if m.p99 and m.p99 > 0] or [1e-300])
            for s in stats:
                for k in ("q1", "whislo", "med", "q3", "whishi"):
                    s[k] = max(s[k], floor)
                s["fliers"] = [max(v, floor) for v in s["fliers"]]
        import matplotlib

        across = ({"orientation": "horizontal"} if tuple(map(int, matplotlib.__version__.split(".")[:2])) >= (3, 10)
                  else {"vert": False})  # `vert` is deprecated since 3.10
        ax.bxp(stats[::-1], **across, showfliers=True, widths=0.6, patch_artist=True,
               boxprops={"facecolor": "#dbe6f3", "edgecolor": _ACCENT},
               medianprops={"color": "#222"},
               flierprops={"marker": "o", "markersize": 3, "markerfacecolor": "#a33", "markeredgecolor": "#a33"})
        ys = np.arange(len(stats), 0, -1)
        ax.scatter([max(v, floor) if log_x else v for v in means], ys, marker="D", s=14, color="#e08a1e",
                   zorder=3, label="mean")
        if log_x:
            ax.set_xscale("log")
    ax.set_xlabel(f"{name}{' (log scale)' if log_x else ''}: box p25-p75, line p50, whiskers p10-p90, "
                  "dot p99, diamond mean")
    return _svg(fig, f"{name} per group")


# --------------------------------------------------------------------------
# the page


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: float | None) -> str:
    return "&ndash;" if v is None else _fmt(v)


def _int(v: int | None) -> str:
    return "&ndash;" if v is None else f"{v:,}"


def _table(head: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    if head is None:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        return f'<table class="{cls}"><tbody>{body}</tbody></table>'
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _measure_rows(measures: dict[str, MeasureSummary]) -> list[list[str]]:
    rows = []
    for name, m in measures.items():
        rows.append([f"<b>{_e(name)}</b>", _int(m.valid), _int(m.null), _int(sum(m.invalid.values())),
                     _int(m.inf), _int(m.zeros), _num(m.mean), _num(m.std), _num(m.min), _num(m.p50),
                     _num(m.p90), _num(m.p99), _num(m.p999), _num(m.max)])
    return rows


_MEASURE_HEAD = ["measure", "valid", "null", "invalid", "+inf", "zeros", "mean", "std", "min", "p50", "p90",
                 "p99", "p99.9", "max"]


def _level(summary: Summary, title: str, anchor: str) -> str:
    parts = [f'<h2 id="{anchor}">{_e(title)}</h2>', _table(_MEASURE_HEAD, _measure_rows(summary.measures), "num")]
    if any(m.inf for m in summary.measures.values()):
        parts.append('<p class="note">mean, std, min, quantiles and max are over the finite values; '
                     '+inf counts the rows whose value is +inf.</p>')
    parts.append('<div class="grid">')
    for name, m in summary.measures.items():
        if not m.finite:
            parts.append(f'<figure class="card"><figcaption>{_e(name)}</figcaption>'
                         f'<p class="empty">no finite value to plot ({_int(m.inf)} +inf, {_int(m.null)} null, '
                         f'{_int(sum(m.invalid.values()))} invalid)</p></figure>')
            continue
        log_x = heavy_tailed(m) and m.log_bins is not None  # older summaries: the linear histogram
        kind = "log x: heavy-tailed" if log_x else "linear x"
        svg, notes = histogram_svg(name, m, log_x)
        note = f'<p class="note">not drawn: {_e(", ".join(notes))}</p>' if notes else ""
        parts.append(f'<figure class="card"><figcaption>{_e(name)} <span class="kind">({kind})</span>'
                     f'</figcaption>{svg}{note}</figure>')
    parts.append("</div>")
    return "\n".join(parts)


def _invalid_section(summary: Summary) -> str:
    sc = summary.status_counts
    rows = [[_e(k), _int(v), f"{v / summary.rows:.2%}" if summary.rows else "&ndash;"]
            for k, v in sc.items() if v]
    text = _table(["status", "rows", "share"], rows, "num narrow")
    return f'<h2 id="rows">Rows by status</h2><p class="note">ok and null rows are not invalid; every other ' \
           f'status is a reason a row was invalid (its measures are null).</p>{text}'


def _groups_section(summary: Summary) -> str:
    groups = summary.groups or []
    col = summary.group_by
    parts = [f'<h2 id="groups">By {_e(col)} ({len(groups):,} group{"s" if len(groups) != 1 else ""})</h2>']
    if not groups:
        return parts[0] + "<p>No rows.</p>"
    biggest = sorted(groups, key=lambda kg: -kg[1].rows)[:PLOTTED_GROUPS]
    keep = {id(g) for _, g in biggest}
    plotted = [(k, g) for k, g in groups if id(g) in keep]
    if len(groups) > PLOTTED_GROUPS:
        parts.append(f'<p class="note">Plots show the {PLOTTED_GROUPS} groups with the most rows.</p>')
    parts.append('<div class="grid">')
    for name, whole in summary.measures.items():
        if not whole.finite:
            continue
        ms = [(group_label(k), g.measures[name]) for k, g in plotted if name in g.measures]
        parts.append(f'<figure class="card"><figcaption>{_e(name)} by {_e(col)}</figcaption>'
                     f'{groups_svg(name, ms, heavy_tailed(whole))}</figure>')
    parts.append("</div>")
    head = [_e(col), "measure", "rows", "valid", "null", "invalid", "+inf", "mean", "std", "p50", "p90",
            "p99", "max"]
    rows = []
    for k, g in groups[:TABLED_GROUPS]:
        for i, (n, m) in enumerate(g.measures.items()):
            rows.append([f"<b>{_e(group_label(k))}</b>" if i == 0 else "", _e(n), _int(m.rows), _int(m.valid),
                         _int(m.null), _int(sum(m.invalid.values())), _int(m.inf), _num(m.mean), _num(m.std),
                         _num(m.p50), _num(m.p90), _num(m.p99), _num(m.max)])
    parts.append(f'<div class="scroll">{_table(head, rows, "num groups")}</div>')
    if len(groups) > TABLED_GROUPS:
        parts.append(f'<p class="note">The first {TABLED_GROUPS} of {len(groups):,} groups; all of them are in '
                     f'{MANIFEST} and --summary-json.</p>')
    return "\n".join(parts)


def _job_section(manifest: dict) -> str:
    t = manifest.get("timings") or {}
    rows = manifest.get("rows") or 0
    timing_rows = [[_e(k.removesuffix("_s")), f"{v:.3f} s"] for k, v in t.items() if isinstance(v, (int, float))]
    if t.get("total_s"):
        timing_rows.append(["rows / s", f"{rows / t['total_s']:,.0f}"])
    about = [
        ["fastkl", _e(manifest.get("fastkl_version", "?"))],
        ["job id", _e(manifest.get("job_id", "?"))],
        ["finished", _e(manifest.get("created", "?"))],
        ["source", "<br>".join(_e(s) for s in manifest.get("source", []))],
        ["dest", _e(manifest.get("dest", "?"))],
        ["input files", _int(len(manifest.get("inputs", [])))],
        ["output parts", _int(len(manifest.get("parts", [])))],
        ["rows", _int(rows)],
        ["measures", _e(", ".join(manifest.get("measures", [])))],
        ["columns", _e(json.dumps(manifest.get("columns", {})))],
        ["status column", _e(manifest.get("status"))],
    ]
    opts = manifest.get("options") or {}
    opt_rows = [[_e(k), _e(json.dumps(v))] for k, v in opts.items()]
    return ('<h2 id="job">Job</h2><div class="cols">'
            f'<div><h3>Run</h3>{_table(None, about, "kv")}</div>'
            f'<div><h3>Options</h3>{_table(["option", "value"], opt_rows, "kv")}'
            f'<h3>Timings</h3>{_table(["phase", "time"], timing_rows, "kv")}</div></div>')


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;
background:#f5f6f8}
main{max-width:1320px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;
padding-bottom:3px}h3{font-size:14px;margin:12px 0 4px}
.sub{color:#5a6270;margin:0 0 8px}nav a{margin-right:14px;color:#3b6ea8}
.tiles{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.tile{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 14px;min-width:110px}
.tile b{display:block;font-size:19px}.tile span{color:#5a6270;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #e1e4ea;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600}table.num td{text-align:right}table.num td:first-child{text-align:left}
table.kv td{white-space:normal;word-break:break-word}table.kv td:first-child{color:#5a6270;white-space:nowrap}
table.groups td:nth-child(2){text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:0;padding:8px 10px}
.card figcaption{font-weight:600;margin-bottom:4px}.kind{font-weight:400;color:#5a6270}
svg.plot{width:100%;height:auto;display:block}
.note{color:#5a6270;font-size:12.5px}.empty{color:#a33}
.cols{display:flex;gap:24px;flex-wrap:wrap}.cols>div{flex:1 1 420px}.scroll{overflow-x:auto}
"""


def render(manifest: dict, dest: str) -> str:
    """The report of a job as one HTML page (no script, no external resource)."""
    s = Summary.from_dict(manifest["summary"])
    sc = s.status_counts
    n_invalid = sum(v for k, v in sc.items() if k not in ("ok", "null", "no_tokens", "target_unlisted"))
    n_inf = sum(m.inf for m in s.measures.values())
    t = manifest.get("timings") or {}
    tiles = [("rows", _int(s.rows)), ("valid", _int(sc.get("ok", 0) + sc.get("target_unlisted", 0))),
             ("null", _int(sc.get("null", 0))), ("invalid", _int(n_invalid)), ("+inf values", _int(n_inf)),
             ("files", _int(len(manifest.get("inputs", [])))),
             ("total time", f"{t['total_s']:.2f} s" if t.get("total_s") else "&ndash;")]
    nav = ['<a href="#measures">measures</a>', '<a href="#rows">rows by status</a>']
    body = [_level(s, "Measures", "measures"), _invalid_section(s)]
    if s.tokens is not None:
        nav.append('<a href="#tokens">tokens</a>')
        body.append(_level(s.tokens, f"Over the {s.tokens.rows:,} counted positions of the valid sequences",
                           "tokens"))
    if s.group_by is not None:
        nav.append('<a href="#groups">groups</a>')
        body.append(_groups_section(s))
    nav.append('<a href="#job">job</a>')
    body.append(_job_section(manifest))
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"fastkl report: {dest}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>fastkl report</h1><p class="sub">{_e(dest)} &middot; {_e(", ".join(s.measures))}
{f" &middot; grouped by {_e(s.group_by)}" if s.group_by else ""}</p>
<nav>{"".join(nav)}</nav>
<div class="tiles">{"".join(f"<div class='tile'><b>{v}</b><span>{k}</span></div>" for k, v in tiles)}</div>
{chr(10).join(body)}
<p class="note">Written {made} by fastkl report from {MANIFEST}: statistics are exact (counts, mean, std, min,
max) or from the job's mergeable sketch (quantiles within 0.5%; the log-x histograms and the boxes' p10, p25
and p75 from its bins, about 4% wide).</p>
</main></body></html>
"""
