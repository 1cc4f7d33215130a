"""`fastkl report`: the HTML page of a job, checked as text and in a real headless browser.

The browser is Debian's Chromium, driven by selenium through Debian's
chromedriver (package chromium-driver): selenium is a small pure-Python
client on PyPI and needs no browser download of its own (the driver's path
is given, so its driver manager never runs); `.ci/run` installs both
packages when they are missing. Without them the browser test fails under
CI=true and is skipped, saying why, elsewhere: never a silent skip.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastkl
from fastkl._demo import make_shard
from test_stores import bucket, s3  # noqa: F401 (fixtures: moto's S3 server on 127.0.0.1, a fresh bucket)
from fastkl.jobs.report import load_manifest, write_report
from fastkl.summary.html import heavy_tailed, quantile

MEASURES = ("kl", "reverse_kl", "js", "entropy")


def _source(root, rng, files=3, rows=1500):
    """Demo-like distillation rows (heavy-tailed kl, +inf where the student has zeros), a domain
    column, and a few invalid and null rows."""
    os.makedirs(root)
    first = 0
    for i in range(files):
        t = make_shard(rng, first, rows, vocab=32)
        p = t.column("teacher").to_pylist()
        for j in range(0, rows, 97):
            p[j] = [float("nan")] + p[j][1:]
        for j in range(5, rows, 131):
            p[j] = None
        t = t.set_column(t.schema.get_field_index("teacher"), "teacher", pa.array(p, pa.list_(pa.float32())))
        pq.write_table(t, os.path.join(root, f"shard-{i}.parquet"), row_group_size=500)
        first += rows
    return str(root)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    src = _source(tmp / "src", np.random.default_rng(7))
    dest = tmp / "scores"
    s = fastkl.run(src, dest, p="teacher", q="student", measures=MEASURES, keep=("id",), group_by="domain",
                   on_invalid="null", quiet=True)
    return tmp, dest, s


def test_report_is_one_offline_page(job):
    tmp, dest, s = job
    out = write_report(dest, tmp / "r.html")
    text = open(out, encoding="utf-8").read()
    assert len(text) < 600_000
    # nothing fetched: no script, no external link, image or font (SVG namespaces are not requests)
    assert "<script" not in text and "@import" not in text and not re.search(r"url\((?!#)", text)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", text)
    assert text.count('<svg role="img"') == len(MEASURES) * 2  # a histogram and a group plot each
    for needle in ("Measures", "Rows by status", "By domain (4 groups)", "Job", "Options", "Timings",
                   "nan", "null", "kl <span class=\"kind\">(log x: heavy-tailed)", "+inf", "chat", "math", "total", "teacher"):
        assert needle in text, needle
    m = s.measures["kl"]
    assert heavy_tailed(m) and m.inf > 0
    assert f"{m.inf:,} +inf" in text  # counted beside the plot, not drawn
    assert f"<td>{s.status_counts['nan']:,}</td>" in text  # invalid rows by reason


def test_quantiles_from_the_log_bins_are_close(job):
    _, _, s = job
    for name, m in s.measures.items():
        for q, exact in ((0.5, m.p50), (0.9, m.p90), (0.99, m.p99)):
            if exact:
                assert abs(quantile(m, q) / exact - 1) < 0.05, (name, q)


def test_cli_report_and_errors(job, tmp_path):
    tmp, dest, s = job
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fastkl.cli", "report", *map(str, args)],
                              capture_output=True, text=True, env=env)

    r = cli(dest, "--out", tmp_path / "x.html")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {tmp_path / 'x.html'}"
    r = cli(tmp_path / "nothing")
    assert r.returncode == 2 and "is not a finished fastkl output" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli(dest, "--out", dest / "inside.html")
    assert r.returncode == 2 and "inside DEST" in r.stderr and not (dest / "inside.html").exists()


def test_report_of_a_dest_in_an_object_store(tmp_path, rng):
    src = _source(tmp_path / "src", rng, files=2, rows=300)
    url = f"memory://fastkl-report-test/{os.getpid()}/scores"
    s = fastkl.run(src, url, p="teacher", q="student", measures=("kl",), on_invalid="null", quiet=True)
    assert load_manifest(url)["summary"] == s.to_dict()
    out = write_report(url, tmp_path / "store.html")
    text = open(out, encoding="utf-8").read()
    assert url in text and text.count('<svg role="img"') == 1


def test_cli_report_of_a_dest_on_s3(tmp_path, rng, s3, bucket):
    """A job to an S3 bucket (a real S3 API server on 127.0.0.1), reported by the command line in
    another process: the manifest is read with pyarrow's S3 client, endpoint from --storage-option."""
    src = _source(tmp_path / "src", rng, files=2, rows=200)
    url = f"s3://{bucket}/scores"
    s = fastkl.run(src, url, p="teacher", q="student", measures=("kl", "js"), group_by="domain",
                   on_invalid="null", quiet=True)
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "fastkl.cli", "report", url, "--storage-option",
                        f"endpoint_url={s3}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "scores-report.html"  # a URL's report goes to the current directory
    assert r.stdout.strip() == f"report: {out}"
    text = out.read_text(encoding="utf-8")
    assert url in text and f"By domain ({len(s.groups)} groups)" in text
    r = subprocess.run([sys.executable, "-m", "fastkl.cli", "report", f"s3://{bucket}/nothing", "--storage-option",
                        f"endpoint_url={s3}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "is not a finished fastkl output" in r.stderr


# --------------------------------------------------------------------------
# a real browser


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        try:
            import selenium  # noqa: F401
        except ImportError:
            pass
        else:
            return chromium, driver
    why = ("needs Debian's chromium and chromium-driver and pip's selenium "
           "(apt-get install -y chromium chromium-driver; pip install -e '.[test]')")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the browser test {why}; .ci/run installs them")
    pytest.skip(f"the browser test {why}")


def _pixels(png: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_report_renders_in_headless_chromium(job, tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    _, dest, s = job
    page = write_report(dest, tmp_path / "report.html")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        browser.set_page_load_timeout(60)
        browser.get("file://" + os.path.abspath(page))
        assert browser.title.startswith("fastkl report")
        svgs = browser.find_elements(By.CSS_SELECTOR, "svg.plot")
        assert len(svgs) == len(MEASURES) * 2
        for svg in svgs:
            label = svg.get_attribute("aria-label")
            size = svg.size
            assert size["width"] >= 400 and 120 <= size["height"] <= 900, (label, size)
            img = _pixels(svg.screenshot_as_png)
            # drawn, not blank: bars or boxes in the plots' accent colour, and axes / text in dark grey
            accent = np.all(np.abs(img.astype(int) - (59, 110, 168)) < 40, axis=2).mean()
            dark = (img.sum(axis=2) < 200).mean()
            assert accent > 0.005 and dark > 0.002, (label, accent, dark)
        kl_hist = browser.find_element(By.CSS_SELECTOR, 'svg[aria-label="histogram of kl"]')
        assert kl_hist.find_elements(By.CSS_SELECTOR, "path") and "log scale" in kl_hist.text
        # whole page, as a user scrolls through it: the test's artefact
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1280, "height": int(height), "deviceScaleFactor": 1, "mobile": False})
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png = tmp_path / "report.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        print(f"\nscreenshot of the report: {png}")
        full = _pixels(png.read_bytes())
        assert full.shape[0] == height and full.shape[1] >= 1200
        assert len(np.unique(full.reshape(-1, 3), axis=0)) > 50  # text, tables and plots, not a blank page
        logs = browser.get_log("browser")
        assert not [e for e in logs if e.get("level") in ("SEVERE", "WARNING")], logs
    finally:
        browser.quit()
    assert json.loads((dest / "_fastkl.json").read_text())["summary"]["group_by"] == "domain"


def test_log_bins_hold_each_value_between_their_edges():
    from fastkl.summary.stats import LOG_BIN_KEYS, PartStats, _keys, log_bin_edges

    rng = np.random.default_rng(3)
    x = np.concatenate([np.exp(rng.uniform(-700, 700, 200_000)), 2.0 ** np.arange(-1000, 1000),
                        np.nextafter(2.0 ** np.arange(-1000, 1000), 0)])
    lo, hi = log_bin_edges(np.floor_divide(_keys(x), LOG_BIN_KEYS))
    assert np.all((lo < x) & (x <= hi))
    # the summary's bins count every finite value once, and merge exactly
    v = np.concatenate([x[:1000], -x[1000:1500], np.zeros(7)])
    st = PartStats.from_batch(("m",), v, np.zeros(v.size, np.uint8))
    halves = PartStats.from_batch(("m",), v[:700], np.zeros(700, np.uint8)).merge(
        PartStats.from_batch(("m",), v[700:], np.zeros(v.size - 700, np.uint8)))
    bins = fastkl.Summary.from_stats(st).measures["m"].log_bins
    assert bins == fastkl.Summary.from_stats(halves).measures["m"].log_bins
    total = bins["zero"] + sum(sum(c) for name in ("pos", "neg") for _, c in bins[name])
    assert bins["zero"] == 7 and total == v.size
