"""The `fastkl` command: run, report, clean, demo, bench (docs/guide/jobs.md, docs/guide/storage.md,
docs/guide/report.md).

Exit status: 0 done; 1 the data was refused (invalid rows, corrupt or
mismatched files); 2 usage errors (unknown column, bad option, DEST refused);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM): the job stops in about
a second, workers included, with one line.
Errors are one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import traceback
import warnings

import click

from ._registry import COMPARISON_MEASURES, DTYPES, KINDS, MEASURES, SAMPLED_MEASURES, TAILS
from .errors import DestTakenError, FastKLError, FastKLWarning, OptionError

EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as shells report it
EXIT_TERMINATED = 128 + 15  # SIGTERM


# Python keyword arguments named in messages, as the command line spells them:
# `name=value` anywhere, names with an underscore alone, and a plain name that
# opens the message ("temperature must be ..."). Never inside a path or quotes.
_FLAGS = ("normalize", "overwrite", "resume", "status", "quiet")
_NAMES = _FLAGS + ("p_temperature", "q_temperature", "temperature", "p_kind", "q_kind", "kind", "sum_tol",
                   "p_dtype", "q_dtype", "dtype",
                   "on_invalid", "smoothing", "base", "workers", "task_rows", "task_bytes", "summary_json",
                   "scheduler", "max_groups", "group_by")
_ALONE = "|".join(n for n in _NAMES if "_" in n)
_PY_ARG = re.compile(
    rf"(?<![\w./'\"-])(?:(?P<name>{'|'.join(_NAMES)})=(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;)]+)"
    rf"|(?P<alone>{_ALONE})(?![\w./'\"(-])|^(?P<first>{'|'.join(_NAMES)})(?= must ))"
)


def cli_words(message: str) -> str:
    """A message written for the Python API (`normalize=True`, `p_temperature`) in the
    command line's words (`--normalize`, `--p-temperature`): the CLI's errors speak CLI."""

    def option(m: re.Match) -> str:
        name = m.group("name") or m.group("alone") or m.group("first")
        if name == "task_bytes":
            return "--task-mb"
        opt = "--" + name.replace("_", "-")
        value = m.group("value")
        if value is None or name in _FLAGS:
            return opt
        return f"{opt} {value.strip(chr(39) + chr(34))}"

    return _PY_ARG.sub(option, message)


def _fail(ctx_debug: bool, code: int, message: str) -> None:
    if ctx_debug:
        traceback.print_exc()
    click.echo(f"fastkl: error: {cli_words(message)}", err=True)
    sys.exit(code)


def _kept(staging: str | None) -> str:
    if staging and "://" in staging:
        return _kept_in_store(staging)
    if staging and os.path.isdir(staging) and any(n.endswith(".parquet") for n in os.listdir(staging)):
        return f"; finished parts kept in {staging} for --resume"
    return ""


def _kept_in_store(staging: str) -> str:
    """The same hint for a store DEST: finished parts have their states logged under its staging prefix."""
    try:
        import pyarrow.fs as pafs

        from .io.stores import resolve

        store, path = resolve(staging)
        found = store.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if any(f.path.rsplit("/", 1)[-1].startswith("states-") and f.path.endswith(".log") for f in found):
            return f"; finished parts kept in {staging}/ for --resume"
    except Exception:  # noqa: BLE001 - a hint, never a second error
        pass
    return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like a Ctrl-C, so that the job stops the same way."""


def _quiet_unwinding() -> None:
    """Once a job is interrupted, the coroutines the Dask client had pending are dropped
    unawaited as the stack unwinds: their RuntimeWarnings would print beside the one line."""
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def _raise_terminated(signum, frame) -> None:
    _quiet_unwinding()
    raise Terminated()


