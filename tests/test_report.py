"""The HTML report: one self-contained page per results directory, checked in a real browser.

The results are the blog sweep's, with synthetic numbers of the program's exact shapes in place of
training (calibjax/synthetic.py): the page, its tables and every figure are drawn by the real code."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from calibjax import pipeline
from calibjax import sweep as sweep_mod
from calibjax.analysis import interactive, summaries
from calibjax.analysis.report import write_report
from calibjax.execution import planning, synthetic
from calibjax.storage import owned, results

from conftest import cli, sweep_text

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


def without_plotly(page: str) -> str:
    """The page less the plotly.js it embeds (which names its web site in strings; the browser test
    checks that nothing is fetched when the page is shown)."""
    from plotly.offline import get_plotlyjs

    ours = page.replace(get_plotlyjs(), "")
    assert len(ours) < len(page) - 1_000_000
    return ours


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
    assert not re.search(r"""(src|href)=["']?https?:""", without_plotly(page))  # self-contained: nothing fetched
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


# ------------------------------------------------------------------ the interactive maps, the partial page


def _synthetic(sw, out, chunk_size, first=None):
    """A results directory of ``sw`` with synthetic chunks (the first ``first`` of them; all: None)."""
    layout = planning.default_layout(chunk_size=chunk_size, devices=jax.devices()[:2])
    synthetic.new_results(sw, out, layout)
    todo = planning.plan_chunks(sw, layout)
    for c in todo[:first]:
        result = synthetic.fake_result(c.static, len(c.run_ids), int(c.run_ids[0]))
        results.write_chunk(out, c.chunk_id, c.static, c.run_ids, c.hashes, result, layout.identity)
    return layout, todo


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """The atlas sweep (12 x 12 grid, 4 seeds) with synthetic results: final tables and summaries."""
    out = tmp_path_factory.mktemp("atlas") / "atlas"
    sw = sweep_mod.load(REPO / "sweeps" / "atlas.toml")
    layout, _ = _synthetic(sw, out, 576)
    results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
    summaries.write_summaries(out)
    return out


def expected_medians(out, metric, step):
    """The median over seeds per (mu2, sigma1) at ``step``, straight from the tables (pandas)."""
    m = pd.read_parquet(out / "metrics.parquet", columns=["run_id", "step", metric])
    runs = pd.read_parquet(out / "runs.parquet", columns=["run_id", "mu2", "sigma1"])
    m = m[m["step"] == step].merge(runs, on="run_id")
    return m.groupby(["mu2", "sigma1"])[metric].median()


def test_the_maps_hold_the_median_over_seeds_of_each_metric_at_each_checkpoint(atlas):
    data = interactive.page_data(atlas)
    axes = {a["name"]: a["values"] for a in data["axes"]}
    assert axes["mu2"] == [f"{v:g}" for v in np.linspace(0.25, 4.0, 12)] and axes["case"] == ["default"]
    names = [a["name"] for a in data["axes"]]
    agg = pd.read_parquet(atlas / "summary_by_setting.parquet")
    assert data["runs"] == agg["n_runs"].tolist() == [4] * 144
    steps = data["steps"]
    assert steps == [10, 20, 50, 100, 200, 500, 1000, 2000, 4500, 4750, 5000]
    # the page's numbers, read back as the browser reads them (NaN, Infinity: JavaScript's)
    shown = json.loads(interactive.script_data(data))
    for metric in ("kl", "max_err", "true_ece"):
        for k in (0, 5, len(steps) - 1):
            want = expected_medians(atlas, metric, steps[k])
            for i, point in enumerate(data["settings"]):
                at = {n: axes[n][j] for n, j in zip(names, point, strict=True)}
                (row,) = [v for (mu2, s1), v in want.items() if f"{mu2:g}" == at["mu2"] and f"{s1:g}" == at["sigma1"]]
                assert shown["values"][metric][i * len(steps) + k] == pytest.approx(row, rel=5e-4)
    for family, eps, column in (
        ("steps_to_kl", "0.01", "steps_to_kl_0.01"),
        ("sustained_kl_rel", "0.1", "sustained_kl_rel_0.1"),
    ):
        got = np.array(shown["timing"][family][eps], float)
        want = agg[column].to_numpy()
        assert np.array_equal(np.isinf(got), np.isinf(want)) and np.any(np.isinf(want))  # "never" stays never
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=5e-4)
    assert set(shown["timing"]) == {"steps_to_kl", "sustained_kl", "steps_to_kl_rel", "sustained_kl_rel"}


