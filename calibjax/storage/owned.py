"""What calibjax wrote in a results directory, by its own records: what ``--overwrite`` removes.

Nothing is removed because of its name pattern (a user's own PNG in figures/ stays), nothing
reached through a symbolic link, and everything is decided before anything is deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from calibjax.storage.chunks import read_info
from calibjax.storage.files import CHUNK_ID, FINAL_FILES, SHARD_PART, write_json

FIGURE_RECORD = ".calibjax-figures.json"  # in DIR/figures: the names of the figures calibjax drew there


def record_figures(out: Path, paths) -> None:
    """Note in DIR/figures which of ``paths`` calibjax drew there: ``--overwrite`` removes exactly
    these, never a file because of its name pattern (a user's own PNG stays)."""
    d = Path(out) / "figures"
    if d.is_symlink() or not d.is_dir():
        return
    names, known = {Path(p).name for p in paths if Path(p).parent == d}, set(recorded_figures(d))
    if names - known:
        write_json(d / FIGURE_RECORD, sorted(known | names))


def recorded_figures(d: Path) -> list[str]:
    try:
        names = json.loads((d / FIGURE_RECORD).read_text())
        return [n for n in names if isinstance(n, str) and "/" not in n] if isinstance(names, list) else []
    except (OSError, ValueError):
        return []


def _own_file(p: Path) -> bool:
    """A regular file (not a symlink, which calibjax never writes)."""
    return p.is_file() and not p.is_symlink()


def _own_chunk(d: Path) -> bool:
    """A chunk directory calibjax wrote: a real directory (not a symlink) holding exactly its
    chunk.json and the tables that lists, each a regular file (damaged or not)."""
    if d.is_symlink() or not d.is_dir() or not CHUNK_ID.match(d.name):
        return False
    info = read_info(d)
    names = info.get("tables") if info else None
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
        return False
    expected = {"chunk.json", *(f"{name}.parquet" for name in names)}
    return {f.name for f in d.iterdir()} == expected and all(_own_file(d / n) for n in expected)


def results_written(out: Path) -> tuple[list[Path], list[Path]]:
    """What calibjax wrote in a results directory and ``--overwrite`` removes: files (final tables,
    recorded figures and their record, report.html, manifests) and finished chunk directories.
    Nothing reached through a symbolic link, nothing of a name calibjax's records do not list."""
    out = Path(out)
    remove, trees = [], []
    shards = out / "shards"
    parts = [out] + (
        [p for p in shards.iterdir() if SHARD_PART.match(p.name) and not p.is_symlink()]
        if shards.is_dir() and not shards.is_symlink()
        else []
    )
    for part in parts:
        chunks = part / "chunks"
        if chunks.is_dir() and not chunks.is_symlink():
            trees += [d for d in chunks.iterdir() if _own_chunk(d)]
        remove.append(part / "manifest.json")
    remove += [out / f"{name}.parquet" for name in FINAL_FILES] + [out / "report.html"]
    figures = out / "figures"
    if figures.is_dir() and not figures.is_symlink():
        remove += [figures / n for n in recorded_figures(figures)] + [figures / FIGURE_RECORD]
    return [p for p in remove if _own_file(p)], sorted(trees)


def remove_results(out: Path) -> None:
    """Delete what calibjax wrote in a results directory (``results_written``: decided in full
    before anything is deleted). Anything else stays; so does a folder left non-empty."""
    out = Path(out)
    remove, trees = results_written(out)
    for d in trees:
        shutil.rmtree(d)
    for p in remove:
        p.unlink(missing_ok=True)
    for part in [*(p for p in out.glob("shards/*") if SHARD_PART.match(p.name) and not p.is_symlink()), out]:
        _rmdir_if_empty(part / "chunks")
        if part != out:
            _rmdir_if_empty(part)
    for d in (out / "shards", out / "figures"):
        _rmdir_if_empty(d)


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass
