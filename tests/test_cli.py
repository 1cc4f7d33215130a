"""The `fastkl` command line (SPEC §5): run, demo, bench; exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import naive
from fastkl.cli import main
from test_jobs import _rows, _with_bad_row, check_rows, expected, read_dest, write_dataset


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastkl: error: ")
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def source(tmp_path, rng):
    src, table = write_dataset(str(tmp_path / "src"), "mixed", rng)
    return src, table


def test_run_end_to_end(tmp_path, source):
    src, table = source
    dest = tmp_path / "out"
    sj = tmp_path / "s.json"
    code, out, err = invoke("run", src, dest, "--measure", "kl", "--measure", "js", "--keep", "id",
                            "--status", "--summary-json", sj, "--task-rows", "11", "--workers", "2")
    assert code == 0, err
    assert "kl" in out and "js" in out and str(dest) in out  # the summary table
    assert err == ""  # no progress bar when stderr is not a terminal
    got = read_dest(dest)
    assert got.column_names == ["id", "kl", "js", "status"]
    check_rows(got.column("kl").to_pylist(), expected(table, "kl"))
    check_rows(got.column("js").to_pylist(), expected(table, "js"))
    assert json.loads(sj.read_text())["rows"] == table.num_rows


def test_run_options(tmp_path, source):
    src, table = source
    code, out, err = invoke("run", src, tmp_path / "out", "--base", "2", "--smoothing", "0.001",
                            "--measure", "kl", "--quiet", "--scheduler", "sync")
    assert code == 0, err
    assert out == ""
    check_rows(read_dest(tmp_path / "out").column("kl").to_pylist(),
               expected(table, "kl", base=2, smoothing=0.001))


def test_several_sources(tmp_path, rng):
    a, ta = write_dataset(str(tmp_path / "a"), "parquet", rng, files=2)
    b, tb = write_dataset(str(tmp_path / "b"), "ipc", rng, files=2)
    code, _, err = invoke("run", a, os.path.join(b, "*.feather"), tmp_path / "out", "--keep", "id", "-q")
    assert code == 0, err
    ids = read_dest(tmp_path / "out").column("id").to_pylist()
    assert ids == ta.column("id").to_pylist() + tb.column("id").to_pylist()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--p", "teacher"], "'teacher'"),
        (["--q", "student"], "'student'"),
        (["--keep", "uid"], "'uid'"),
        (["--q", "id"], "'id'"),
    ],
)
def test_column_errors_exit_2_and_name_the_column(tmp_path, source, args, needle):
    src, _ = source
    code, out, err = invoke("run", src, tmp_path / "out", *args)
    assert code == 2
    assert needle in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path, source):
    src, _ = source
    dest = tmp_path / "out"
    assert invoke("run", src, dest, "--measure", "nope")[0] == 2  # click's own check
    assert invoke("run", src, dest, "--base", "1")[0] == 2
    assert invoke("run", tmp_path / "missing", dest)[0] == 2
    code, _, err = invoke("run", src, os.path.join(src, "inside"))
    assert code == 2 and "overlaps SOURCE" in one_error_line(err)
    assert invoke("run", src, dest, "-q")[0] == 0
    code, _, err = invoke("run", src, dest)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert invoke("run", src, dest, "-q", "--overwrite", "--measure", "tv")[0] == 0
    assert read_dest(dest).column_names == ["tv"]


def test_invalid_row_exits_1_without_dest(tmp_path, rng):
    src, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    path, _ = _with_bad_row(src, row=12)
    code, out, err = invoke("run", src, tmp_path / "out")
    assert code == 1
    line = one_error_line(err)
    assert "nan" in line and path in line and "row 12" in line and "row group 1" in line
    assert not (tmp_path / "out").exists()
    code, out, err = invoke("run", src, tmp_path / "out", "--on-invalid", "null", "--status")
    assert code == 0 and "nan 1" in out


def test_corrupt_and_mismatched_files_exit_1(tmp_path, rng):
    src, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    bad = os.path.join(src, "shard-zz.parquet")
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    code, _, err = invoke("run", src, tmp_path / "out")
    assert code == 1 and "shard-zz.parquet" in one_error_line(err)
    pq.write_table(pa.table({"p": _rows(rng, 3, 0).column("p")}), bad)
    code, _, err = invoke("run", src, tmp_path / "out")
    assert code == 1 and "'q'" in one_error_line(err)


def test_debug_shows_traceback(tmp_path, source):
    src, _ = source
    code, _, err = invoke("--debug", "run", src, tmp_path / "out", "--p", "teacher")
    assert code == 2 and "Traceback" in err


def test_bench_quick(tmp_path):
    """`fastkl bench --quick`: kernel vs streaming limit and job vs I/O floor, in a few seconds."""
    out_json = tmp_path / "bench.json"
    code, out, err = invoke("bench", "--quick", "--rounds", "1", "--dir", tmp_path / "work", "--json", out_json)
    assert code == 0, err
    for needle in ("streaming limit (vectorised sum)", "fastkl kl, probs", "of the streaming limit",
                   "I/O floor", "fastkl run", "x the time to read the input"):
        assert needle in out, out
    info = json.loads(out_json.read_text())
    import llvmlite.binding as ll  # the header names what the kernels are compiled for
    from numba import config
    target = config.CPU_NAME or ll.get_host_cpu_name()
    assert f"kernels: LLVM target {target}" in out and info["kernels"].startswith("LLVM target"), out
    assert info["kernel"]["fastkl kl, probs"]["median_s"] > 0
    assert info["job"]["fastkl"]["median_s"] > 0 and info["job"]["floor"]["median_s"] > 0
    assert invoke("bench", "--rows", "5")[0] == 2  # usage error


def test_demo(tmp_path):
    d = tmp_path / "demo"
    args = ("demo", d, "--rows", "3000", "--shards", "3", "--vocab", "32", "--sequences", "40")
    code, out, err = invoke(*args)
    assert code == 0, err
    assert "kl" in out and "output:" in out
    table = read_dest(d / "scores")
    assert table.num_rows == 3000
    assert table.column_names == ["id", "position", "kl", "reverse_kl", "js", "entropy"]
    kl = table.column("kl").to_pylist()
    assert any(v == float("inf") for v in kl)  # students with zeros where the teacher is not
    # the token-data part: top-k sequences, the estimate and its bounds per token
    tokens = read_dest(d / "distill-scores")
    assert tokens.num_rows == 40
    assert {"kl", "kl_mean", "kl_lower", "kl_upper", "tokens", "listed_mass_p"} <= set(tokens.column_names)
    assert set(tokens.column("status").to_pylist() if "status" in tokens.column_names else ["ok"]) == {"ok"}
    lower = np.array(tokens.column("kl_lower").to_pylist())
    assert np.all(np.array(tokens.column("kl").to_pylist()) <= lower * (1 + 1e-6) + 1e-9)  # bucket <= lower
    assert "per counted token" in out and "truth in [" in out
    # a second run reuses the samples and replaces the outputs
    assert invoke(*args)[0] == 0


def test_real_process_exit_codes(tmp_path, source):
    """The installed entry point, in a subprocess, as a user runs it."""
    src, _ = source
    cmd = [sys.executable, "-m", "fastkl.cli", "run", src, str(tmp_path / "out")]
    r = subprocess.run(cmd + ["--p", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'nope'" in r.stderr
    r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "_fastkl.json").exists()


def test_progress_bar_on_a_terminal(tmp_path, source, monkeypatch):
    import io

    import fastkl

    class Tty(io.StringIO):
        def isatty(self):
            return True

    src, table = source
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    fastkl.run(src, tmp_path / "a", task_rows=7)
    text = err.getvalue()
    assert "100%" in text and f"{table.num_rows}/{table.num_rows} rows" in text and "rows/s" in text
    err.seek(0), err.truncate()
    fastkl.run(src, tmp_path / "b", quiet=True)
    assert err.getvalue() == ""


def test_logits_peer_reference_is_exact_and_torch_is_timed_against_it():
    """`fastkl bench --peers`' logits report: its extended-precision reference equals the exact
    (mpmath) KL of the logits; with PyTorch installed, the report times both float types."""
    from fastkl.bench import throughput as B

    rng = np.random.default_rng(5)
    xp = rng.standard_normal((3, 50)).astype(np.float32)
    xq = (xp + rng.standard_normal((3, 50)).astype(np.float32) * np.float32(0.01)).astype(np.float32)
    got = B.exact_kl_logits(xp, xq)
    for i in range(3):
        want = float(naive.reference("kl", xp[i].tolist(), xq[i].tolist(), kind="logits").value)
        assert got[i] == pytest.approx(want, rel=1e-15)
    pytest.importorskip("torch", reason="PyTorch is a peer in benchmarks, not a dependency")
    lines, info = B.logits_report(rows=20, k=1_000, threads=1, rounds=1)
    assert {k.split(": ", 1)[1] for k in info} == {"fastkl kl, kind='logits'", "torch float32 kl_div(log_softmax)",
                                                    "torch float64 kl_div(log_softmax)"}
    assert all(v["median_s"] > 0 and v["rel_err_max"] < 1.0 for v in info.values())


def test_an_interrupted_job_prints_no_unawaited_coroutine_warning():
    """SIGTERM / Ctrl-C during a job unwinds the Dask client's pending coroutines: the
    RuntimeWarnings they raise would print beside the one line (seen on a LocalCluster job)."""
    import gc
    import signal
    import warnings

    from fastkl import cli

    async def pending():
        return None

    for handler, raised in ((cli._raise_terminated, cli.Terminated), (cli._raise_interrupted, KeyboardInterrupt)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(raised):
                handler(signal.SIGTERM, None)
            coroutine = pending()
            del coroutine
            gc.collect()
        assert not [w for w in seen if "never awaited" in str(w.message)]
