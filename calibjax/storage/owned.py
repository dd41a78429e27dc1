"""What calibjax wrote in a results directory, by its own records: what ``--overwrite`` removes.

Nothing is removed because of its name pattern (a user's own PNG in figures/ stays), nothing
reached through a symbolic link, and everything is decided before anything is deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from calibjax.storage.chunks import read_info
from calibjax.storage.files import CHUNK_ID, FINAL_FILES, PARTIAL, SHARD_PART, write_json

# In a folder calibjax writes files into beside a user's (DIR/figures, an export folder): the names
# it wrote there, each with the generation of the final tables it was made from (files.GENERATION).
FIGURE_RECORD = ".calibjax-figures.json"  # (a plain list of names before 0.11.0)
EXPORT_RECORD = ".calibjax-exports.json"


def record(d: Path, record_name: str, paths, generation: str | None, replace: bool = False) -> None:
    """Note in the folder ``d`` which of ``paths`` calibjax wrote there, from which generation of
    the tables (``replace``: these and no others any more): ``--overwrite`` removes exactly these,
    never a file because of its name pattern (a user's own PNG stays), and the report shows only
    figures drawn from the current tables."""
    if d.is_symlink() or not d.is_dir():
        return
    known = {} if replace else recorded(d, record_name)
    made = {Path(p).name: generation for p in paths if Path(p).parent == d}
    if replace or any(known.get(name, "") != g for name, g in made.items()):
        write_json(d / record_name, {"files": dict(sorted({**known, **made}.items()))})


def recorded(d: Path, record_name: str) -> dict[str, str | None]:
    """What calibjax wrote in the folder ``d``, by its record: name -> generation made from."""
    try:
        names = json.loads((d / record_name).read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(names, dict):
        names = names.get("files", {})
    made = names if isinstance(names, dict) else dict.fromkeys(names, None) if isinstance(names, list) else {}
    return {n: g for n, g in made.items() if isinstance(n, str) and "/" not in n and n not in (".", "..")}


def record_figures(out: Path, paths, generation: str | None) -> None:
    record(Path(out) / "figures", FIGURE_RECORD, paths, generation)


def recorded_figures(d: Path) -> dict[str, str | None]:
    return recorded(d, FIGURE_RECORD)


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
    recorded figures and exports and their records, report.html, manifests) and chunk directories.
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
    for folder, record_name in ((out / "figures", FIGURE_RECORD), (out / "export", EXPORT_RECORD)):
        if folder.is_dir() and not folder.is_symlink():
            made = [folder / n for n in recorded(folder, record_name)]
            remove += [p for p in made if not p.is_dir()] + [folder / record_name]
            trees += [p for p in made if p.is_dir() and not p.is_symlink()]  # (zarr stores)
    view = out / PARTIAL  # (the finished runs' view of an unfinished sweep: a results directory of its own)
    if view.is_dir() and not view.is_symlink():
        more, more_trees = results_written(view)
        remove, trees = remove + more, trees + more_trees
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
    for d in (out / "shards", out / PARTIAL / "figures", out / PARTIAL, out / "figures", out / "export"):
        if not d.parent.is_symlink():
            _rmdir_if_empty(d)


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def remove_partial(out: Path) -> None:
    """Delete the partial view of a results directory (what calibjax wrote in ``DIR/partial``, as
    ``remove_results`` decides), once the directory's own tables hold every run."""
    view = Path(out) / PARTIAL
    if view.is_dir() and not view.is_symlink():
        remove_results(view)
        _rmdir_if_empty(view)