def test_the_page_embeds_plotly_and_its_data_and_fetches_nothing(atlas):
    page = write_report(atlas, to=atlas / "page.html").read_text()
    assert page.count("<script>") == 4  # plotly.js, the data, the maps' script, the image check
    assert "Plotly.react" in page and "CALIBJAX_DATA" in page and 'id="cj-map"' in page
    assert not re.search(r"""(src|href)=["']?https?:""", without_plotly(page))
    assert "</script" not in page.split("const CALIBJAX_DATA = ")[1].split(";</script>")[0]


def test_an_unfinished_sweep_gets_a_partial_report_then_the_whole_one(tmp_path):
    out = tmp_path / "atlas"
    sw = sweep_mod.load(REPO / "sweeps" / "atlas.toml")
    _synthetic(sw, out, 64, first=0)
    r = cli("report", str(out))
    assert r.returncode == 2 and r.stderr.startswith("calibjax: error: ") and "no run has finished yet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    layout, todo = _synthetic(sw, out, 64, first=3)
    manifest = (out / "manifest.json").read_bytes()
    page = pipeline.report(out, figures=False).read_text()
    done = sum(len(c.run_ids) for c in todo[:3])
    assert f"Partial: {done} of 576 runs finished ({100 * done / 576:.1f} %)" in page
    view = out / "partial"
    runs = pd.read_parquet(view / "runs.parquet")
    assert (runs["status"] != "missing").sum() == done
    assert set(pd.read_parquet(view / "metrics.parquet")["run_id"]) == set(
        np.concatenate([c.run_ids for c in todo[:3]])
    )
    assert (out / "manifest.json").read_bytes() == manifest  # the directory's own files untouched
    assert not list(out.glob("*.parquet"))
    assert "CALIBJAX_DATA" in page  # the maps too, of the finished runs
    assert {p.relative_to(out) for p in owned.results_written(out)[0]} >= {
        Path("partial/manifest.json"),
        Path("partial/metrics.parquet"),
        Path("report.html"),
    }
    for c in todo[3:]:  # the rest finishes: the whole report, and the partial view goes
        result = synthetic.fake_result(c.static, len(c.run_ids), int(c.run_ids[0]))
        results.write_chunk(out, c.chunk_id, c.static, c.run_ids, c.hashes, result, layout.identity)
    assert not results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
    pipeline.finish(out, figures=False)
    assert not view.exists() and "Partial:" not in (out / "report.html").read_text()


def test_the_refresh_spends_at_most_its_share_of_the_run(tmp_path, monkeypatch):
    now, calls = [0.0], []

    def fake_report(out, figures=True):
        calls.append(now[0])
        now[0] += 10.0  # each refresh takes 10 s

    monkeypatch.setattr(pipeline, "report", fake_report)
    refresh = pipeline.Refresher(tmp_path, minutes=1.0, clock=lambda: now[0])
    for _ in range(2000):  # a chunk every 30 s for about 17 hours
        now[0] += 30.0
        refresh()
    assert calls[0] == 60.0  # the first once a minute has passed
    for k, t in enumerate(calls[1:], 1):  # each later one ends within 2 % of the run so far
        assert 10.0 * (k + 1) <= pipeline.REFRESH_SHARE * (t + 10.0)
    assert 10.0 * len(calls) >= 0.9 * pipeline.REFRESH_SHARE * now[0]  # and about that often: not starved
    assert min(np.diff(calls)) >= 60.0


