"""Sweep files: parse, validate, expand into one row per run.

A sweep is TOML (the format is documented in README.md). Settings live in
sections ([task], [model], [train], [eval]); named cases ([cases.NAME]) and a
cartesian [grid] override any setting by its bare name, and single task
entries by address (mu2, sigma1_k2_d1, prior1, weight3_k2). Cases x grid x
seeds expand, in file order, into runs with sequential run_ids.

Every user mistake raises ``SweepError`` naming the file, the key and the
problem, before anything is computed or written.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibjax import metrics, model, tasks, train


class SweepError(ValueError):
    """A mistake in a sweep file; the message names the file, the key and what is wrong."""


ONLINE = "online"

# name -> (section, default, kind). kind picks the value check; REQUIRED marks no default.
REQUIRED = object()
SETTINGS: dict[str, tuple[str, Any, str]] = {
    "means": ("task", REQUIRED, "class_array"),
    "sigmas": ("task", REQUIRED, "class_array"),
    "priors": ("task", None, "priors"),          # None: equal priors
    "weights": ("task", None, "class_weights"),  # None: equal component weights
    "hidden": ("model", [64, 64], "widths"),
    "width": ("model", None, "pos_int"),         # with depth: hidden = [width] * depth
    "depth": ("model", None, "nonneg_int"),
    "activation": ("model", "relu", "activation"),
    "init": ("model", "torch", "init"),
    "optimizer": ("train", "adam", "optimizer"),
    "lr": ("train", 1e-3, "pos_float"),
    "weight_decay": ("train", 0.0, "nonneg_float"),
    "momentum": ("train", 0.0, "momentum"),
    "batch_size": ("train", 64, "pos_int"),
    "n_data": ("train", ONLINE, "n_data"),
    "matmul_precision": ("train", "float32", "precision"),
    "steps": ("train", REQUIRED, "pos_int"),
    "checkpoints": ("train", None, "checkpoints"),  # None: 10, 20, 50, ... below steps, then steps
    "points": ("eval", 2048, "pos_int"),
    "hdr_mass": ("eval", 0.999, "fraction"),
    "density_edges": ("eval", list(metrics.EvalSpec().density_edges), "edges"),
    "dense_mass": ("eval", 0.9, "fraction"),
    "sparse_mass": ("eval", 0.01, "fraction"),
    "calibration_samples": ("eval", 5000, "pos_int"),
    "calibration_bins": ("eval", 15, "pos_int"),
    "curves": ("eval", False, "bool"),
    "curve_points": ("eval", 201, "pos_int"),
    "curve_range": ("eval", None, "range"),
    "plot_steps": ("eval", None, "checkpoints"),  # checkpoints the posterior figure shows; None: 3 spread out
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


@dataclass
class Sweep:
    name: str
    path: str
    text: str
    runs: list[Run]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @functools.cached_property
    def groups(self) -> tuple[list[train.Static], list[int]]:
        """Distinct static settings (one compile each) in order of first appearance, and each
        run's group index; computed once per sweep."""
        statics: dict[train.Static, int] = {}
        group_of = [statics.setdefault(static_of(r), len(statics)) for r in self.runs]
        return list(statics), group_of


# ---------------------------------------------------------------- value checks

