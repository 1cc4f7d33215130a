"""`fastkl demo`: a realistic sample dataset and a job on it, for a first look.

The sample mimics knowledge distillation: P is a teacher's next-token
distribution, Q a student's. Teachers are sharp softmaxes of heavy-tailed
logits; a third of the teacher rows are top-k truncated (zeros in P: sparse
teacher targets), and about 1% of the student rows are truncated too (zeros
in Q where P > 0: their KL(P||Q) is +inf, counted apart in the summary).
Each row has a `domain` (chat, code, math, web) on which the student is more
or less noisy: the job groups its summary by it (--group-by domain), and the
demo ends by writing the HTML report of each job (fastkl report).
"""

from __future__ import annotations

import json
import os
import shlex

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _truncate(p: np.ndarray, rows: np.ndarray, k: int) -> None:
    """Keep the top-k entries of the selected rows, renormalised."""
    if not rows.any():
        return
    sub = p[rows]
    cut = np.partition(sub, -k, axis=1)[:, -k][:, None]
    sub = np.where(sub >= cut, sub, 0.0)
    p[rows] = sub / sub.sum(axis=1, keepdims=True)


DOMAINS = ("chat", "code", "math", "web")
_DOMAIN_NOISE = np.array([0.45, 0.6, 0.9, 0.5])  # how far the student is from the teacher, per domain


