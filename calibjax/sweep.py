"""Sweep files: parse, validate, expand into one row per run.

A sweep is TOML (the format is documented in README.md). Settings live in
sections ([task], [model], [train], [eval]); named cases ([cases.NAME]) and a
cartesian [grid] override any setting by its bare name, and single task
entries by address (mu2, sigma1_k2_d1, prior1, weight3_k2). Cases x grid x
seeds expand, in file order, into runs with sequential run_ids.

Expansion is lazy, so a sweep of millions of runs costs what its distinct settings cost: a run
is made from its run_id when needed. Grid axes over a task mean or sigma, lr, weight_decay,
momentum, final_lr_ratio, lr_schedule or n_data are independent (``INDEPENDENT``): no static
setting and no other check depends on them. The other axes, with the case, form blocks
(``Block``), each resolved once; the groups (compiled programs), the runs table and the run
identities follow from the blocks by index arithmetic.

Every user mistake raises ``SweepError`` naming the file, the key and the
problem, before anything is computed or written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import operator
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibjax import losses, metrics, model, portable, tasks, train


class SweepError(ValueError):
    """A mistake in a sweep file; the message names the file, the key and what is wrong."""


def _field_default(cls, name: str):
    """A dataclass field's default: the one place each default is written."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _arg_default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


_static = functools.partial(_field_default, train.Static)
_eval = functools.partial(_field_default, metrics.EvalSpec)
_dynamic = functools.partial(_arg_default, train.make_dynamic)


@dataclass(frozen=True)
class Setting:
    section: str
    default: Any  # REQUIRED: no default
    kind: str  # which validator checks a value (VALIDATORS)


MAX_SAMPLE = 1_000_000  # largest labelled sample of the estimator benchmark (its memory grows with it)
MAX_RUNS = 10_000_000  # a sweep with more runs is refused before it is expanded (--max-runs raises it)
REQUIRED = object()
SETTINGS: dict[str, Setting] = {
    name: Setting(*spec)
    for name, spec in {
        "means": ("task", REQUIRED, "means"),
        "sigmas": ("task", REQUIRED, "sigmas"),
        "priors": ("task", None, "priors"),  # None: equal priors
        "weights": ("task", None, "class_weights"),  # None: equal component weights
        "hidden": ("model", list(_static("hidden")), "widths"),
        "width": ("model", None, "pos_int"),  # with depth: hidden = [width] * depth
        "depth": ("model", None, "nonneg_int"),
        "activation": ("model", _static("activation"), "activation"),
        "init": ("model", _static("init"), "init"),
        "optimizer": ("train", _static("optimizer"), "optimizer"),
        "loss": ("train", _static("loss"), "loss"),
        "label_smoothing": ("train", _dynamic("label_smoothing"), "smoothing"),
        "focal_gamma": ("train", _dynamic("focal_gamma"), "focal_gamma"),
        "lr": ("train", _dynamic("lr"), "pos_float"),
        "lr_schedule": ("train", _dynamic("lr_schedule"), "lr_schedule"),
        "warmup_steps": ("train", _dynamic("warmup_steps"), "nonneg_int"),
        "final_lr_ratio": ("train", _dynamic("final_lr_ratio"), "unit_float"),
        "ema_decay": ("train", _dynamic("ema_decay"), "decay"),
        "proposal_scale": ("train", _dynamic("proposal_scale"), "proposal_scale"),
        "weight_decay": ("train", _dynamic("weight_decay"), "nonneg_float"),
        "momentum": ("train", _dynamic("momentum"), "momentum"),
        "batch_size": ("train", _static("batch_size"), "pos_int"),
        "n_data": ("train", _dynamic("n_data"), "n_data"),
        "matmul_precision": ("train", _static("matmul_precision"), "precision"),
        "steps": ("train", REQUIRED, "pos_int"),
        "checkpoints": ("train", None, "checkpoints"),  # None: 10, 20, 50, ..., then 0.9, 0.95 x steps and steps
        "points": ("eval", _eval("points"), "pos_int"),
        "hdr_mass": ("eval", _eval("hdr_mass"), "fraction"),
        "density_edges": ("eval", list(_eval("density_edges")), "edges"),
        "dense_mass": ("eval", _eval("dense_mass"), "fraction"),
        "sparse_mass": ("eval", _eval("sparse_mass"), "fraction"),
        "calibration_samples": ("eval", _eval("calibration_samples"), "pos_int"),
        "calibration_bins": ("eval", _eval("calibration_bins"), "pos_int"),
        "true_levels": ("eval", _eval("true_levels"), "levels"),
        "estimator_sizes": ("eval", list(_eval("estimator_sizes")), "sizes"),
        "estimator_draws": ("eval", _eval("estimator_draws"), "pos_int"),
        "estimator_bootstrap": ("eval", _eval("estimator_bootstrap"), "nonneg_int"),
        "temperature_scaling": ("eval", _eval("temperature_scaling"), "bool"),
        "curves": ("eval", False, "bool"),
        "curve_points": ("eval", 201, "pos_int"),  # per axis, when curves = true
        "curve_range": ("eval", None, "range"),  # None: every component's mean +- 4 sigma
        "plot_steps": ("eval", None, "checkpoints"),  # checkpoints the posterior figure shows; None: 3 spread out
    }.items()
}
SECTIONS = ("task", "model", "train", "eval")
TOP_LEVEL = ("name", "description", "seeds", *SECTIONS, "cases", "grid")
ADDRESS = re.compile(r"^(?:(mu|sigma)(\d+)(?:_k(\d+))?(?:_d(\d+))?|(prior)(\d+)|(weight)(\d+)_k(\d+))$")
RANGE_KEYS = {"linspace", "logspace", "range", "num", "step", "int"}