# kinds whose value is one of a fixed set of names (listed in this order in error messages)
CHOICES = {"activation": sorted(model.ACTIVATIONS), "init": list(model.INITS),
           "optimizer": list(train.OPTIMIZERS), "precision": list(train.PRECISIONS)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(name: str, kind: str, v, where: str) -> Any:
    """Check one raw value of setting ``name``; returns it normalised."""

    def bad(what: str):
        raise SweepError(f"{where} {name}: {what}, got {v!r}")

    if kind == "pos_float":
        if not _is_number(v) or not (v > 0 and math.isfinite(v)):
            bad("expected a positive number")
        return float(v)
    if kind == "nonneg_float":
        if not _is_number(v) or not (v >= 0 and math.isfinite(v)):
            bad("expected a number >= 0")
        return float(v)
    if kind == "fraction":
        if not _is_number(v) or not 0 < v < 1:
            bad("expected a number in (0, 1)")
        return float(v)
    if kind == "momentum":
        if not _is_number(v) or not 0 <= v < 1:
            bad("expected a number in [0, 1)")
        return float(v)
    if kind in ("pos_int", "nonneg_int"):
        if not _is_number(v) or v != int(v) or v < (1 if kind == "pos_int" else 0):
            bad("expected a positive integer" if kind == "pos_int" else "expected an integer >= 0")
        return int(v)
    if kind == "bool":
        if not isinstance(v, bool):
            bad("expected true or false")
        return v
    if kind == "n_data":
        if v == ONLINE:
            return ONLINE
        if not _is_number(v) or v != int(v) or v < 1:
            bad('expected a positive integer or "online"')
        return int(v)
    if kind == "widths":
        if not isinstance(v, list) or not all(_is_number(w) and w == int(w) and w >= 1 for w in v):
            bad("expected a list of positive integers (hidden layer widths)")
        return [int(w) for w in v]
    if kind in CHOICES:
        if v not in CHOICES[kind]:
            bad(f"expected one of {CHOICES[kind]}")
        return v
    if kind == "checkpoints":
        if (not isinstance(v, list) or not v
                or not all(_is_number(c) and c == int(c) and c >= 0 for c in v)):
            bad("expected a non-empty list of integer steps >= 0")
        if any(b <= a for a, b in zip(v[:-1], v[1:])):
            bad("expected strictly increasing steps")
        return [int(c) for c in v]
    if kind == "edges":
        if (not isinstance(v, list) or not v or not all(_is_number(e) and math.isfinite(e) for e in v)
                or any(b <= a for a, b in zip(v[:-1], v[1:]))):
            bad("expected a non-empty, strictly increasing list of log10-density edges")
        return [float(e) for e in v]
    if kind == "range":
        if not isinstance(v, list) or len(v) != 2 or not all(_is_number(e) for e in v) or v[1] <= v[0]:
            bad("expected [lo, hi] with lo < hi")
        return [float(e) for e in v]
    if kind == "priors":
        if not isinstance(v, list) or len(v) < 2 or not all(_is_number(p) for p in v):
            bad("expected a list of at least two numbers, one per class")
        if any(p <= 0 for p in v):
            bad("priors must be > 0")
        if abs(sum(v) - 1.0) > 1e-6:
            bad(f"priors must sum to 1 (they sum to {sum(v):.6g})")
        return [float(p) for p in v]
    if kind == "class_array":
        if not isinstance(v, list) or len(v) < 2:
            bad("expected a list with one entry per class (at least two classes)")
        out = [_class_entry(name, e, where, c + 1) for c, e in enumerate(v)]
        if name == "sigmas" and any((s <= 0).any() or not np.isfinite(s).all() for s in out):
            bad("every sigma must be > 0")
        return out
    if kind == "class_weights":
        if not isinstance(v, list) or len(v) < 2:
            bad("expected a list with one entry (a number or a list of component weights) per class")
        out = []
        for e in v:
            w = np.atleast_1d(np.asarray(e if isinstance(e, list) else [e], dtype=object))
            if w.ndim != 1 or not all(_is_number(x) for x in w):
                bad("expected numbers")
            w = w.astype(float)
            if (w < 0).any() or w.sum() <= 0:
                bad("component weights must be >= 0 with a positive sum per class")
            out.append(w)
        return out
    raise AssertionError(kind)


def _class_entry(name: str, e, where: str, c: int) -> np.ndarray:
    """One class's means or sigmas -> (K, D): a number, a D-vector, or K lists of D numbers."""
    msg = (f"{where} {name}: class {c}: expected a number, a list of D numbers, "
           f"or a list of K lists of D numbers, got {e!r}")
    if _is_number(e):
        return np.array([[float(e)]])
    if isinstance(e, list) and e and all(_is_number(x) for x in e):
        return np.array([e], dtype=float)
    if (isinstance(e, list) and e and all(isinstance(r, list) and r for r in e)
            and all(_is_number(x) for r in e for x in r) and len({len(r) for r in e}) == 1):
        return np.array(e, dtype=float)
    raise SweepError(msg)


def _grid_values(name: str, spec, where: str) -> list:
    """A grid axis: a non-empty list of values, or a range helper table."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where} {name}: expected a non-empty list of values")
        return spec
    if not isinstance(spec, dict):
        raise SweepError(f"{where} {name}: expected a list of values or a range table "
                         f"like {{linspace = [0, 1], num = 5}}, got {spec!r}")
    unknown = set(spec) - RANGE_KEYS
    kinds = [k for k in ("linspace", "logspace", "range") if k in spec]
    if unknown or len(kinds) != 1:
        raise SweepError(f"{where} {name}: a range table needs exactly one of linspace, logspace, range "
                         f"(with num or step) and optionally int = true; got keys {sorted(spec)}")
    kind = kinds[0]
    ends = spec[kind]
    if not (isinstance(ends, list) and len(ends) == 2 and all(_is_number(e) for e in ends)):
        raise SweepError(f"{where} {name}.{kind}: expected [start, stop] numbers, got {ends!r}")
    a, b = ends
    if kind == "range":
        step = spec.get("step")
        if not _is_number(step) or step <= 0 or "num" in spec:
            raise SweepError(f"{where} {name}.step: range needs step > 0 (and no num), got {step!r}")
        values = list(np.arange(a, b + step * 1e-9, step))
    else:
        num = spec.get("num")
        if not _is_number(num) or num != int(num) or num < 1 or "step" in spec:
            raise SweepError(f"{where} {name}.num: {kind} needs num, a positive integer, got {num!r}")
        if kind == "logspace":
            if a <= 0 or b <= 0:
                raise SweepError(f"{where} {name}.logspace: ends must be > 0, got {ends!r}")
            values = list(np.geomspace(a, b, int(num)))
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
        return _check_value(name, SETTINGS[name][2], v, where)
    m = ADDRESS.match(name)
    if not m:
        known = ", ".join(sorted(SETTINGS))
        raise SweepError(f"{where} unknown key {name!r}; settings are {known}, "
                         "or task entries like mu2, sigma1, prior1, weight2_k1")
    if not _is_number(v) or not math.isfinite(v):
        raise SweepError(f"{where} {name}: expected a number, got {v!r}")
    if m.group(1) == "sigma" and v <= 0:
        raise SweepError(f"{where} {name}: sigma must be > 0, got {v!r}")
    if m.group(5) and not 0 < v < 1:
        raise SweepError(f"{where} {name}: a prior must be in (0, 1), got {v!r}")
    if m.group(7) and v < 0:
        raise SweepError(f"{where} {name}: a weight must be >= 0, got {v!r}")
    return float(v)


# ---------------------------------------------------------------- loading

def load(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepError(f"{path}: cannot read: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, str(path), text, default_name=path.stem)


def parse(doc: dict, path: str = "<sweep>", text: str = "", default_name: str = "sweep") -> Sweep:
    f = path + ":"
    for key in doc:
        if key not in TOP_LEVEL:
            raise SweepError(f"{f} unknown key {key!r} at top level; expected one of {', '.join(TOP_LEVEL)}")

    name = doc.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SweepError(f"{f} name: expected letters, digits, '_', '-' or '.', got {name!r}")
    seeds = _seeds(doc.get("seeds", 1), f)

    base: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section in SECTIONS:
        table = doc.get(section, {})
        where = f"{f} [{section}]"
        if not isinstance(table, dict):
            raise SweepError(f"{where}: expected a table of settings")
        for key, v in table.items():
            if key not in SETTINGS or SETTINGS[key][0] != section:
                home = f" (it belongs in [{SETTINGS[key][0]}])" if key in SETTINGS else ""
                known = ", ".join(k for k, s in SETTINGS.items() if s[0] == section)
                raise SweepError(f"{where} unknown key {key!r}{home}; known: {known}")
            base[key] = _check_value(key, SETTINGS[key][2], v, where)
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
        values = _grid_values(key, spec, where)
        axes.append([(key, _check_setting(key, v, where), where) for v in values])

    runs = []
    for cname, overrides in case_settings.items():
        for point in itertools.product(*axes):
            settings, where_from = dict(base), dict(origin)
            for key, (v, where) in overrides.items():
                settings[key], where_from[key] = v, where
            for key, v, where in point:
                settings[key], where_from[key] = v, where
            resolved = _resolve(settings, where_from, f)
            for seed in seeds:
                runs.append(Run(cname, seed, resolved.settings, resolved.origin, resolved.task))
    return Sweep(name, path, text, runs)


def _seeds(v, f: str) -> list[int]:
    if _is_number(v) and v == int(v) and v >= 1:
        return list(range(int(v)))
    if (isinstance(v, list) and v and all(_is_number(s) and s == int(s) and 0 <= s < 2**32 for s in v)
            and len(set(v)) == len(v)):
        return [int(s) for s in v]
    raise SweepError(f"{f} seeds: expected a count >= 1 or a list of distinct integers >= 0, got {v!r}")


def _resolve(settings: dict, origin: dict, f: str) -> Run:
    """Fill defaults, apply task addresses, build the task arrays and check them together."""
    for key, (section, default, _) in SETTINGS.items():
        if key not in settings:
            if default is REQUIRED:
                raise SweepError(f"{f} [{section}] {key}: missing required setting "
                                 "(set it in the section, in every case, or in [grid])")
            settings[key] = default
            origin[key] = f"{f} [{section}]"

    means, sigmas = settings["means"], settings["sigmas"]
    n_classes = len(means)
    where = origin["sigmas"] if origin["sigmas"] != origin["means"] else origin["means"]
    if len(sigmas) != n_classes:
        raise SweepError(f"{where} sigmas: {len(sigmas)} classes, but means has {n_classes}")
    dim = means[0].shape[1]
    if any(m.shape[1] != dim for m in means):
        raise SweepError(f"{origin['means']} means: every class needs the same dimension D, "
                         f"got {[m.shape[1] for m in means]}")
    k_max = max(m.shape[0] for m in means)
    mean = np.zeros((n_classes, k_max, dim))
    sigma = np.ones((n_classes, k_max, dim))
    weight = np.zeros((n_classes, k_max))  # padding components get weight 0: never drawn
    weights = settings["weights"]
    if weights is not None and len(weights) != n_classes:
        raise SweepError(f"{origin['weights']} weights: {len(weights)} classes, but means has {n_classes}")
    for c, (m, s) in enumerate(zip(means, sigmas)):
        k = m.shape[0]
        try:
            sigma[c, :k] = np.broadcast_to(s, m.shape)
        except ValueError:
            raise SweepError(f"{origin['sigmas']} sigmas: class {c + 1} has shape {s.shape}, "
                             f"which does not fit its means' shape {m.shape} (K components x D dims)") from None
        mean[c, :k] = m
        mean[c, k:] = m[0]
        if weights is None:
            weight[c, :k] = 1.0 / k
        elif len(weights[c]) != k:
            raise SweepError(f"{origin['weights']} weights: class {c + 1} has {len(weights[c])} weights "
                             f"but {k} components")
        else:
            weight[c, :k] = weights[c] / weights[c].sum()
    priors = settings["priors"]
    if priors is None:
        prior = np.full(n_classes, 1.0 / n_classes)
    elif len(priors) != n_classes:
        raise SweepError(f"{origin['priors']} priors: {len(priors)} values, but means has {n_classes} classes")
    else:
        prior = np.asarray(priors, float)

    for key in list(settings):
        m = ADDRESS.match(key) if key not in SETTINGS else None
        if not m:
            continue
        v, where = settings.pop(key), origin.pop(key)
        if m.group(1):  # mu / sigma
            arr = mean if m.group(1) == "mu" else sigma
            c, k, d = (int(g) if g else None for g in m.group(2, 3, 4))
            if not 1 <= c <= n_classes or (k and not 1 <= k <= k_max) or (d and not 1 <= d <= dim):
                raise SweepError(f"{where} {key}: no such entry (task has {n_classes} classes, "
                                 f"{k_max} components, {dim} dimensions; indices start at 1)")
            arr[c - 1, slice(k - 1, k) if k else slice(None), slice(d - 1, d) if d else slice(None)] = v
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
                raise SweepError(f"{where} {key}: no such entry (task has {n_classes} classes, "
                                 f"{k_max} components)")
            weight[c - 1, k - 1] = v
            if weight[c - 1].sum() <= 0:
                raise SweepError(f"{where} {key}: class {c} would have no positive weight")
            weight[c - 1] /= weight[c - 1].sum()

    steps = settings["steps"]
    if steps * settings["batch_size"] >= 2**31 or (settings["n_data"] != ONLINE and settings["n_data"] >= 2**31):
        raise SweepError(f"{origin['steps']} steps: steps x batch_size and n_data must stay below 2^31 "
                         "(example indices are int32)")
    if settings["checkpoints"] is None:
        series = [m * 10**e for e in range(1, 10) for m in (1, 2, 5)]
        settings["checkpoints"] = [c for c in series if c < steps] + [steps]
    bad = [c for c in settings["checkpoints"] if c > steps]
    if bad:
        where = origin["checkpoints"] if origin["checkpoints"] != origin["steps"] else origin["steps"]
        raise SweepError(f"{where} checkpoints: step {bad[0]} is beyond steps = {steps}")
    if settings["plot_steps"] is None:
        ck = settings["checkpoints"]
        settings["plot_steps"] = sorted({ck[0], ck[len(ck) // 2], ck[-1]})
    missing = [c for c in settings["plot_steps"] if c not in settings["checkpoints"]]
    if missing:
        raise SweepError(f"{origin['plot_steps']} plot_steps: step {missing[0]} is not a checkpoint")
    if settings["width"] is not None or settings["depth"] is not None:
        hidden = settings["hidden"]
        width = settings["width"] if settings["width"] is not None else (hidden[0] if hidden else 64)
        depth = settings["depth"] if settings["depth"] is not None else len(hidden)
        settings["hidden"] = [width] * depth
    if settings["curves"] and dim > 2:
        raise SweepError(f"{origin['curves']} curves: posterior curves need a 1-D or 2-D task (D = {dim})")
    task = {"prior": prior, "weight": weight, "mean": mean, "sigma": sigma}
    return Run("", 0, settings, origin, task)


# ---------------------------------------------------------------- runs -> programs and tables

def static_of(run: Run) -> train.Static:
    s = run.settings
    m, k, d = run.task["mean"].shape
    return train.Static(
        steps=s["steps"], checkpoints=tuple(s["checkpoints"]), num_classes=m, num_components=k, dim=d,
        hidden=tuple(s["hidden"]), activation=s["activation"], init=s["init"], optimizer=s["optimizer"],
        batch_size=s["batch_size"], matmul_precision=s["matmul_precision"],
        eval=metrics.EvalSpec(points=s["points"], hdr_mass=s["hdr_mass"],
                              density_edges=tuple(s["density_edges"]), dense_mass=s["dense_mass"],
                              sparse_mass=s["sparse_mass"], calibration_samples=s["calibration_samples"],
                              calibration_bins=s["calibration_bins"]),
        curve_points=s["curve_points"] if s["curves"] else 0)


def dynamic_of(run: Run) -> train.Dynamic:
    s, t = run.settings, run.task
    task = tasks.make_task(t["prior"], t["mean"], t["sigma"], t["weight"])
    n = 0 if s["n_data"] == ONLINE else s["n_data"]
    return train.make_dynamic(task, s["lr"], s["weight_decay"], s["momentum"], n, run.seed, s["curve_range"])


def task_columns(task: dict[str, np.ndarray]) -> dict[str, float]:
    """Scalar columns named like the sweep addresses: mu2, sigma1_k2, prior1, weight3_k1 ..."""
    n_classes, k_max, dim = task["mean"].shape
    cols = {}
    for c in range(n_classes):
        for k in range(k_max):
            for d in range(dim):
                suffix = (f"_k{k + 1}" if k_max > 1 else "") + (f"_d{d + 1}" if dim > 1 else "")
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
    idx = [(c, j, e) for c in range(m) for j in range(k) for e in range(d)]
    suffix = lambda j, e: (f"_k{j + 1}" if k > 1 else "") + (f"_d{e + 1}" if d > 1 else "")
    mean = np.array([row[f"mu{c + 1}{suffix(j, e)}"] for c, j, e in idx]).reshape(m, k, d)
    sigma = np.array([row[f"sigma{c + 1}{suffix(j, e)}"] for c, j, e in idx]).reshape(m, k, d)
    prior = np.array([row[f"prior{c + 1}"] for c in range(m)])
    weight = (np.array([[row[f"weight{c + 1}_k{j + 1}"] for j in range(k)] for c in range(m)])
              if k > 1 else np.ones((m, 1)))
    return tasks.make_task(prior, mean, sigma, weight)


def run_row(run_id: int, run: Run) -> dict[str, Any]:
    """The runs-table row: identity, task entries and training settings."""
    s = run.settings
    m, k, d = run.task["mean"].shape
    return {
        "run_id": run_id, "case": run.case, "seed": run.seed,
        "num_classes": m, "num_components": k, "dim": d,
        **task_columns(run.task),
        "hidden": "-".join(map(str, s["hidden"])), "depth": len(s["hidden"]),
        "width": s["hidden"][0] if s["hidden"] else 0,
        "activation": s["activation"], "init": s["init"], "optimizer": s["optimizer"],
        "lr": s["lr"], "weight_decay": s["weight_decay"], "momentum": s["momentum"],
        "batch_size": s["batch_size"], "matmul_precision": s["matmul_precision"],
        "n_data": math.inf if s["n_data"] == ONLINE else float(s["n_data"]),
        "steps": s["steps"],
    }
