"""Lazy expansion: cases x grid points x seeds, made from a run's index when needed.

Grid axes over an independent setting (``schema.INDEPENDENT``, or a task mean or sigma set by
address) change no static setting and no other check; the other axes, with the case, form blocks
(``Block``), each resolved once. The groups (compiled programs), the runs table and the run
identities follow from the blocks by index arithmetic, so a sweep of millions of runs costs what
its distinct settings cost.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibjax.core import train
from calibjax.sweep import identity
from calibjax.sweep.resolve import Run, apply_addresses, resolve, static_of
from calibjax.sweep.schema import SETTINGS


@dataclass(frozen=True)
class Axis:
    """One [grid] axis: its key, checked values and where it was set. An independent axis (a
    setting in INDEPENDENT, or a task mean or sigma set by address) changes no static setting and
    is checked value by value, so the runs along it are made by index arithmetic, not resolved one
    by one."""

    key: str
    values: tuple
    where: str
    independent: bool


# Grid axes over these settings, and over task entries mu*/sigma*, are independent (Axis): no


@dataclass
class Block:
    """One case with one value of every coupled (not independent) grid axis, resolved with the
    independent axes at their first values: what every point of the block shares."""

    run: Run
    base_task: dict[str, np.ndarray]  # task arrays before entries set by address
    addresses: tuple[tuple[str, Any, str], ...]  # (address, value, where), in the order applied


class Runs(Sequence):
    """A sweep's runs, made on demand from their index (a million-run sweep is never held as objects)."""

    def __init__(self, sw: Sweep):
        self._sw = sw

    def __len__(self) -> int:
        return self._sw.n_runs

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._sw.run(j) for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"run {i} of {len(self)}")
        return self._sw.run(i)