def make_shard(rng: np.random.Generator, first_id: int, n: int, *, vocab: int) -> pa.Table:
    logits = rng.standard_t(df=3, size=(n, vocab)) * rng.uniform(1.0, 3.0, size=(n, 1))
    domain = rng.choice(len(DOMAINS), n, p=[0.4, 0.25, 0.15, 0.2])
    teacher = _softmax(logits / 0.7)
    student = _softmax(logits + rng.normal(0.0, 1.0, size=(n, vocab)) * _DOMAIN_NOISE[domain][:, None])
    _truncate(teacher, rng.random(n) < 0.33, max(2, vocab // 8))
    _truncate(student, rng.random(n) < 0.01, max(2, vocab // 16))

    def col(x: np.ndarray) -> pa.Array:
        x = x.astype(np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), vocab).cast(pa.list_(pa.float32()))

    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "position": pa.array(rng.integers(0, 2048, n, dtype=np.int32)),
        "teacher": col(teacher),
        "student": col(student),
        "domain": pa.DictionaryArray.from_arrays(pa.array(domain.astype(np.int8)), pa.array(DOMAINS)),
    })


# ---------------------------------------------------------------- token data
# A distillation table as DistillKit / Axolotl store it: one row per sequence,
# per position the teacher's top-k token ids and log-probs, a mask of the
# positions that count (the completion, not the prompt), and here also the
# student's own top-k. Distributions are Zipf-like over a 32k vocabulary, drawn
# by rank (no full distribution is ever built): the listed values are the top
# ranks, so every unlisted value is below the smallest listed one, as in real
# top-k data; the student's ranks are noisy and partly other tokens.

def _zipf_top(rng: np.random.Generator, n: int, k: int, vocab: int, s: np.ndarray,
              noise: float) -> np.ndarray:
    """Log-probs of the k largest entries of n Zipf-like distributions, descending."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    logw = -s[:, None] * np.log(ranks[None, :k] + 2.0) + rng.normal(0.0, noise, (n, k))
    logw = -np.sort(-logw, axis=1)
    # the tail beyond k: the same power law from rank k+1, its total by a 64-point sum of blocks
    edges = np.unique(np.geomspace(k + 1, vocab, 64).astype(np.int64))
    mids, widths = (edges[:-1] + edges[1:]) / 2.0, np.diff(edges)
    tail = (widths[None, :] * np.exp(-s[:, None] * np.log(mids[None, :] + 2.0))).sum(axis=1)
    top = np.exp(logw)
    tail = np.minimum(tail, top[:, -1] * (vocab - k))  # never above the cap top-k implies
    return logw - np.log(top.sum(axis=1) + tail)[:, None]


def _distinct_ids(rng: np.random.Generator, n: int, k: int, vocab: int) -> np.ndarray:
    """n rows of k distinct token ids (common tokens more often)."""
    ids = (vocab * rng.random((n, 3 * k)) ** 3).astype(np.int64)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        _, first = np.unique(ids[i], return_index=True)
        row = ids[i][np.sort(first)]
        while row.size < k:
            row = np.unique(np.concatenate([row, rng.integers(0, vocab, k)]))
        out[i] = row[:k]
    return out


def make_distill_shard(rng: np.random.Generator, first_id: int, n: int, *, vocab: int, positions: int,
                       k: int) -> pa.Table:
    m = n * positions
    teacher_ids = _distinct_ids(rng, m, k, vocab)
    teacher = _zipf_top(rng, m, k, vocab, rng.uniform(1.3, 2.2, m), 0.0)
    # the student: its own top-k, mostly the teacher's tokens in a noisier order, some others
    other = _distinct_ids(rng, m, k, vocab)
    keep = rng.random((m, k)) < 0.8
    student_ids = np.where(keep, teacher_ids, other)
    for i in np.flatnonzero((np.sort(student_ids, axis=1)[:, 1:] == np.sort(student_ids, axis=1)[:, :-1]).any(1)):
        _, first = np.unique(student_ids[i], return_index=True)  # a replacement hit a kept id: redraw
        row = student_ids[i][np.sort(first)]
        fresh = np.setdiff1d(rng.integers(0, vocab, 4 * k), row)[: k - row.size]
        student_ids[i] = np.concatenate([row, fresh])
    student = _zipf_top(rng, m, k, vocab, rng.uniform(1.2, 2.0, m), 0.3)
    prompt = rng.integers(positions // 8, positions // 2, n)
    mask = (np.arange(positions)[None, :] >= prompt[:, None]).astype(np.int8)

    def nested(x: np.ndarray, t: pa.DataType) -> pa.Array:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=t), k).cast(pa.list_(t))
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * positions), inner)

    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "target_token_ids": nested(teacher_ids.astype(np.int32), pa.int32()),
        "target_logprobs": nested(teacher.astype(np.float32), pa.float32()),
        "target_mask": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * positions),
                                                pa.array(mask.reshape(-1))),
        "student_token_ids": nested(student_ids.astype(np.int32), pa.int32()),
        "student_logprobs": nested(student.astype(np.float32), pa.float32()),
    })


def make_sample(data_dir: str, rows: int, shards: int, vocab: int, seed: int = 0, *,
                make=make_shard, **shape) -> list[str]:
    """Write the sample shards (skipped when the same sample is already there)."""
    meta = {"rows": rows, "shards": shards, "vocab": vocab, "seed": seed, "format": 3,
            "kind": make.__name__, **shape}
    marker = os.path.join(data_dir, "_sample.json")
    names = [os.path.join(data_dir, f"shard-{i:04d}.parquet") for i in range(shards)]
    try:
        with open(marker) as f:
            if json.load(f) == meta and all(os.path.exists(n) for n in names):
                return names
    except (OSError, ValueError):
        pass
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = 0
    for i, name in enumerate(names):
        n = rows // shards + (1 if i < rows % shards else 0)
        table = make(rng, first, n, vocab=vocab, **shape)
        tmp = name + ".tmp"
        pq.write_table(table, tmp, row_group_size=max(1, min(8192, n)))
        os.replace(tmp, name)
        first += n
    with open(marker, "w") as f:
        json.dump(meta, f)
    return names


def demo(directory: str = "fastkl-demo", *, rows: int = 100_000, shards: int = 4, vocab: int = 128,
         sequences: int = 1000, quiet: bool = False):
    from .jobs.run import run

    data = os.path.join(directory, "data")
    out = os.path.join(directory, "scores")
    click.echo(f"fastkl demo: writing a sample of {rows:,} teacher/student rows (K={vocab}) "
               f"in {shards} shards to {data}/ ...", err=True)
    names = make_sample(data, rows, shards, vocab)
    size = sum(os.path.getsize(n) for n in names)
    measures = ("kl", "reverse_kl", "js", "entropy")
    cmd = (f"fastkl run {shlex.quote(data)} {shlex.quote(out)} --p teacher --q student "
           + " ".join(f"--measure {m}" for m in measures) + " --keep id --keep position --group-by domain "
           "--overwrite")
    click.echo(f"running: {cmd}   ({size / 1e6:.0f} MB)", err=True)
    summary = run(data, out, p="teacher", q="student", measures=measures, keep=("id", "position"),
                  group_by="domain", overwrite=True, quiet=quiet)
    click.echo(summary.format_table())
    t = summary.timings or {}
    if t.get("total_s"):
        click.echo(f"done in {t['total_s']:.2f} s ({summary.rows / t['total_s']:,.0f} rows/s)")
    click.echo(f"output: {os.path.abspath(out)}/  (Parquet parts + _fastkl.json manifest)")
    click.echo(f"read it back: python -c \"import pyarrow.dataset as ds; "
               f"print(ds.dataset('{out}').to_table().slice(0, 5))\"")
    distill_demo(directory, sequences=sequences, quiet=quiet)
    from .jobs.report import write_report

    click.echo("\nreports (fastkl report DEST; one HTML file each, open it in a browser, offline):")
    for dest in (os.path.join(directory, "distill-scores"), out):
        click.echo(f"report: {os.path.abspath(write_report(dest))}")
    return summary


def distill_demo(directory: str, *, sequences: int = 1000, positions: int = 128, vocab: int = 32_000,
                 k: int = 20, quiet: bool = False):
    """Token data as distillation pipelines store it: top-k ids + log-probs per position."""
    from .jobs.run import run

    data = os.path.join(directory, "distill")
    out = os.path.join(directory, "distill-scores")
    click.echo(f"\nfastkl demo, token data: {sequences:,} sequences x {positions} positions, teacher and "
               f"student top-{k} token ids + log-probs over V={vocab:,}, masked prompts, in {data}/ ...", err=True)
    make_sample(data, sequences, 2, vocab, make=make_distill_shard, positions=positions, k=k)
    cmd = (f"fastkl run {shlex.quote(data)} {shlex.quote(out)} --p target_logprobs --p-ids target_token_ids "
           f"--q student_logprobs --q-ids student_token_ids --mask target_mask --kind logprobs "
           f"--vocab {vocab} -m kl -m reverse_kl --keep id --overwrite")
    click.echo(f"running: {cmd}", err=True)
    summary = run(data, out, p="target_logprobs", q="student_logprobs", p_ids="target_token_ids",
                  q_ids="student_token_ids", mask="target_mask", kind="logprobs", vocab=vocab,
                  measures=("kl", "reverse_kl"), keep=("id",), overwrite=True, quiet=quiet)
    click.echo(summary.format_table())
    click.echo(_per_token_line(out, ("kl", "reverse_kl")))
    return summary


def _per_token_line(out: str, measures: tuple[str, ...]) -> str:
    """The mean per counted token of the estimate and of its bounds, over the valid sequences
    (null measures of other rows are left out of the sums; their tokens are null too)."""
    import pyarrow.dataset as ds

    t = ds.dataset(out).to_table()
    tokens = np.asarray(t["tokens"].fill_null(0), dtype=np.float64).sum()
    lines = [f"per counted token (mean over {int(tokens):,} tokens): the bucket estimate (tail='bucket', "
             "never above the truth) and the range the top-k data prove the truth is in:"]
    for m in measures:
        est, lo, hi = (float(np.nansum(t[c].to_numpy(zero_copy_only=False))) / tokens
                       for c in (m, f"{m}_lower", f"{m}_upper"))
        lines.append(f"  {m:<11} estimate {est:.4f}   truth in [{lo:.4f}, {hi:.4f}]")
    mass = np.nanmean(t["listed_mass_p"].to_numpy(zero_copy_only=False))
    lines.append(f"  (the teacher's top-k holds {mass:.1%} of its mass per position on average; the upper "
                 "bound is inf where the student's unlisted entries may be 0: docs/guide/shapes.md, 'Top-k rows')")
    return "\n".join(lines)
