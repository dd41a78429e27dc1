"""The sweep files shipped with calibjax (``calibjax.sweeps``): find one by name, list them, copy one."""

from __future__ import annotations

import sys
import tomllib
from importlib import resources
from pathlib import Path

from calibjax.sweep.parsing import parse
from calibjax.sweep.validate import SweepError


def shipped_files() -> dict:
    """The files shipped in calibjax.sweeps, by name (importlib.resources Traversables)."""
    return {p.name: p for p in resources.files("calibjax.sweeps").iterdir() if p.name.endswith((".toml", ".sh"))}


def find(text: str) -> str:
    """A sweep file argument: a path, or else the name of a shipped sweep (blog, grid_2000, ...),
    said on stderr; anything else is returned as given (``load`` says it cannot be read)."""
    if Path(text).exists():
        return text
    files = shipped_files()
    name = text if text.endswith(".toml") else f"{text}.toml"
    if "/" not in text and name in files:
        print(
            f"calibjax: {text}: not a file here; using the shipped sweep {name} (calibjax init "
            f"{name[:-5]} copies it to edit)",
            file=sys.stderr,
        )
        return str(files[name])
    return text


def listing() -> list[tuple[str, int, str]]:
    """Each shipped sweep: its name, its number of runs and what it is about (its description, or
    its first comment line)."""
    rows = []
    for name, path in sorted(shipped_files().items()):
        if not name.endswith(".toml"):
            continue
        text = path.read_text()
        doc = tomllib.loads(text)
        about = doc.get("description") or next(
            (line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), ""
        )
        rows.append((name[:-5], len(parse(doc, name, text).runs), about))
    return rows


def copy(name: str, to: str | Path = ".") -> Path:
    """Copy a shipped file (a sweep, or slurm_array.sh) into the directory ``to``; never overwrites."""
    files = shipped_files()
    name = name if name in files else f"{name}.toml"
    if name not in files:
        shown = ", ".join(sorted(n.removesuffix(".toml") for n in files))
        raise SweepError(f"init {name.removesuffix('.toml')}: no such shipped sweep; shipped: {shown}")
    target = Path(to) / name
    if target.exists():
        raise SweepError(f"{target}: exists already; calibjax init never overwrites a file (use --to DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(files[name].read_text())
    if name.endswith(".sh"):
        target.chmod(0o755)
    return target