class Sweep:
    """A parsed, checked sweep: cases x grid points x seeds, in file order (seeds innermost, the
    last grid axis fastest). Nothing is expanded up front: a run is made from its index, and the
    groups (compiled programs) and the runs table by index arithmetic over blocks (``Block``)."""

    def __init__(
        self,
        name: str,
        path: str,
        text: str,
        base: dict,
        origin: dict,
        cases: list[tuple[str, dict]],
        axes: list[Axis],
        seeds: list[int],
    ):
        self.name, self.path, self.text = name, path, text
        self.base, self.origin, self.cases, self.axes, self.seeds = base, origin, cases, axes, seeds
        self.sizes = np.array([len(a.values) for a in axes], np.int64)
        self.coupled = [a for a, ax in enumerate(axes) if not ax.independent]
        self.independent = [a for a, ax in enumerate(axes) if ax.independent]
        self.n_grid = math.prod(len(a.values) for a in axes)
        self.n_points = len(cases) * self.n_grid
        self.n_runs = self.n_points * len(seeds)
        self.n_blocks = len(cases) * math.prod(len(axes[a].values) for a in self.coupled)
        self.block = functools.lru_cache(maxsize=4096)(self._block)
        self._hashes: list[str] | None = None  # every run's identity, once asked for (``hashes``)
        self.runs = Runs(self)

    @property
    def sha256(self) -> str:
        """Hash of the sweep's content: the parsed document, so comments, spacing and key order
        within a table do not count (an edited comment is the same sweep)."""
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError:
            doc = self.text
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    # ------------------------------------------------------------ index arithmetic

    def digits(self, points) -> tuple[np.ndarray, np.ndarray]:
        """Case index and per-axis value index (one row per axis) of grid points (an int or an array)."""
        p = np.asarray(points, np.int64)
        case, rest = np.divmod(p, self.n_grid)
        digits = np.zeros((len(self.axes),) + p.shape, np.int64)
        for a in reversed(range(len(self.axes))):
            rest, digits[a] = np.divmod(rest, self.sizes[a])
        return case, digits

    def _point(self, p: int) -> tuple[int, list[int], int]:
        """Case, per-axis value indices and block of one grid point (plain integers: no arrays)."""
        case, rest = divmod(int(p), self.n_grid)
        digits = [0] * len(self.axes)
        for a in reversed(range(len(self.axes))):
            rest, digits[a] = divmod(rest, len(self.axes[a].values))
        b = case
        for a in self.coupled:
            b = b * len(self.axes[a].values) + digits[a]
        return case, digits, b

    def block_of(self, points, digits=None) -> np.ndarray:
        """The blocks (case x coupled axis values, numbered in order of first appearance) of grid
        points (``digits``: what ``digits(points)`` gives, if at hand)."""
        case, digits = digits or self.digits(points)
        b = case
        for a in self.coupled:
            b = b * self.sizes[a] + digits[a]
        return b

    def _settings(self, case: int, digits) -> tuple[str, dict, dict]:
        """The unresolved settings of a case at grid value indices ``digits``: base, case, grid."""
        name, overrides = self.cases[case]
        settings, origin = dict(self.base), dict(self.origin)
        for key, (v, where) in overrides.items():
            settings[key], origin[key] = v, where
        for ax, d in zip(self.axes, digits, strict=True):
            settings[ax.key], origin[ax.key] = ax.values[int(d)], ax.where
        return name, settings, origin

    def _block(self, b: int) -> Block:
        digits, rest = [0] * len(self.axes), int(b)
        for a in reversed(self.coupled):
            rest, digits[a] = divmod(rest, len(self.axes[a].values))
        name, settings, origin = self._settings(rest, digits)
        run, base_task, addresses = resolve(settings, origin, self.path + ":")
        run.case = name
        return Block(run, base_task, addresses)

    def point(self, p: int) -> Run:
        """Grid point p (cases x grid, in file order), resolved; seed 0."""
        _, digits, b = self._point(p)
        blk = self.block(b)
        if not self.independent:
            return blk.run
        settings, by_address = dict(blk.run.settings), {}
        for a in self.independent:
            ax = self.axes[a]
            if ax.key in SETTINGS:
                settings[ax.key] = ax.values[digits[a]]
            else:
                by_address[ax.key] = ax.values[digits[a]]
        task = blk.run.task
        if by_address:
            task = {k: v.copy() for k, v in blk.base_task.items()}
            apply_addresses(
                {k: by_address.get(k, v) for k, v, _ in blk.addresses}, {k: w for k, _, w in blk.addresses}, task
            )
        return Run(blk.run.case, 0, settings, blk.run.origin, task)

    def run(self, i: int) -> Run:
        p, s = divmod(int(i), len(self.seeds))
        r = self.point(p)
        return Run(r.case, self.seeds[s], r.settings, r.origin, r.task)

    # ------------------------------------------------------------ groups and identities

    @functools.cached_property
    def block_groups(self) -> tuple[list[train.Static], np.ndarray]:
        """Distinct static settings (one compile each) in order of first appearance, and each
        block's group index."""
        statics: dict[train.Static, int] = {}
        of_block = [statics.setdefault(static_of(self.block(b).run), len(statics)) for b in range(self.n_blocks)]
        return list(statics), np.asarray(of_block, np.int64)

    @functools.cached_property
    def point_groups(self) -> np.ndarray:
        """Each grid point's group index."""
        return self.block_groups[1][self.block_of(np.arange(self.n_points))]

    @property
    def groups(self) -> tuple[list[train.Static], np.ndarray]:
        """Distinct static settings in order of first appearance, and each run's group index."""
        return self.block_groups[0], np.repeat(self.point_groups, len(self.seeds))

    def group_runs(self, g: int, run_ids=None) -> np.ndarray:
        """The run_ids of group g (those among ``run_ids``, if given), ascending."""
        s = len(self.seeds)
        if run_ids is None:
            points = np.flatnonzero(self.point_groups == g)
            return (points[:, None] * s + np.arange(s)).reshape(-1)
        ids = np.asarray(run_ids, np.int64)
        return ids[self.point_groups[ids // s] == g]

    def _hash_parts(self, p: int) -> tuple[str, str]:
        statics, of_block = self.block_groups
        return identity.hash_parts(self.point(p), identity.static_json(statics[of_block[self._point(p)[2]]]))

    def run_hashes(self, run_ids) -> list[str]:
        """The identities of some runs: from ``hashes`` if computed already, else each point's parts once."""
        if self._hashes is not None:
            return [self._hashes[i] for i in run_ids]
        parts = functools.lru_cache(maxsize=64)(self._hash_parts)
        s = len(self.seeds)
        return [identity.sha(*parts(int(i) // s), seed=self.seeds[int(i) % s]) for i in run_ids]

    @property
    def hashes(self) -> list[str]:
        """Each run's identity: a hash of its resolved settings (everything that fixes its numbers
        besides the numbers identity a results directory checks). Runs of two sweep files with the
        same hash are the same run, whatever their run_id, case name or the files' comments.
        Computed for every run on first use, then kept."""
        if self._hashes is None:
            out = []
            for p in range(self.n_points):
                parts = self._hash_parts(p)
                out.extend(identity.sha(*parts, seed=seed) for seed in self.seeds)
            self._hashes = out
        return self._hashes

    def plot_steps(self) -> dict[str, list[int]]:
        """Each case's plot_steps (those of its last block)."""
        per_case = self.n_blocks // len(self.cases)
        return {
            name: self.block((c + 1) * per_case - 1).run.settings["plot_steps"]
            for c, (name, _) in enumerate(self.cases)
        }