def _raise_interrupted(signum, frame) -> None:
    _quiet_unwinding()
    raise KeyboardInterrupt()


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops the job like Ctrl-C (workers stopped, one line, exit 143), not by dying
    mid-way (which left a "leaked semaphore" warning behind). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (not a caller's own handler)
    if ctrl_c:
        signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_guarded(fn, debug: bool, staging_hint: str | None = None):
    """Call fn(), turning fastkl's exceptions into one line on stderr and an exit status."""
    try:
        with _sigterm_interrupts():
            return fn()
    except OptionError as e:
        _fail(debug, EXIT_USAGE, str(e))
    except DestTakenError as e:  # the staging place is the other job's: no "kept for --resume"
        _fail(debug, EXIT_DATA, str(e))
    except FastKLError as e:  # InvalidRowError, DataError: the data was refused
        _fail(debug, EXIT_DATA, str(e) + _kept(staging_hint))
    except Terminated:
        _fail(debug, EXIT_TERMINATED, "terminated (SIGTERM)" + _kept(staging_hint))
    except KeyboardInterrupt:
        _fail(debug, EXIT_INTERRUPTED, "interrupted" + _kept(staging_hint))
    except click.exceptions.Exit:
        raise
    except MemoryError as e:  # not while reading data (that is a DataError naming the file)
        from .jobs.limits import ENV, current_limit

        soft = current_limit()
        cap = f" under the cap of {soft / 2**30:.1f} GiB (set {ENV} higher, or none)" if soft else ""
        detail = str(e).strip().splitlines()
        _fail(debug, EXIT_DATA, f"out of memory{cap}" + (f": {detail[0]}" if detail else ""))
    except Exception as e:  # a bug or an environment problem (a full disk): still one line
        hint = "" if debug else " (run with --debug for the whole message and traceback)"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[0] if lines else ""
        kept = _kept(staging_hint) if isinstance(e, OSError) else ""
        _fail(debug, EXIT_DATA, f"{type(e).__name__}: {first}{' ...' if len(lines) > 1 else ''}{kept}{hint}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastkl", prog_name="fastkl")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """fastkl: row-wise KL / JS / entropy divergences over big Parquet/Arrow datasets.

    The user guide, recipes and references are in the docs/ folder of the
    fastkl repository (start at docs/index.md; `mkdocs serve` shows them as a
    site). `fastkl COMMAND --help` lists a command's options.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _float_or_e(value: str) -> float:
    import math

    if value.strip().lower() == "e":
        return math.e
    return float(value)


_RUN_EPILOG = """\
Memory: FASTKL_MEMORY_LIMIT caps the memory (address space, RLIMIT_DATA) of
the whole job: a size (8G, 512M), a share of the memory available at start
(50%), or none; default 80% of the available memory, at least 4 GiB; at
least 2G. It is a total, whatever the scheduler: with --scheduler processes
the client keeps 2 GiB and the worker processes share the rest equally (at
least 2 GiB each: fewer workers when more would not fit). Input that needs
more fails with one line naming the file and row group.

What a job guarantees (all-or-nothing commit, --resume, one job per DEST,
changing input, object stores): docs/guide/jobs.md and docs/guide/storage.md;
every option: docs/reference/cli.md.
"""


@main.command("run", epilog=_RUN_EPILOG)
@click.argument("source", nargs=-1)
@click.argument("dest", required=False)  # both checked in run_cmd, to say which one is missing
@click.option("--p", "p", default="p", show_default=True, help="Column holding P (list of floats).")
@click.option("--q", "q", default="q", show_default=True, help="Column holding Q (list of floats).")
@click.option(
    "--measure", "-m", "measures", multiple=True, type=click.Choice(MEASURES + COMPARISON_MEASURES + SAMPLED_MEASURES),
    help="Measure to compute (repeat for several; default kl). k1, k2, k3, abs: RLHF estimators "
         "from sampled-token log-probs (--kind sampled).",
)
@click.option("--keep", "keep", multiple=True, help="Input column copied to the output (repeatable).")
@click.option("--p-ids", "p_ids", default=None,
              help="Column of P's token ids: P holds top-k rows (list<int>, or list<list<int>> per sequence).")
@click.option("--q-ids", "q_ids", default=None, help="Column of Q's token ids (top-k rows).")
@click.option("--vocab", type=click.IntRange(min=1), default=None,
              help="Vocabulary size V of top-k rows: ids must be in [0, V); tightens the bounds.")
@click.option("--tail", type=click.Choice(TAILS), default="bucket", show_default=True,
              help="Point estimate of top-k rows: what the unlisted mass is taken to be.")
@click.option("--no-bounds", "no_bounds", is_flag=True, help="Top-k rows: no m_lower / m_upper columns.")
@click.option("--p-mean", default=None, help="Diagonal Gaussians: column of P's per-dimension means (gaussian_kl).")
@click.option("--p-logvar", default=None, help="Diagonal Gaussians: column of P's log-variances.")
@click.option("--q-mean", default=None, help="Diagonal Gaussians: column of Q's means.")
@click.option("--q-logvar", default=None, help="Diagonal Gaussians: column of Q's log-variances.")
@click.option("--target", default=None,
              help="Column of the token ids that came next (nll_p, nll_q, delta_p): an int per row or a list per sequence.")
@click.option("--mask", "mask", default=None,
              help="Sequence rows: column (list<bool> or list<int8>) saying which positions count.")
@click.option("--lengths", "lengths", default=None,
              help="Sequence rows: integer column, how many leading positions count.")
@click.option("--per-token", is_flag=True,
              help="Sequence rows: add m_tokens, each position's value (list<float64>, null where not counted).")
@click.option("--kind", type=click.Choice(KINDS), default="probs", show_default=True, help="Encoding of both sides.")
@click.option("--p-kind", type=click.Choice(KINDS), default=None, help="Encoding of P (overrides --kind).")
@click.option("--q-kind", type=click.Choice(KINDS), default=None, help="Encoding of Q (overrides --kind).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Element type of both sides (default: as stored); bfloat16 reads list<uint16> as bfloat16 bits.")
@click.option("--p-dtype", type=click.Choice(DTYPES), default=None, help="Element type of P (overrides --dtype).")
@click.option("--q-dtype", type=click.Choice(DTYPES), default=None, help="Element type of Q (overrides --dtype).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature for logits.")
@click.option("--p-temperature", type=float, default=None)
@click.option("--q-temperature", type=float, default=None)
@click.option("--base", default="e", show_default=True, help="Log base: e, 2, 10 or any positive number != 1.")
@click.option("--beta", type=float, default=None, help="gjs: the weight of P in the mixture, in [0, 1] (default 0.5).")
@click.option("--alpha", type=float, default=None, help="renyi: its order, > 0 and != 1 (required by renyi).")
@click.option("--normalize", is_flag=True, help="Renormalise each row instead of checking its sum.")
@click.option("--smoothing", type=float, default=0.0, show_default=True, help="Additive smoothing epsilon.")
@click.option("--sum-tol", type=float, default=1e-3, show_default=True, help="Tolerance on row sums.")
@click.option(
    "--on-invalid", type=click.Choice(["raise", "null"]), default="raise", show_default=True,
    help="raise: fail the job on the first invalid row; null: null measures and go on.",
)
@click.option("--status", is_flag=True, help="Add a `status` column (ok, null or the reason).")
@click.option(
    "--scheduler", default=None,
    help="threads (default), processes, sync, or a Dask scheduler address (host:port).",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local threads/processes (default: cores).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier fastkl output at DEST once the new one is complete (never anything else).")
@click.option("--resume", is_flag=True, help="Reuse the finished parts of an interrupted job.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary table.")
@click.option("--summary-json", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the summary as JSON to this file.")
@click.option("--task-rows", type=click.IntRange(min=1), default=None, help="At most this many rows per task.")
@click.option("--task-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="At most this many MB of decoded input per task (default 128 MiB).")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the object store's filesystem (repeatable), e.g. endpoint_url=http://host:9000.")
@click.option("--last-writer-wins", is_flag=True,
              help="Accept a store without conditional writes: two jobs at once could both write DEST.")
@click.option("--dry-run", is_flag=True,
              help="Plan only: files, rows, bytes, tasks, parts and an estimated time; compute nothing.")
@click.option("--group-by", "group_by", default=None, metavar="COL",
              help="Also summarise per value of this low-cardinality column (string, integer, bool or "
                   "dictionary; null is its own group).")
@click.option("--max-groups", type=click.IntRange(min=1), default=None,
              help="With --group-by: fail past this many distinct values (default 10,000).")
@click.option("--debug", "debug_here", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def run_cmd(ctx: click.Context, source, dest, p, q, measures, keep, p_ids, q_ids, vocab, tail, no_bounds, p_mean,
            p_logvar, q_mean, q_logvar, target, mask,
            lengths, per_token, kind, p_kind, q_kind,
            dtype, p_dtype, q_dtype, temperature,
            p_temperature, q_temperature, base, beta, alpha, normalize, smoothing, sum_tol, on_invalid, status,
            scheduler, workers, overwrite, resume, quiet, summary_json, task_rows, task_mb, storage_option,
            last_writer_wins, dry_run, group_by, max_groups, debug_here):
    """Compute per-row measures of SOURCE (files, directories, globs) into the Parquet dataset DEST."""
    debug = debug_here or (ctx.obj or {}).get("debug", False)
    if dest is None:
        _fail(False, EXIT_USAGE, "SOURCE and DEST are missing: fastkl run SOURCE... DEST")
    if not source:
        _fail(False, EXIT_USAGE, f"DEST is missing: fastkl run SOURCE... DEST (got only {dest!r})")
    try:
        base_v = _float_or_e(base)
    except ValueError:
        raise click.BadParameter(f"{base!r} is not a number", param_hint="--base")

    def go():
        from .jobs.run import run
        from ._config import DEFAULT_TASK_BYTES
        from .io.stores import parse_storage_options

        storage_options = parse_storage_options(storage_option) or None

        summary = run(
            list(source), dest, p=p, q=q, keep=keep,
            measures=measures or (("k1", "k3") if kind == "sampled" else ("kl",)),
            scheduler=scheduler, workers=workers, overwrite=overwrite, resume=resume, status=status,
            quiet=quiet, summary_json=summary_json, task_rows=task_rows,
            task_bytes=int(task_mb * (1 << 20)) if task_mb else DEFAULT_TASK_BYTES,
            kind=kind, p_kind=p_kind, q_kind=q_kind, dtype=dtype, p_dtype=p_dtype, q_dtype=q_dtype,
            temperature=temperature,
            p_temperature=p_temperature, q_temperature=q_temperature, base=base_v, beta=beta, alpha=alpha,
            normalize=normalize, smoothing=smoothing, sum_tol=sum_tol, on_invalid=on_invalid,
            mask=mask, lengths=lengths, per_token=per_token, p_ids=p_ids, q_ids=q_ids, vocab=vocab,
            tail=tail, bounds=not no_bounds, p_mean=p_mean, p_logvar=p_logvar, q_mean=q_mean, q_logvar=q_logvar,
            target=target, storage_options=storage_options, last_writer_wins=last_writer_wins,
            dry_run=dry_run, group_by=group_by, max_groups=max_groups,
        )
        return summary

    from .io.output import resolve_dest, staging_path

    from .io.stores import is_store_url

    try:
        hint = (dest.rstrip("/") + "/_fastkl-staging" if is_store_url(dest)
                else str(staging_path(resolve_dest(dest))))
    except FastKLError:
        hint = None  # run() says what is wrong with DEST
    from .jobs.limits import capped

    def capped_go():
        with capped():  # FASTKL_MEMORY_LIMIT: hostile input must not exhaust the machine
            caught: list = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", FastKLWarning)
                    return go()
            finally:  # one line each, also when the job fails after them
                for w in caught:
                    if issubclass(w.category, FastKLWarning):
                        click.echo(f"fastkl: warning: {w.message}", err=True)
                    else:
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    summary = run_guarded(capped_go, debug, hint)
    if dry_run:
        click.echo(summary.format_table())
        return
    if not quiet:
        click.echo(summary.format_table())
        t = summary.timings or {}
        if t.get("total_s"):
            rate = summary.rows / t["total_s"]
            click.echo(f"done in {t['total_s']:.2f} s ({rate:,.0f} rows/s); output: {summary.dest}")


@main.command("clean")
@click.argument("dest")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the object store's filesystem (repeatable).")
@click.option("--debug", "debug_here", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def clean_cmd(ctx: click.Context, dest, storage_option, debug_here):
    """Remove what a dead job left for DEST (staged parts, pending uploads), or finish its commit."""
    debug = debug_here or (ctx.obj or {}).get("debug", False)

    def go():
        from .io.cleanup import clean
        from .io.stores import parse_storage_options

        return clean(dest, parse_storage_options(storage_option) or None)

    click.echo(f"fastkl: {run_guarded(go, debug)}")


@main.command("report")
@click.argument("dest")
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="The HTML file to write (default: DEST-report.html beside a local DEST, "
                   "NAME-report.html here for a URL).")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="An option of the object store's filesystem (repeatable).")
@click.option("--debug", "debug_here", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def report_cmd(ctx, dest, out, storage_option, debug_here):
    """Write one self-contained HTML page about the job at DEST: histograms, quantiles, invalid rows
    by reason, per-group comparisons, options and timings (opens offline; reads only DEST's manifest)."""
    debug = debug_here or (ctx.obj or {}).get("debug", False)

    def go():
        from .io.stores import parse_storage_options
        from .jobs.report import write_report

        return write_report(dest, out, parse_storage_options(storage_option) or None)

    path = run_guarded(go, debug)
    click.echo(f"report: {os.path.abspath(path)}")


@main.command("demo")
@click.argument("directory", default="fastkl-demo", required=False)
@click.option("--rows", type=click.IntRange(min=1), default=100_000, show_default=True, help="Rows in the sample.")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Files in the sample.")
@click.option("--vocab", type=click.IntRange(min=2), default=128, show_default=True, help="Support size K.")
@click.option("--sequences", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Sequences of the token-data sample (top-k ids + log-probs per position).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", "debug_here", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def demo_cmd(ctx, directory, rows, shards, vocab, sequences, quiet, debug_here):
    """Make sample distillation datasets in DIRECTORY (dense rows; token data with top-k ids)
    and run a job on each."""
    debug = debug_here or (ctx.obj or {}).get("debug", False)
    from ._demo import demo

    run_guarded(lambda: demo(directory, rows=rows, shards=shards, vocab=vocab, sequences=sequences,
                             quiet=quiet), debug)


@main.command("bench")
@click.option("--rows", type=click.IntRange(min=100), default=200_000, show_default=True,
              help="Rows of the in-memory arrays and of the job's Parquet file.")
@click.option("--vocab", type=click.IntRange(min=2), default=256, show_default=True, help="Support size K.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Element type of the in-memory arrays (the job's file is float32).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Kernel threads (default: cores).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed rounds per case (the cases take turns; medians are reported).")
@click.option("--quick", is_flag=True, help="A small run in a few seconds (20,000 rows x 64, 2 rounds).")
@click.option("--kernel/--no-kernel", default=True, show_default=True, help="Kernel throughput vs the streaming limit.")
@click.option("--job/--no-job", default=True, show_default=True, help="Job wall time vs the I/O floor.")
@click.option("--peers", is_flag=True, help="Also time scipy, NumPy, Polars and DuckDB (pip install 'fastkl[bench]'), and PyTorch on logits at K = 32,000 where it is installed.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the job's input file (default: a temporary directory, removed after).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the measurements as JSON to this file.")
@click.option("--max-load", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Shared machine: start a round only when other processes use less than this share of the "
                   "CPU (e.g. 0.1), and run a round again when they used more.")
@click.option("--debug", "debug_here", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def bench_cmd(ctx, rows, vocab, dtype, threads, rounds, quick, kernel, job, peers, workdir, json_path, max_load,
              debug_here):
    """Throughput on this machine: kernel GB/s against a streaming read of the
    same buffers, and a job's wall time against just reading its input and writing its output.

    The method and reference numbers: docs/performance.md.
    """
    debug = debug_here or (ctx.obj or {}).get("debug", False)
    if quick:
        rows, vocab, rounds = min(rows, 20_000), min(vocab, 64), min(rounds, 2)

    def go():
        import json

        import numpy as np

        from .bench.throughput import bench

        info = bench(rows=rows, k=vocab, dtype=np.dtype(dtype).type, threads=threads, rounds=rounds,
                     kernel=kernel, job=job, peers=peers, workdir=workdir, echo=click.echo, max_load=max_load)
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(info, fh, indent=1, default=str)
                fh.write("\n")

    run_guarded(go, debug)


if __name__ == "__main__":  # pragma: no cover
    main()
