"""The documentation: every link in README.md and docs/ resolves (the file exists, and so does the
heading an anchor names), the README stays short enough to read, and its sweep examples parse."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from calibjax import sweep

from conftest import sweep_doc, to_toml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    fence, found = False, set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```[\s\S]*?```", "", page.read_text())
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)


def test_the_link_check_would_see_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## A b, c\n\n[x](#a-b-c) [y](#nope) [z](missing.md) ![f](p.md#title)\n")
    assert anchors(page) == {"title", "a-b-c"}
    assert links(page) == ["#a-b-c", "#nope", "missing.md", "p.md#title"]


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 400


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_sweep_examples_in_the_docs_parse(page):
    blocks = re.findall(r"```toml\n([\s\S]*?)```", page.read_text())
    for text in blocks:
        doc = tomllib.loads(text)
        if "task" in doc or "cases" in doc:
            sw = sweep.parse(doc, page.name, text)
            assert len(sw.runs) >= 1


@pytest.mark.slow
def test_the_readmes_python_api_runs(tmp_path):
    """The README's Python block, on a small sweep with the blog's case names: every call it shows
    exists and does what it says (tables written, read back whole and in part, one run by hand)."""
    block = re.search(r"## Python API[\s\S]*?```python\n([\s\S]*?)```", (ROOT / "README.md").read_text()).group(1)
    small = to_toml(
        sweep_doc(
            name="small",
            cases={"example1": {}, "example3": {"sigma1": 3.0}},
            train={"steps": 40, "checkpoints": [10, 40]},
        )
    )
    (tmp_path / "small.toml").write_text(small)
    code = (
        block.replace('"sweeps/blog.toml"', repr(str(tmp_path / "small.toml")))
        .replace('"results/blog"', repr(str(tmp_path / "out")))
        .replace("50000", "40")
    )
    code += "\nassert len(last) > 0 and set(t) >= {'runs', 'metrics', 'summary'}\n"
    code += "assert out.checkpoints.scalars.kl.shape == (3,)\n"
    code += "assert median_kl.dims == ('case', 'step') and float(median_kl.sel(case='example1', step=40)) > 0\n"
    code += "assert (report.out / 'report.html').exists() and report.complete\nprint('ok')\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CALIBJAX_CPU_DEVICES": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
