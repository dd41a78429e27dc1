"""Reading a sweep file: TOML in, a checked ``Sweep`` out (every run checked before anything
trains or is written)."""

from __future__ import annotations

import json
import math
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from calibjax.sweep.expand import Axis, Sweep
from calibjax.sweep.resolve import resolve
from calibjax.sweep.schema import MAX_RUNS, REMOVED, SECTIONS, SETTINGS, TOP_LEVEL, is_independent
from calibjax.sweep.validate import SweepError, check_setting, check_value, grid_values, seeds_of

MAX_SWEEP_BYTES = 1 << 20


def load(path: str | Path, max_runs: int = MAX_RUNS) -> Sweep:
    """Read, validate and expand a sweep file."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # (/dev/zero, a FIFO: never read, never waited on)
            raise SweepError(f"{path}: not a regular file; a sweep file is a TOML text file")
        if st.st_size > MAX_SWEEP_BYTES:
            raise SweepError(
                f"{path}: {st.st_size:,} bytes; a sweep file is at most {MAX_SWEEP_BYTES:,} bytes "
                "(grids are ranges and lists, not one line per run)"
            )
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SweepError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not UTF-8 text (byte {e.start}); save the sweep file as UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, str(path), text, default_name=path.stem, max_runs=max_runs)


def parse(
    doc: dict, path: str = "<sweep>", text: str = "", default_name: str = "sweep", max_runs: int = MAX_RUNS
) -> Sweep:
    """A parsed TOML document -> a checked Sweep (every run checked; nothing computed or written)."""
    f = path + ":"
    for key in doc:
        if key not in TOP_LEVEL:
            raise SweepError(f"{f} unknown key {key!r} at top level; expected one of {', '.join(TOP_LEVEL)}")
    name = _name(doc.get("name", default_name), f)
    seeds = seeds_of(doc.get("seeds", 1), f, max_runs)
    base, origin = _sections(doc, f)
    cases = _cases(doc.get("cases", {"default": {}}), f)
    axes = _axes(doc.get("grid", {}), f, max_runs)
    n_runs = len(cases) * math.prod(len(a.values) for a in axes) * len(seeds)
    if n_runs > max_runs:
        raise SweepError(
            f"{f} {len(cases)} case(s) x "
            f"{' x '.join(str(len(a.values)) for a in axes) or '1'} grid "
            f"point(s) x {len(seeds)} seed(s) = {n_runs:,} runs, more than the {max_runs:,} a sweep "
            "may have; split it, or raise the limit with --max-runs"
        )
    sw = Sweep(name, path, text, base, origin, list(cases.items()), axes, seeds)
    _check_all(sw)
    return sw


def _name(name, f: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise SweepError(
            f"{f} name: expected letters, digits, '_', '-' or '.', starting with a letter, digit or "
            f"'_' (results go to results/<name>), got {name!r}"
        )
    return name


def _sections(doc: dict, f: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of [task], [model], [train] and [eval], checked, and where each was set."""
    base: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section in SECTIONS:
        table = doc.get(section, {})
        where = f"{f} [{section}]"
        if not isinstance(table, dict):
            raise SweepError(f"{where}: expected a table of settings")
        for key, v in table.items():
            if key in REMOVED:
                raise SweepError(f"{where} {key}: {REMOVED[key]}")
            if key not in SETTINGS or SETTINGS[key].section != section:
                home = f" (it belongs in [{SETTINGS[key].section}])" if key in SETTINGS else ""
                known = ", ".join(k for k, s in SETTINGS.items() if s.section == section)
                raise SweepError(f"{where} unknown key {key!r}{home}; known: {known}")
            base[key] = check_value(key, SETTINGS[key].kind, v, where)
            origin[key] = where
    return base, origin


def _cases(cases, f: str) -> dict[str, dict]:
    """Each [cases.NAME] table's settings, checked: name -> {key: (value, where)}."""
    if not isinstance(cases, dict) or not cases or not all(isinstance(c, dict) for c in cases.values()):
        raise SweepError(f"{f} [cases]: expected one or more [cases.NAME] tables")
    out = {}
    for name, table in cases.items():
        where = f"{f} [cases.{name}]"
        out[name] = {k: (check_setting(k, v, where), where) for k, v in table.items()}
    return out


def _axes(grid, f: str, max_runs: int) -> list[Axis]:
    """The [grid] axes, each value checked, none repeated (two equal values would be the same runs)."""
    if not isinstance(grid, dict):
        raise SweepError(f"{f} [grid]: expected a table of setting = values")
    where, axes = f"{f} [grid]", []
    for key, spec in grid.items():
        raws = grid_values(key, spec, where, max_runs)
        values = tuple(check_setting(key, v, where) for v in raws)
        seen = {}
        for raw, v in zip(raws, values, strict=True):
            canonical = _canonical(v)
            if canonical in seen:
                first = seen[canonical]
                same = "" if raw == first else f" (as {first!r}, once checked in float32, as runs train)"
                raise SweepError(
                    f"{where} {key}: the value {raw!r} is given twice{same}: those grid points would train the "
                    "same runs; give each value once"
                )
            seen[canonical] = raw
        axes.append(Axis(key, values, where, is_independent(key)))
    return axes


def _canonical(value) -> str:
    """A value as a key: equal settings, equal keys (numbers compared after their check, floats as
    the float32 they train as: 0.1 and 0.1000000001 would train the same runs)."""

    def float32(v):
        if isinstance(v, float):
            return float(np.float32(v))
        if isinstance(v, (list, tuple)):
            return [float32(x) for x in v]
        if isinstance(v, dict):
            return {k: float32(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return float32(v.tolist())
        return v

    return json.dumps(float32(value), sort_keys=True, default=lambda a: np.asarray(a).tolist())


def _check_all(sw: Sweep) -> None:
    """Every run is checked before anything trains, without resolving every run: each block (case
    x coupled grid values) is resolved, and each value of an independent axis once (in the first
    block): the checks of an independent setting depend on nothing else."""
    _ = sw.block_groups  # resolves every block
    _distinct_cases(sw)
    for a in sw.independent:
        for d in range(1, len(sw.axes[a].values)):
            digits = [0] * len(sw.axes)
            digits[a] = d
            resolve(*sw._settings(0, digits)[1:], sw.path + ":")


def _distinct_cases(sw: Sweep) -> None:
    """Two cases with the same settings (once the grid has set its keys in both) would train the same
    runs: refused, naming them. The grid sets the same values in every case, so comparing each
    case's first grid point decides it for all."""
    seen = {}
    firsts = sw.run_hashes([c * sw.n_grid * len(sw.seeds) for c in range(len(sw.cases))])
    for (name, _), first in zip(sw.cases, firsts, strict=True):
        if first in seen:
            raise SweepError(
                f"{sw.path}: [cases.{seen[first]}] and [cases.{name}] have the same settings (every run of one "
                "would repeat a run of the other); remove one or make them differ"
            )
        seen[first] = name