@pytest.mark.browser
def test_the_maps_draw_hover_and_redraw_in_chromium(atlas, blog):
    """Driven through the DevTools protocol (Playwright, Debian's chromium): no console error, no
    request leaves the page, every plot draws, hovering shows a cell's value, and each selector
    redraws the map with the tables' numbers."""
    from playwright.sync_api import sync_playwright

    page_path = write_report(atlas, to=atlas / "report.html")
    steps = interactive.page_data(atlas)["steps"]
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS[1:])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        draws = lambda n: page.wait_for_function(f"document.body.dataset.interactive === '{n}'")  # noqa: E731
        heatmap = lambda: np.array(page.evaluate("document.getElementById('cj-map').data[0].z"), float)  # noqa: E731
        page.goto(page_path.as_uri())
        draws(1)
        for plot in ("cj-map", "cj-curves"):
            assert page.locator(f"#{plot} .main-svg").count() >= 1, plot
        assert page.locator("#cj-map .hm image").count() == 1  # the heatmap's cells, drawn
        assert page.locator("#cj-curves .scatterlayer .trace").count() == 12  # a line per mu2 (the x axis)

        def check(metric, k):  # the map: mu2 across, sigma1 down, log10 of the medians
            names = page.evaluate(
                "[document.getElementById('cj-map').layout.xaxis.title.text,"
                "document.getElementById('cj-map').layout.yaxis.title.text]"
            )
            want = expected_medians(atlas, metric, steps[k]).unstack(names[0])  # rows: the y axis
            np.testing.assert_allclose(heatmap(), np.log10(want.to_numpy()), atol=3e-4)

        assert page.input_value("#cj-x") != page.input_value("#cj-y")
        check("kl", len(steps) - 1)
        page.select_option("#cj-metric", "max_err")
        draws(2)
        check("max_err", len(steps) - 1)
        page.select_option("#cj-checkpoint", "3")
        draws(3)
        check("max_err", 3)
        page.select_option("#cj-metric", "steps_to_kl")
        draws(4)
        assert page.is_visible("#cj-threshold") and not page.is_visible("#cj-checkpoint")
        z = heatmap()
        agg = pd.read_parquet(atlas / "summary_by_setting.parquet")
        assert np.isnan(z).sum() == np.isinf(agg["steps_to_kl_0.01"]).sum()  # "never": no colour
        page.locator("#cj-map").scroll_into_view_if_needed()
        box = page.locator("#cj-map .nsewdrag").first.bounding_box()
        r, c = np.argwhere(np.isfinite(z))[len(np.argwhere(np.isfinite(z))) // 2]  # a cell reached (row 0: bottom)
        rows, cols = z.shape
        page.mouse.move(
            box["x"] + (c + 0.5) * box["width"] / cols, box["y"] + box["height"] - (r + 0.5) * box["height"] / rows
        )
        page.wait_for_selector("#cj-map .hovertext")
        hover = page.locator("#cj-map .hovertext").first.text_content()
        assert "steps to kl 0.01: " in hover and "4 runs" in hover, hover
        assert float(hover.split("steps to kl 0.01: ")[1].split("4 runs")[0]) == pytest.approx(10 ** z[r, c], rel=1e-3)
        page.mouse.down()  # a click on that cell: the curves of its row
        page.mouse.up()
        draws(5)
        y_axis = page.evaluate("document.getElementById('cj-map').layout.yaxis.title.text")
        row = page.evaluate(f"document.getElementById('cj-map').data[0].y[{r}]")
        title = page.evaluate("document.getElementById('cj-curves').layout.title.text")
        assert title == f"kl against step at {y_axis} = {row} (median over seeds)", title
        x_axis = page.evaluate("document.getElementById('cj-map').layout.xaxis.title.text")
        first = page.evaluate("document.getElementById('cj-map').data[0].x[0]")
        curve = page.evaluate("document.getElementById('cj-curves').data[0].y")
        for step, shown in zip(steps, curve, strict=True):  # (every checkpoint is past step 0 here)
            want = expected_medians(atlas, "kl", step).reset_index()
            at = (want[x_axis].map("{:g}".format) == first) & (want[y_axis].map("{:g}".format) == row)
            assert shown == pytest.approx(want.loc[at, "kl"].item(), rel=5e-4)

        page.goto((blog / "report.html").as_uri())  # one axis (the case): a line, and curves per case
        draws(1)
        assert page.evaluate("document.getElementById('cj-map').data[0].type") == "scatter"
        assert page.locator("#cj-curves .scatterlayer .trace").count() == 3
        browser.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


@pytest.mark.slow
def test_run_writes_the_partial_report_while_it_trains(tmp_path, monkeypatch):
    path = tmp_path / "tiny.toml"
    path.write_text(sweep_text(seeds=6))
    seen, real = [], pipeline.report

    def spy(out, figures=True):  # the real report, read as soon as it is written
        seen.append(real(out, figures).read_text())
        return out / "report.html"

    monkeypatch.setattr(pipeline, "report", spy)
    out = tmp_path / "out"
    done = pipeline.run(path, out, chunk_size=2, inner_batch=2, quiet=True, refresh_minutes=1e-9)
    assert done.complete and done.trained == 6
    assert seen and "Partial: 2 of 6 runs finished (33.3 %)" in seen[0]  # after the first chunk
    page = (out / "report.html").read_text()
    assert "Partial:" not in page and "CALIBJAX_DATA" in page and not (out / "partial").exists()
