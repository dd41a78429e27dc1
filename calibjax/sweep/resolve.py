"""Resolution: one grid point's settings, checked together, into a run (its task arrays and every
setting's value), and a run into what the program takes: ``static_of`` (the compiled program's
settings) and ``dynamic_of`` (the numbers vmapped over)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibjax.core import metrics, tasks, train
from calibjax.core.settings import REQUIRED
from calibjax.sweep.schema import ADDRESS, DYNAMIC, EVAL, SETTINGS, STATIC
from calibjax.sweep.validate import SweepError


@dataclass
class Run:
    """One expanded run: its settings (python values) and where each came from."""

    case: str
    seed: int
    settings: dict[str, Any]
    origin: dict[str, str]
    task: dict[str, np.ndarray] = field(default_factory=dict)  # prior (M,), weight (M,K), mean/sigma (M,K,D)


def resolve(settings: dict, origin: dict, f: str) -> tuple[Run, dict, tuple]:
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


def _frozen(v):
    return tuple(v) if isinstance(v, list) else v


def static_of(run: Run) -> train.Static:
    """The static settings of a run: every ``STATIC`` and ``EVAL`` setting, the task's shape, and
    the flags of features compiled in only where used."""
    s = run.settings
    m, k, d = run.task["mean"].shape
    return train.Static(
        **{name: _frozen(s[name]) for name in STATIC},
        eval=metrics.EvalSpec(**{name: _frozen(s[name]) for name in EVAL}),
        num_classes=m,
        num_components=k,
        dim=d,
        curve_points=s["curve_points"] if s["curves"] else 0,
        ema=s["ema_decay"] > 0,
        importance=s["proposal_scale"] != 1.0,
    )


def dynamic_of(run: Run) -> train.Dynamic:
    s, t = run.settings, run.task
    task = tasks.make_task(t["prior"], t["mean"], t["sigma"], t["weight"])
    return train.make_dynamic(task, seed=run.seed, **{k: s[k] for k in DYNAMIC})


def chunk_dynamic(sw, run_ids) -> train.Dynamic:
    """The stacked Dynamic of some runs of a sweep: each grid point's made once, then given its
    runs' seeds (the seed is the only dynamic setting that differs between a point's runs)."""
    ids = np.asarray(run_ids, np.int64)
    s = len(sw.seeds)
    points, inverse = np.unique(ids // s, return_inverse=True)
    per_point = train.stack_dynamic([dynamic_of(sw.point(int(p))) for p in points])
    return train.take_dynamic(per_point, inverse).replace(seed=np.asarray(sw.seeds, np.uint32)[ids % s])
