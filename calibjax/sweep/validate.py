"""Checks of a sweep file's values: one validator per kind of value (``VALIDATORS``), grid ranges
and seeds. A check returns the value normalised or raises ``SweepError`` naming the file, the
section or key, and what is wrong.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from calibjax.core import losses, model, portable, train
from calibjax.errors import CalibjaxError
from calibjax.sweep.schema import ADDRESS, RANGE_KEYS, REMOVED, SETTINGS


class SweepError(CalibjaxError):
    """A mistake in a sweep file; the message names the file, the key and what is wrong."""


MAX_SAMPLE = 1_000_000  # largest labelled sample of the estimator benchmark (its memory grows with it)


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


MAX_CHECKPOINTS = 10_000  # checkpoints per run (each is a full evaluation and rows in every table)
MAX_CURVE_POINTS = 10_000  # posterior-curve points per axis (a figure is a few thousand pixels wide)


@validator("curve_points")
def _curve_points(v):
    _expect(_is_int(v, 2) and v <= MAX_CURVE_POINTS, f"expected an integer from 2 to {MAX_CURVE_POINTS:,}")
    return int(v)


@validator("checkpoints")
def _checkpoints(v):
    _expect(
        isinstance(v, list) and bool(v) and all(_is_int(c, 0) for c in v),
        "expected a non-empty list of integer steps >= 0",
    )
    _expect(len(v) <= MAX_CHECKPOINTS, f"expected at most {MAX_CHECKPOINTS:,} checkpoints")
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


F32_MAX = float(np.finfo(np.float32).max)
F32_SMALLEST = float(np.finfo(np.float32).smallest_subnormal)
INT32_MAX = int(np.iinfo(np.int32).max)


def _representable(v) -> None:
    """Numbers (also inside lists) that the compiled program can hold: floats in float32 (neither
    overflowing to inf nor rounding to 0) and integers in int32."""
    if isinstance(v, list):
        for e in v:
            _representable(e)
    elif isinstance(v, int) and not isinstance(v, bool):
        if abs(v) > INT32_MAX:
            raise Invalid(f"expected at most {INT32_MAX:,} (2**31 - 1, the largest int32)", v)
    elif isinstance(v, float) and math.isfinite(v):
        if abs(v) > F32_MAX or 0 < abs(v) < F32_SMALLEST:
            raise Invalid(
                f"not representable in float32, which calibjax computes in (magnitudes from {F32_SMALLEST:.3g} "
                f"to {F32_MAX:.4g})",
                v,
            )


def _shown(v) -> str:
    """A value as an error message shows it: a long list by its ends and length."""
    if isinstance(v, list) and len(v) > 8:
        return f"[{', '.join(map(repr, v[:3]))}, ..., {v[-1]!r}] ({len(v):,} values)"
    return repr(v)


def check_value(name: str, kind: str, v, where: str) -> Any:
    """Check one raw value of setting ``name``; returns it normalised."""
    try:
        _representable(v)
        return VALIDATORS[kind](v)
    except Invalid as e:
        got = e.got[0] if e.got else v
        raise SweepError(f"{where} {name}: {e}, got {_shown(got)}") from None


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


def grid_values(name: str, spec, where: str, max_runs: int) -> list:
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
    make = _stepped if kind == "range" else _counted
    values = make(f"{where} {name}", kind, spec, *ends, max_runs)
    as_int = spec.get("int", False)
    if not isinstance(as_int, bool):
        raise SweepError(f"{where} {name}.int: expected true or false, got {as_int!r}")
    values = [int(round(v)) if as_int else float(v) for v in values]
    if as_int:
        values = list(dict.fromkeys(values))  # rounding can repeat values
    return values


def _stepped(at: str, kind: str, spec: dict, a: float, b: float, max_runs: int) -> list:
    """range = [a, b] with step: a, a + step, ... up to b."""
    step = spec.get("step")
    if not _is_finite(step) or step <= 0 or "num" in spec:
        raise SweepError(f"{at}.step: range needs a finite step > 0 (and no num), got {step!r}")
    count = math.floor((b - a) / step + 1e-9) + 1
    if count > max_runs:
        raise SweepError(f"{at}.range: {count:,} values, more than the {max_runs:,} runs a sweep may have (--max-runs)")
    values = list(np.arange(a, b + step * 1e-9, step))
    if not values:
        raise SweepError(f"{at}.range: no values from {a} to {b}")
    return values


def _counted(at: str, kind: str, spec: dict, a: float, b: float, max_runs: int) -> list:
    """linspace or logspace = [a, b] with num values."""
    num = spec.get("num")
    if not _is_int(num, 1) or "step" in spec:
        raise SweepError(f"{at}.num: {kind} needs num, a positive integer, got {num!r}")
    if num > max_runs:
        raise SweepError(f"{at}.num: {num:,} values, more than the {max_runs:,} runs a sweep may have (--max-runs)")
    if kind == "linspace":
        return list(np.linspace(a, b, int(num)))
    if a <= 0 or b <= 0:
        raise SweepError(f"{at}.logspace: ends must be > 0, got {[a, b]!r}")
    return portable.geomspace(a, b, int(num))  # (np.geomspace's bits depend on the CPU)


def check_setting(name: str, v, where: str):
    """Check a value given by setting name or task address."""
    if name in SETTINGS:
        return check_value(name, SETTINGS[name].kind, v, where)
    if name in REMOVED:
        raise SweepError(f"{where} {name}: {REMOVED[name]}")
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


def seeds_of(v, f: str, max_runs: int) -> list[int]:
    if _is_int(v, 1):
        if v > max_runs:
            raise SweepError(
                f"{f} seeds: {int(v):,} seeds, more than the {max_runs:,} runs a sweep may have (--max-runs)"
            )
        return list(range(int(v)))
    if isinstance(v, list) and v and all(_is_int(s, 0) and s < 2**32 for s in v) and len(set(v)) == len(v):
        return [int(s) for s in v]
    raise SweepError(f"{f} seeds: expected a count >= 1 or a list of distinct integers >= 0, got {v!r}")
