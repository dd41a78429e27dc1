"""The HTML report: one self-contained page per results directory, checked in a real browser.

The results are the blog sweep's, with synthetic numbers of the program's exact shapes in place of
training (calibjax/synthetic.py): the page, its tables and every figure are drawn by the real code."""

import html
import re
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from calibjax import pipeline
from calibjax import sweep as sweep_mod
from calibjax.execution import planning, synthetic
from calibjax.storage import owned, results

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def blog(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "blog"
    sw = sweep_mod.load(REPO / "sweeps" / "blog.toml")
    layout = planning.default_layout(devices=jax.devices()[:2])
    synthetic.new_results(sw, out, layout)
    synthetic.write_chunks(sw, out, layout, diverged=0.0)
    assert not results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
    pipeline.finish(out)  # summaries, figures, report: what run and merge do
    return out


@pytest.mark.browser  # with the browser check (make test-browser, in CI): they share the results they draw
def test_the_report_holds_the_sweep_facts_summary_and_every_figure(blog):
    page = (blog / "report.html").read_text()
    figures = sorted(p.name for p in (blog / "figures").glob("*.png"))
    assert len(figures) >= 5
    assert re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page) == figures  # embedded, every one
    assert "MLP 1-64-64-2 ReLU, Adam 1e-3, batch 64" in page  # the sweep's description
    assert html.escape((REPO / "sweeps" / "blog.toml").read_text().splitlines()[0]) in page  # the sweep file
    assert "<th>final_kl</th>" in page and "<td>example3</td>" in page and "24 in the sweep; 24 ok" in page
    assert 'src="http' not in page and 'href="http' not in page  # self-contained: nothing fetched
    copy = blog.parent / "copy"
    shutil.copytree(blog, copy)
    owned.remove_results(copy)  # --overwrite removes the report with the rest calibjax wrote
    assert not (copy / "report.html").exists()


@pytest.mark.browser
def test_the_report_renders_in_chromium_with_every_figure_loaded(blog, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed; make test-browser installs Debian's package"
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    url = (blog / "report.html").as_uri()
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    n = len(list((blog / "figures").glob("*.png")))
    assert f'data-images="{n}/{n}"' in dom.stdout, dom.stderr[-2000:]  # every image decoded, none broken
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--window-size=1200,2400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
