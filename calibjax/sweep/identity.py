"""A run's identity: a hash of its resolved settings, the same whatever file, case name, run_id
or comment it came from (existing results directories depend on these bytes: tested)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np

from calibjax.core import train
from calibjax.sweep.resolve import Run
from calibjax.sweep.schema import DYNAMIC


def run_hash(run: Run, static: train.Static) -> str:
    """sha256 (32 hex digits) of a run's resolved settings: its static settings and every number
    that enters its Dynamic."""
    return sha(*hash_parts(run, static_json(static)), seed=run.seed)


@functools.lru_cache(maxsize=64)
def static_json(static: train.Static) -> str:
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
        **{k: s[k] for k in DYNAMIC},
    }
    text = json.dumps(content, sort_keys=True, default=str).replace('"@static@"', static_json, 1)
    prefix, suffix = text.split('"@seed@"')
    return prefix, suffix


def sha(prefix: str, suffix: str, seed: int) -> str:
    return hashlib.sha256(f"{prefix}{seed}{suffix}".encode()).hexdigest()[:32]
