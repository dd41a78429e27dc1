"""A run's identity: a hash of its resolved settings, the same whatever file, case name, run_id
or comment it came from (existing results directories depend on these bytes: tested).

The hashed text is fixed by the settings that existed when its format was (0.9.0): those are
hashed always. A setting added since is hashed only where a run sets it away from its default, so
adding a setting keeps the identity of every existing run (and a results directory stays valid).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np

from calibjax.core import train
from calibjax.sweep.resolve import Run
from calibjax.sweep.schema import DYNAMIC, EVAL, STATIC

# The settings of the hash format (0.9.0): every field of Static and EvalSpec then, and the
# dynamic settings then. Never add to these: a new setting is hashed only away from its default.
STATIC_FIELDS_0_9 = frozenset(
    {
        "steps",
        "checkpoints",
        "num_classes",
        "num_components",
        "dim",
        "hidden",
        "activation",
        "init",
        "optimizer",
        "loss",
        "batch_size",
        "eval",
        "curve_points",
        "matmul_precision",
        "ema",
        "importance",
    }
)
EVAL_FIELDS_0_9 = frozenset(
    {
        "points",
        "grid_sigmas",
        "hdr_mass",
        "density_edges",
        "dense_mass",
        "sparse_mass",
        "calibration_samples",
        "calibration_bins",
        "true_levels",
        "estimator_sizes",
        "estimator_draws",
        "estimator_bootstrap",
        "temperature_scaling",
    }
)
# Settings of the format since removed, hashed at the value every run then had (so identities stay):
# eval.true_levels (0.12.0: the level sets are integrated over every level, there are none to choose).
RETIRED_EVAL = {"true_levels": 256}
DYNAMIC_0_9 = frozenset(
    {
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
    }
)


def run_hash(run: Run, static: train.Static) -> str:
    """sha256 (32 hex digits) of a run's resolved settings: its static settings and every number
    that enters its Dynamic."""
    return sha(*hash_parts(run, static_json(static)), seed=run.seed)


@functools.lru_cache(maxsize=64)
def static_json(static: train.Static) -> str:
    """The static settings as hashed: every field but ``dense`` (how the products are computed: the
    results directory's, not the run's), fields added since 0.9.0 only away from their defaults."""
    settings = _hashed(dataclasses.asdict(static), STATIC_FIELDS_0_9, {**STATIC, "dense": None})
    settings["eval"] = _hashed(settings["eval"], EVAL_FIELDS_0_9, EVAL) | RETIRED_EVAL
    return json.dumps(settings, sort_keys=True, default=str)


def _hashed(values: dict, always, declared: dict) -> dict:
    """The entries that enter the hash: those of the 0.9.0 format, and any other not at its default
    (an undeclared field, such as a flag, counts as away from its default unless it is falsy)."""
    out = {}
    for k, v in values.items():
        if k in always:
            out[k] = v
        elif k in declared:
            spec = declared[k]
            if spec is not None and v != spec.default and v != _tupled(spec.default):
                out[k] = v
        elif v:
            out[k] = v
    return out


def _tupled(v):
    return tuple(v) if isinstance(v, list) else v


def hash_parts(run: Run, static_json: str, dynamic: dict = DYNAMIC) -> tuple[str, str]:
    """The text hashed for a run's identity (json.dumps of its settings, keys sorted), split
    around the seed: every seed of a grid point shares the two parts."""
    s = run.settings
    content = {
        "static": "@static@",
        "task": {k: np.asarray(v, float).tolist() for k, v in sorted(run.task.items())},
        "seed": "@seed@",
        **_hashed({k: s[k] for k in dynamic}, DYNAMIC_0_9, dynamic),
    }
    text = json.dumps(content, sort_keys=True, default=str).replace('"@static@"', static_json, 1)
    prefix, suffix = text.split('"@seed@"')
    return prefix, suffix


def sha(prefix: str, suffix: str, seed: int) -> str:
    return hashlib.sha256(f"{prefix}{seed}{suffix}".encode()).hexdigest()[:32]