@dataclass
class Run:
    """One expanded run: its settings (python values) and where each came from."""

    case: str
    seed: int
    settings: dict[str, Any]
    origin: dict[str, str]
    task: dict[str, np.ndarray] = field(default_factory=dict)  # prior (M,), weight (M,K), mean/sigma (M,K,D)


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
# static setting and no check of another setting depends on their values.
INDEPENDENT = frozenset({"lr", "weight_decay", "momentum", "final_lr_ratio", "lr_schedule", "n_data"})


def is_independent(key: str) -> bool:
    m = ADDRESS.match(key)
    return key in INDEPENDENT or bool(m and m.group(1))


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
        run, base_task, addresses = _resolve(settings, origin, self.path + ":")
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
        return hash_parts(self.point(p), _static_json(statics[of_block[self._point(p)[2]]]))

    def run_hashes(self, run_ids) -> list[str]:
        """The identities of some runs: from ``hashes`` if computed, else each point's parts once."""
        if "hashes" in self.__dict__:
            return [self.hashes[i] for i in run_ids]
        parts = functools.lru_cache(maxsize=64)(self._hash_parts)
        s = len(self.seeds)
        return [_sha(*parts(int(i) // s), seed=self.seeds[int(i) % s]) for i in run_ids]

    @functools.cached_property
    def hashes(self) -> list[str]:
        """Each run's identity: a hash of its resolved settings (everything that fixes its numbers
        besides the numbers identity a results directory checks). Runs of two sweep files with the
        same hash are the same run, whatever their run_id, case name or the files' comments."""
        out = []
        for p in range(self.n_points):
            parts = self._hash_parts(p)
            out.extend(_sha(*parts, seed=seed) for seed in self.seeds)
        return out

    def plot_steps(self) -> dict[str, list[int]]:
        """Each case's plot_steps (those of its last block)."""
        per_case = self.n_blocks // len(self.cases)
        return {
            name: self.block((c + 1) * per_case - 1).run.settings["plot_steps"]
            for c, (name, _) in enumerate(self.cases)
        }


# ---------------------------------------------------------------- value checks


class Invalid(ValueError):
    """A value check failed: what was expected (the caller adds the file, section and key) and the
    offending value (by default the whole value checked)."""

    def __init__(self, what: str, *got):
        super().__init__(what)
        self.got = got


VALIDATORS: dict[str, Callable[[Any], Any]] = {}  # kind -> check(value) -> normalised value


def validator(*kinds: str):
    def register(fn):
        for kind in kinds:
            VALIDATORS[kind] = fn
        return fn

    return register


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _is_int(v, least: int) -> bool:
    return _is_finite(v) and v == int(v) and v >= least


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Invalid(what)


@validator("pos_float")
def _pos_float(v):
    _expect(_is_finite(v) and v > 0, "expected a positive number")
    return float(v)


@validator("nonneg_float")
def _nonneg_float(v):
    _expect(_is_finite(v) and v >= 0, "expected a number >= 0")
    return float(v)


@validator("fraction")
def _fraction(v):
    _expect(_is_finite(v) and 0 < v < 1, "expected a number in (0, 1)")
    return float(v)


@validator("momentum", "decay")
def _momentum(v):
    _expect(_is_finite(v) and 0 <= v < 1, "expected a number in [0, 1)")
    return float(v)


@validator("smoothing")
def _smoothing(v):
    _expect(_is_finite(v) and 0 <= v < 1, "expected a number in [0, 1)")
    return float(v)


@validator("focal_gamma")
def _focal_gamma(v):
    _expect(_is_finite(v) and 0 <= v <= losses.FOCAL_MAX_GAMMA, f"expected a number in [0, {losses.FOCAL_MAX_GAMMA:g}]")
    return float(v)


@validator("unit_float")
def _unit_float(v):
    _expect(_is_finite(v) and 0 <= v <= 1, "expected a number in [0, 1]")
    return float(v)


PROPOSAL_MAX = 100.0


@validator("proposal_scale")
def _proposal_scale(v):
    _expect(
        _is_finite(v) and 1 <= v <= PROPOSAL_MAX,
        f"expected a number in [1, {PROPOSAL_MAX:g}] (a proposal narrower than the task would give importance "
        "weights of unbounded variance)",
    )
    return float(v)


@validator("levels")
def _levels(v):
    _expect(_is_int(v, 4), "expected an integer >= 4")
    return int(v)


@validator("sizes")
def _sizes(v):
    _expect(
        isinstance(v, list) and all(_is_int(n, 2) and n <= MAX_SAMPLE for n in v) and _increasing(v),
        f"expected a list of increasing sample sizes, each from 2 to {MAX_SAMPLE:,}",
    )
    return [int(n) for n in v]


@validator("pos_int")
def _pos_int(v):
    _expect(_is_int(v, 1), "expected a positive integer")
    return int(v)


@validator("nonneg_int")
def _nonneg_int(v):
    _expect(_is_int(v, 0), "expected an integer >= 0")
    return int(v)


@validator("bool")
def _bool(v):
    _expect(isinstance(v, bool), "expected true or false")
    return v


@validator("n_data")
def _n_data(v):
    """A dataset size, or "online" (stored as train.ONLINE, infinitely many examples)."""
    if v == "online":
        return train.ONLINE
    _expect(_is_int(v, 1), 'expected a positive integer or "online"')
    return int(v)


@validator("widths")
def _widths(v):
    _expect(
        isinstance(v, list) and all(_is_int(w, 1) for w in v),
        "expected a list of positive integers (hidden layer widths)",
    )
    return [int(w) for w in v]


def _choice(options: list[str]):
    def check(v):
        _expect(v in options, f"expected one of {options}")
        return v

    return check


for _kind, _options in {
    "activation": sorted(model.ACTIVATIONS),
    "init": list(model.INITS),
    "optimizer": list(train.OPTIMIZERS),
    "precision": list(train.PRECISIONS),
    "lr_schedule": list(train.LR_SCHEDULES),
    "loss": list(losses.LOSSES),
}.items():
    VALIDATORS[_kind] = _choice(_options)


def _increasing(v) -> bool:
    return all(b > a for a, b in itertools.pairwise(v))


@validator("checkpoints")
def _checkpoints(v):
    _expect(
        isinstance(v, list) and bool(v) and all(_is_int(c, 0) for c in v),
        "expected a non-empty list of integer steps >= 0",
    )
    _expect(_increasing(v), "expected strictly increasing steps")
    return [int(c) for c in v]


@validator("edges")
def _edges(v):
    _expect(
        isinstance(v, list) and bool(v) and all(_is_finite(e) for e in v) and _increasing(v),
        "expected a non-empty, strictly increasing list of log10-density edges",
    )
    return [float(e) for e in v]


@validator("range")
def _range(v):
    _expect(
        isinstance(v, list) and len(v) == 2 and all(_is_finite(e) for e in v) and v[1] > v[0],
        "expected [lo, hi] with lo < hi",
    )
    return [float(e) for e in v]


# Task values stay where float32 arithmetic is exact enough: the truth is computed in float32.
MEAN_LIMIT = 1e6
SIGMA_RANGE = (1e-6, 1e6)
PRIOR_MIN = 1e-9


@validator("priors")
def _priors(v):
    _expect(
        isinstance(v, list) and len(v) >= 2 and all(_is_finite(p) for p in v),
        "expected a list of at least two numbers, one per class",
    )
    _expect(all(p > 0 for p in v), "priors must be > 0")
    _expect(all(p >= PRIOR_MIN for p in v), f"priors must be >= {PRIOR_MIN:g} (float32 truth)")
    _expect(abs(sum(v) - 1.0) <= 1e-6, f"priors must sum to 1 (they sum to {sum(v):.6g})")
    return [float(p) for p in v]


@validator("class_array")
def _class_array(v):
    """Means or sigmas: one entry per class, each -> (K, D)."""
    _expect(isinstance(v, list) and len(v) >= 2, "expected a list with one entry per class (at least two classes)")
    return [_class_entry(e, c + 1) for c, e in enumerate(v)]


@validator("means")
def _means(v):
    out = _class_array(v)
    _expect(all((abs(m) <= MEAN_LIMIT).all() for m in out), f"every mean must be within +-{MEAN_LIMIT:g}")
    return out


@validator("sigmas")
def _sigmas(v):
    out = _class_array(v)
    _expect(all((s > 0).all() for s in out), "every sigma must be > 0")
    lo, hi = SIGMA_RANGE
    _expect(all(((s >= lo) & (s <= hi)).all() for s in out), f"every sigma must be in [{lo:g}, {hi:g}]")
    return out


@validator("class_weights")
def _class_weights(v):
    _expect(
        isinstance(v, list) and len(v) >= 2,
        "expected a list with one entry (a number or a list of component weights) per class",
    )
    out = []
    for e in v:
        w = e if isinstance(e, list) else [e]
        _expect(bool(w) and all(_is_finite(x) for x in w), "expected numbers")
        w = np.asarray(w, float)
        _expect(bool((w >= 0).all() and w.sum() > 0), "component weights must be >= 0 with a positive sum per class")
        out.append(w)
    return out


def _check_value(name: str, kind: str, v, where: str) -> Any:
    """Check one raw value of setting ``name``; returns it normalised."""
    try:
        return VALIDATORS[kind](v)
    except Invalid as e:
        got = e.got[0] if e.got else v
        raise SweepError(f"{where} {name}: {e}, got {got!r}") from None


def _class_entry(e, c: int) -> np.ndarray:
    """One class's means or sigmas -> (K, D): a number, a D-vector, or K lists of D numbers."""
    if _is_finite(e):
        return np.array([[float(e)]])
    if isinstance(e, list) and e and all(_is_finite(x) for x in e):
        return np.array([e], dtype=float)
    if (
        isinstance(e, list)
        and e
        and all(isinstance(r, list) and r for r in e)
        and all(_is_finite(x) for r in e for x in r)
        and len({len(r) for r in e}) == 1
    ):
        return np.array(e, dtype=float)
    raise Invalid(
        f"class {c}: expected a number, a list of D numbers, or a list of K lists of D numbers (all finite)", e
    )


def _grid_values(name: str, spec, where: str, max_runs: int) -> list:
    """A grid axis: a non-empty list of values, or a range helper table (at most max_runs values)."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where} {name}: expected a non-empty list of values")
        return spec
    if not isinstance(spec, dict):
        raise SweepError(
            f"{where} {name}: expected a list of values or a range table "
            f"like {{linspace = [0, 1], num = 5}}, got {spec!r}"
        )
    unknown = set(spec) - RANGE_KEYS
    kinds = [k for k in ("linspace", "logspace", "range") if k in spec]
    if unknown or len(kinds) != 1:
        raise SweepError(
            f"{where} {name}: a range table needs exactly one of linspace, logspace, range "
            f"(with num or step) and optionally int = true; got keys {sorted(spec)}"
        )
    kind = kinds[0]
    ends = spec[kind]
    if not (isinstance(ends, list) and len(ends) == 2 and all(_is_finite(e) for e in ends)):
        raise SweepError(f"{where} {name}.{kind}: expected [start, stop], two finite numbers, got {ends!r}")
    a, b = ends
    if kind == "range":
        step = spec.get("step")
        if not _is_finite(step) or step <= 0 or "num" in spec:
            raise SweepError(f"{where} {name}.step: range needs a finite step > 0 (and no num), got {step!r}")
        count = math.floor((b - a) / step + 1e-9) + 1
        if count > max_runs:
            raise SweepError(
                f"{where} {name}.range: {count:,} values, more than the {max_runs:,} runs a sweep may have (--max-runs)"
            )
        values = list(np.arange(a, b + step * 1e-9, step))
        if not values:
            raise SweepError(f"{where} {name}.range: no values from {a} to {b}")
    else:
        num = spec.get("num")
        if not _is_int(num, 1) or "step" in spec:
            raise SweepError(f"{where} {name}.num: {kind} needs num, a positive integer, got {num!r}")
        if num > max_runs:
            raise SweepError(
                f"{where} {name}.num: {num:,} values, more than the {max_runs:,} runs a sweep may have (--max-runs)"
            )
        if kind == "logspace":
            if a <= 0 or b <= 0:
                raise SweepError(f"{where} {name}.logspace: ends must be > 0, got {ends!r}")
            values = portable.geomspace(a, b, int(num))  # (np.geomspace's bits depend on the CPU)
        else:
            values = list(np.linspace(a, b, int(num)))
    as_int = spec.get("int", False)
    if not isinstance(as_int, bool):
        raise SweepError(f"{where} {name}.int: expected true or false, got {as_int!r}")
    values = [int(round(v)) if as_int else float(v) for v in values]
    if as_int:
        values = list(dict.fromkeys(values))  # rounding can repeat values
    return values


def _check_setting(name: str, v, where: str):
    """Check a value given by setting name or task address."""
    if name in SETTINGS:
        return _check_value(name, SETTINGS[name].kind, v, where)
    m = ADDRESS.match(name)
    if not m:
        known = ", ".join(sorted(SETTINGS))
        raise SweepError(
            f"{where} unknown key {name!r}; settings are {known}, or task entries like mu2, sigma1, prior1, weight2_k1"
        )
    if not _is_number(v) or not math.isfinite(v):
        raise SweepError(f"{where} {name}: expected a number, got {v!r}")
    if m.group(1) == "sigma" and v <= 0:
        raise SweepError(f"{where} {name}: sigma must be > 0, got {v!r}")
    if m.group(1) == "sigma" and not SIGMA_RANGE[0] <= v <= SIGMA_RANGE[1]:
        raise SweepError(f"{where} {name}: sigma must be in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], got {v!r}")
    if m.group(1) == "mu" and abs(v) > MEAN_LIMIT:
        raise SweepError(f"{where} {name}: a mean must be within +-{MEAN_LIMIT:g}, got {v!r}")
    if m.group(5) and not PRIOR_MIN <= v < 1:
        raise SweepError(f"{where} {name}: a prior must be in [{PRIOR_MIN:g}, 1), got {v!r}")
    if m.group(7) and v < 0:
        raise SweepError(f"{where} {name}: a weight must be >= 0, got {v!r}")
    return float(v)


# ---------------------------------------------------------------- loading


def load(path: str | Path, max_runs: int = MAX_RUNS) -> Sweep:
    """Read, validate and expand a sweep file."""
    path = Path(path)
    try:
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
    f = path + ":"
    for key in doc:
        if key not in TOP_LEVEL:
            raise SweepError(f"{f} unknown key {key!r} at top level; expected one of {', '.join(TOP_LEVEL)}")

    name = doc.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise SweepError(
            f"{f} name: expected letters, digits, '_', '-' or '.', starting with a letter, digit or "
            f"'_' (results go to results/<name>), got {name!r}"
        )
    seeds = _seeds(doc.get("seeds", 1), f, max_runs)

    base: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section in SECTIONS:
        table = doc.get(section, {})
        where = f"{f} [{section}]"
        if not isinstance(table, dict):
            raise SweepError(f"{where}: expected a table of settings")
        for key, v in table.items():
            if key not in SETTINGS or SETTINGS[key].section != section:
                home = f" (it belongs in [{SETTINGS[key].section}])" if key in SETTINGS else ""
                known = ", ".join(k for k, s in SETTINGS.items() if s.section == section)
                raise SweepError(f"{where} unknown key {key!r}{home}; known: {known}")
            base[key] = _check_value(key, SETTINGS[key].kind, v, where)
            origin[key] = where

    cases = doc.get("cases", {"default": {}})
    if not isinstance(cases, dict) or not cases or not all(isinstance(c, dict) for c in cases.values()):
        raise SweepError(f"{f} [cases]: expected one or more [cases.NAME] tables")
    case_settings = {}
    for cname, table in cases.items():
        where = f"{f} [cases.{cname}]"
        case_settings[cname] = {k: (_check_setting(k, v, where), where) for k, v in table.items()}

    grid = doc.get("grid", {})
    if not isinstance(grid, dict):
        raise SweepError(f"{f} [grid]: expected a table of setting = values")
    axes = []
    for key, spec in grid.items():
        where = f"{f} [grid]"
        values = _grid_values(key, spec, where, max_runs)
        axes.append(Axis(key, tuple(_check_setting(key, v, where) for v in values), where, is_independent(key)))

    n_runs = len(case_settings) * math.prod(len(a.values) for a in axes) * len(seeds)
    if n_runs > max_runs:
        raise SweepError(
            f"{f} {len(case_settings)} case(s) x "
            f"{' x '.join(str(len(a.values)) for a in axes) or '1'} grid "
            f"point(s) x {len(seeds)} seed(s) = {n_runs:,} runs, more than the {max_runs:,} a sweep "
            "may have; split it, or raise the limit with --max-runs"
        )
    sw = Sweep(name, path, text, base, origin, list(case_settings.items()), axes, seeds)
    _check_all(sw)
    return sw


def _check_all(sw: Sweep) -> None:
    """Every run is checked before anything trains, without resolving every run: each block (case
    x coupled grid values) is resolved, and each value of an independent axis once (in the first
    block): the checks of an independent setting depend on nothing else."""
    _ = sw.block_groups  # resolves every block
    for a in sw.independent:
        for d in range(1, len(sw.axes[a].values)):
            digits = [0] * len(sw.axes)
            digits[a] = d
            _resolve(*sw._settings(0, digits)[1:], sw.path + ":")


def _seeds(v, f: str, max_runs: int) -> list[int]:
    if _is_int(v, 1):
        if v > max_runs:
            raise SweepError(
                f"{f} seeds: {int(v):,} seeds, more than the {max_runs:,} runs a sweep may have (--max-runs)"
            )
        return list(range(int(v)))
    if isinstance(v, list) and v and all(_is_int(s, 0) and s < 2**32 for s in v) and len(set(v)) == len(v):
        return [int(s) for s in v]
    raise SweepError(f"{f} seeds: expected a count >= 1 or a list of distinct integers >= 0, got {v!r}")


def _resolve(settings: dict, origin: dict, f: str) -> tuple[Run, dict, tuple]:
    """One grid point's settings, checked together: the resolver's steps in order. Returns the run
    (case and seed unset), its task arrays before entries set by address, and those entries."""
    fill_defaults(settings, origin, f)
    task = task_arrays(settings, origin)
    base_task = {k: v.copy() for k, v in task.items()}
    addresses = tuple((k, settings[k], origin[k]) for k in settings if k not in SETTINGS)
    apply_addresses(settings, origin, task)
    resolve_checkpoints(settings, origin)
    resolve_hidden(settings)
    if settings["curves"] and task["mean"].shape[2] > 2:
        raise SweepError(
            f"{origin['curves']} curves: posterior curves need a 1-D or 2-D task (D = {task['mean'].shape[2]})"
        )
    return Run("", 0, settings, origin, task), base_task, addresses


def fill_defaults(settings: dict, origin: dict, f: str) -> None:
    """Every setting not given takes its default; a required one missing is an error."""
    for key, spec in SETTINGS.items():
        if key not in settings:
            if spec.default is REQUIRED:
                raise SweepError(
                    f"{f} [{spec.section}] {key}: missing required setting "
                    "(set it in the section, in every case, or in [grid])"
                )
            settings[key] = spec.default
            origin[key] = f"{f} [{spec.section}]"


def task_arrays(settings: dict, origin: dict) -> dict[str, np.ndarray]:
    """means, sigmas, weights and priors -> prior (M,), weight (M, K), mean and sigma (M, K, D).

    Classes with fewer components than others get zero-weight (never drawn) padding components.
    """
    means, sigmas = settings["means"], settings["sigmas"]
    n_classes = len(means)
    where = origin["sigmas"] if origin["sigmas"] != origin["means"] else origin["means"]
    if len(sigmas) != n_classes:
        raise SweepError(f"{where} sigmas: {len(sigmas)} classes, but means has {n_classes}")
    dim = means[0].shape[1]
    if any(m.shape[1] != dim for m in means):
        raise SweepError(
            f"{origin['means']} means: every class needs the same dimension D, got {[m.shape[1] for m in means]}"
        )
    k_max = max(m.shape[0] for m in means)
    mean = np.zeros((n_classes, k_max, dim))
    sigma = np.ones((n_classes, k_max, dim))
    weight = np.zeros((n_classes, k_max))
    weights = settings["weights"]
    if weights is not None and len(weights) != n_classes:
        raise SweepError(f"{origin['weights']} weights: {len(weights)} classes, but means has {n_classes}")
    for c, (m, s) in enumerate(zip(means, sigmas, strict=True)):
        k = m.shape[0]
        try:
            sigma[c, :k] = np.broadcast_to(s, m.shape)
        except ValueError:
            raise SweepError(
                f"{origin['sigmas']} sigmas: class {c + 1} has shape {s.shape}, "
                f"which does not fit its means' shape {m.shape} (K components x D dims)"
            ) from None
        mean[c, :k] = m
        mean[c, k:] = m[0]
        if weights is None:
            weight[c, :k] = 1.0 / k
        elif len(weights[c]) != k:
            raise SweepError(
                f"{origin['weights']} weights: class {c + 1} has {len(weights[c])} weights but {k} components"
            )
        else:
            weight[c, :k] = weights[c] / weights[c].sum()
    priors = settings["priors"]
    if priors is None:
        prior = np.full(n_classes, 1.0 / n_classes)
    elif len(priors) != n_classes:
        raise SweepError(f"{origin['priors']} priors: {len(priors)} values, but means has {n_classes} classes")
    else:
        prior = np.asarray(priors, float)
    return {"prior": prior, "weight": weight, "mean": mean, "sigma": sigma}


def _entry(m: re.Match) -> tuple[str, tuple[int | None, int | None, int | None]]:
    """A mean or sigma address: its array ("mean" or "sigma") and (class, component, dimension),
    counted from 1; None: every component or dimension."""
    return ("mean" if m.group(1) == "mu" else "sigma"), tuple(int(g) if g else None for g in m.group(2, 3, 4))


def _entry_index(c: int, k: int | None, d: int | None) -> tuple:
    """The (M, K, D) array index of entry (c, k, d) as ``_entry`` gives it."""
    return c - 1, slice(k - 1, k) if k else slice(None), slice(d - 1, d) if d else slice(None)


def apply_addresses(settings: dict, origin: dict, task: dict[str, np.ndarray]) -> None:
    """Task entries set by address (mu2, sigma1_k2_d1, prior1, weight2_k1) overwrite the arrays
    in place, and leave ``settings``."""
    weight, prior = task["weight"], task["prior"]
    n_classes, k_max, dim = task["mean"].shape
    for key in [k for k in settings if k not in SETTINGS]:
        m = ADDRESS.match(key)
        v, where = settings.pop(key), origin.pop(key)
        if m.group(1):  # mu / sigma
            name, (c, k, d) = _entry(m)
            if not 1 <= c <= n_classes or (k and not 1 <= k <= k_max) or (d and not 1 <= d <= dim):
                raise SweepError(
                    f"{where} {key}: no such entry (task has {n_classes} classes, "
                    f"{k_max} components, {dim} dimensions; indices start at 1)"
                )
            task[name][_entry_index(c, k, d)] = v
        elif m.group(5):  # prior: the other classes keep their ratios and share 1 - v
            c = int(m.group(6))
            if not 1 <= c <= n_classes:
                raise SweepError(f"{where} {key}: no such class (task has {n_classes})")
            others = np.arange(n_classes) != c - 1
            prior[others] *= (1.0 - v) / prior[others].sum()
            prior[c - 1] = v
        else:  # weight
            c, k = int(m.group(8)), int(m.group(9))
            if not 1 <= c <= n_classes or not 1 <= k <= k_max:
                raise SweepError(f"{where} {key}: no such entry (task has {n_classes} classes, {k_max} components)")
            weight[c - 1, k - 1] = v
            if weight[c - 1].sum() <= 0:
                raise SweepError(f"{where} {key}: class {c} would have no positive weight")
            weight[c - 1] /= weight[c - 1].sum()


def default_checkpoints(steps: int) -> list[int]:
    """10, 20, 50, 100, ... below 0.9 x steps, then 0.9 and 0.95 x steps and steps: three in the
    last tenth of training, over which the final values are medians (summaries.FINAL_WINDOW)."""
    series = [m * 10**e for e in range(1, 10) for m in (1, 2, 5)]
    tail = sorted({round(0.9 * steps), round(0.95 * steps), steps})
    return [c for c in series if c < tail[0]] + [c for c in tail if c > 0]


def resolve_checkpoints(settings: dict, origin: dict) -> None:
    """Checkpoints (default: default_checkpoints) within steps, plot steps among them, and example
    indices within int32."""
    steps, n_data = settings["steps"], settings["n_data"]
    if steps * settings["batch_size"] >= 2**31 or (math.isfinite(n_data) and n_data >= 2**31):
        raise SweepError(
            f"{origin['steps']} steps: steps x batch_size and n_data must stay below 2^31 (example indices are int32)"
        )
    if settings["checkpoints"] is None:
        settings["checkpoints"] = default_checkpoints(steps)
    bad = [c for c in settings["checkpoints"] if c > steps]
    where = origin["checkpoints"] if origin["checkpoints"] != origin["steps"] else origin["steps"]
    if bad:
        raise SweepError(f"{where} checkpoints: step {bad[0]} is beyond steps = {steps}")
    if settings["checkpoints"][-1] != steps:
        raise SweepError(
            f"{where} checkpoints: the last checkpoint must be steps = {steps} (training stops at "
            f"the last checkpoint), got {settings['checkpoints']}"
        )
    for name, loss in (("label_smoothing", "label_smoothing"), ("focal_gamma", "focal")):
        if settings[name] and settings["loss"] != loss:
            raise SweepError(
                f'{origin[name]} {name}: {settings[name]:g} is used only with loss = "{loss}", '
                f'and this run\'s loss is "{settings["loss"]}" ({origin["loss"]})'
            )
    if settings["warmup_steps"] > steps:
        where = origin["warmup_steps"] if origin["warmup_steps"] != origin["steps"] else origin["steps"]
        raise SweepError(f"{where} warmup_steps: {settings['warmup_steps']} is beyond steps = {steps}")
    if settings["plot_steps"] is None:
        ck = settings["checkpoints"]
        settings["plot_steps"] = sorted({ck[0], ck[len(ck) // 2], ck[-1]})
    missing = [c for c in settings["plot_steps"] if c not in settings["checkpoints"]]
    if missing:
        raise SweepError(f"{origin['plot_steps']} plot_steps: step {missing[0]} is not a checkpoint")


def resolve_hidden(settings: dict) -> None:
    """width and depth, when given, override hidden: hidden = [width] * depth."""
    if settings["width"] is not None or settings["depth"] is not None:
        hidden = settings["hidden"]
        width = settings["width"] if settings["width"] is not None else (hidden[0] if hidden else 64)
        depth = settings["depth"] if settings["depth"] is not None else len(hidden)
        settings["hidden"] = [width] * depth


# ---------------------------------------------------------------- runs -> programs and tables


def static_of(run: Run) -> train.Static:
    s = run.settings
    m, k, d = run.task["mean"].shape
    return train.Static(
        steps=s["steps"],
        checkpoints=tuple(s["checkpoints"]),
        num_classes=m,
        num_components=k,
        dim=d,
        hidden=tuple(s["hidden"]),
        activation=s["activation"],
        init=s["init"],
        optimizer=s["optimizer"],
        loss=s["loss"],
        batch_size=s["batch_size"],
        matmul_precision=s["matmul_precision"],
        eval=metrics.EvalSpec(
            points=s["points"],
            hdr_mass=s["hdr_mass"],
            density_edges=tuple(s["density_edges"]),
            dense_mass=s["dense_mass"],
            sparse_mass=s["sparse_mass"],
            calibration_samples=s["calibration_samples"],
            calibration_bins=s["calibration_bins"],
            true_levels=s["true_levels"],
            estimator_sizes=tuple(s["estimator_sizes"]),
            estimator_draws=s["estimator_draws"],
            estimator_bootstrap=s["estimator_bootstrap"],
            temperature_scaling=s["temperature_scaling"],
        ),
        curve_points=s["curve_points"] if s["curves"] else 0,
        ema=s["ema_decay"] > 0,
        importance=s["proposal_scale"] != 1.0,
    )


def run_hash(run: Run, static: train.Static) -> str:
    """sha256 (32 hex digits) of a run's resolved settings: its static settings and every number
    that enters its Dynamic."""
    return _sha(*hash_parts(run, _static_json(static)), seed=run.seed)


@functools.lru_cache(maxsize=64)
def _static_json(static: train.Static) -> str:
    settings = dataclasses.asdict(static)
    del settings["dense"]  # how the products are computed: the results directory's, not the run's (train.Static)
    return json.dumps(settings, sort_keys=True, default=str)


def hash_parts(run: Run, static_json: str) -> tuple[str, str]:
    """The text hashed for a run's identity (json.dumps of its settings, keys sorted), split
    around the seed: every seed of a grid point shares the two parts."""
    s = run.settings
    content = {
        "static": "@static@",
        "task": {k: np.asarray(v, float).tolist() for k, v in sorted(run.task.items())},
        "seed": "@seed@",
        **{k: s[k] for k in DYNAMIC_SETTINGS},
    }
    text = json.dumps(content, sort_keys=True, default=str).replace('"@static@"', static_json, 1)
    prefix, suffix = text.split('"@seed@"')
    return prefix, suffix


def _sha(prefix: str, suffix: str, seed: int) -> str:
    return hashlib.sha256(f"{prefix}{seed}{suffix}".encode()).hexdigest()[:32]


# The settings that enter a run's Dynamic besides its task and seed (train.make_dynamic's arguments).
DYNAMIC_SETTINGS = (
    "lr",
    "weight_decay",
    "momentum",
    "n_data",
    "curve_range",
    "lr_schedule",
    "warmup_steps",
    "final_lr_ratio",
    "ema_decay",
    "proposal_scale",
    "label_smoothing",
    "focal_gamma",
)


def chunk_dynamic(sw: Sweep, run_ids) -> train.Dynamic:
    """The stacked Dynamic of some runs: each grid point's made once, then given its runs' seeds
    (the seed is the only dynamic setting that differs between a point's runs)."""
    ids = np.asarray(run_ids, np.int64)
    s = len(sw.seeds)
    points, inverse = np.unique(ids // s, return_inverse=True)
    per_point = train.stack_dynamic([dynamic_of(sw.point(int(p))) for p in points])
    return train.take_dynamic(per_point, inverse)._replace(seed=np.asarray(sw.seeds, np.uint32)[ids % s])


def dynamic_of(run: Run) -> train.Dynamic:
    s, t = run.settings, run.task
    task = tasks.make_task(t["prior"], t["mean"], t["sigma"], t["weight"])
    return train.make_dynamic(task, seed=run.seed, **{k: s[k] for k in DYNAMIC_SETTINGS})


def entry_suffixes(shape) -> list[tuple[tuple[int, int, int], str]]:
    """Each (class, component, dimension) of a task of shape (M, K, D) and its column suffix:
    _k<k> where K > 1, _d<d> where D > 1 (mu2, sigma1_k2, mu1_d2, ...)."""
    _, k_max, dim = shape
    return [
        ((c, k, d), (f"_k{k + 1}" if k_max > 1 else "") + (f"_d{d + 1}" if dim > 1 else ""))
        for c in range(shape[0])
        for k in range(k_max)
        for d in range(dim)
    ]


def task_columns(task: dict[str, np.ndarray]) -> dict[str, float]:
    """Scalar columns named like the sweep addresses: mu2, sigma1_k2, prior1, weight3_k1 ..."""
    n_classes, k_max, _ = task["mean"].shape
    cols = {}
    for (c, k, d), suffix in entry_suffixes(task["mean"].shape):
        cols[f"mu{c + 1}{suffix}"] = float(task["mean"][c, k, d])
        cols[f"sigma{c + 1}{suffix}"] = float(task["sigma"][c, k, d])
    for c in range(n_classes):
        cols[f"prior{c + 1}"] = float(task["prior"][c])
    if k_max > 1:
        for c in range(n_classes):
            for k in range(k_max):
                cols[f"weight{c + 1}_k{k + 1}"] = float(task["weight"][c, k])
    return cols


def task_from_row(row) -> tasks.GaussianTask:
    """Inverse of task_columns: the task of a runs-table row."""
    m, k, d = int(row["num_classes"]), int(row["num_components"]), int(row["dim"])
    entries = entry_suffixes((m, k, d))
    mean = np.array([row[f"mu{c + 1}{suffix}"] for (c, _, _), suffix in entries]).reshape(m, k, d)
    sigma = np.array([row[f"sigma{c + 1}{suffix}"] for (c, _, _), suffix in entries]).reshape(m, k, d)
    prior = np.array([row[f"prior{c + 1}"] for c in range(m)])
    weight = (
        np.array([[row[f"weight{c + 1}_k{j + 1}"] for j in range(k)] for c in range(m)]) if k > 1 else np.ones((m, 1))
    )
    return tasks.make_task(prior, mean, sigma, weight)


def run_row(run_id: int, run: Run) -> dict[str, Any]:
    """The runs-table row: identity, task entries and training settings."""
    s = run.settings
    m, k, d = run.task["mean"].shape
    return {
        "run_id": run_id,
        "case": run.case,
        "seed": run.seed,
        "num_classes": m,
        "num_components": k,
        "dim": d,
        **task_columns(run.task),
        "hidden": "-".join(map(str, s["hidden"])),
        "width": s["hidden"][0] if s["hidden"] else 0,
        "depth": len(s["hidden"]),
        "activation": s["activation"],
        "init": s["init"],
        "optimizer": s["optimizer"],
        "loss": s["loss"],
        "label_smoothing": s["label_smoothing"],
        "focal_gamma": s["focal_gamma"],
        "lr": s["lr"],
        "lr_schedule": s["lr_schedule"],
        "warmup_steps": s["warmup_steps"],
        "final_lr_ratio": s["final_lr_ratio"],
        "weight_decay": s["weight_decay"],
        "momentum": s["momentum"],
        "ema_decay": s["ema_decay"],
        "proposal_scale": s["proposal_scale"],
        "batch_size": s["batch_size"],
        "matmul_precision": s["matmul_precision"],
        "n_data": float(s["n_data"]),  # inf: online
        "steps": s["steps"],
    }


def runs_table(sw: Sweep) -> pd.DataFrame:
    """One row per run: identity, task entries, training settings, its group (compiled program) and
    its identity (``run_hash``).

    Built by index arithmetic: one row per block, taken for each of its grid points, the
    independent axes' values set column by column, then repeated over seeds.
    """
    points = np.arange(sw.n_points)
    case, digits = sw.digits(points)
    blocks = sw.block_of(points, (case, digits))
    df = pd.DataFrame([run_row(0, sw.block(b).run) for b in range(sw.n_blocks)]).iloc[blocks].reset_index(drop=True)
    values = {sw.axes[a].key: sw.axes[a].values for a in sw.independent}
    for a in sw.independent:
        key = sw.axes[a].key
        if key in SETTINGS:
            df[key] = np.asarray(values[key], object if key == "lr_schedule" else float)[digits[a]]
    if any(k not in SETTINGS for k in values):  # task entries set by address: per block (shapes differ)
        order = np.argsort(blocks, kind="stable")
        keys, starts = np.unique(blocks[order], return_index=True)
        for b, rows in zip(keys, np.split(order, starts[1:]), strict=True):
            _set_entries(df, rows, sw.block(b), values, {sw.axes[a].key: digits[a][rows] for a in sw.independent})
    df = df.iloc[np.repeat(np.arange(len(df)), len(sw.seeds))].reset_index(drop=True)
    df["run_id"] = np.arange(sw.n_runs, dtype=np.int64)
    df["seed"] = np.tile(np.asarray(sw.seeds, np.int64), sw.n_points)
    df["group"] = sw.groups[1]
    df["run_hash"] = sw.hashes
    return df


def _set_entries(df: pd.DataFrame, rows: np.ndarray, blk: Block, values: dict, digits: dict) -> None:
    """The mean and sigma columns of one block's rows: its task entries set by address re-applied
    in order (an independent axis's value per row, any other entry's fixed value)."""
    arrays = {
        k: np.broadcast_to(blk.run.task[k], (len(rows),) + blk.run.task[k].shape).copy() for k in ("mean", "sigma")
    }
    for key, v, _ in blk.addresses:
        m = ADDRESS.match(key)
        if not m.group(1):
            continue  # priors and weights: fixed within a block, already in its row
        name, entry = _entry(m)
        v = np.asarray(values[key], float)[digits[key]] if key in values else np.full(len(rows), float(v))
        arrays[name][(slice(None), *_entry_index(*entry))] = v[:, None, None]
    for (c, j, e), suffix in entry_suffixes(blk.run.task["mean"].shape):
        df.loc[rows, f"mu{c + 1}{suffix}"] = arrays["mean"][:, c, j, e]
        df.loc[rows, f"sigma{c + 1}{suffix}"] = arrays["sigma"][:, c, j, e]
