"""The documentation: every link in README.md and docs/ resolves (the file exists, and so does the
heading an anchor names), the README stays short enough to read, and its sweep examples parse."""

import re
import tomllib
from pathlib import Path

import pytest

from calibjax import sweep

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
