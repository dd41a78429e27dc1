"""The traceable core: one run as a pure function of its settings, and the exact truth it is
measured against. Everything here is jitted and vmapped; nothing here reads or writes a file or
imports a host-side layer (tests/test_architecture.py checks it).

- ``rng``: counter-based uniforms (Threefry) for data that is regenerated, never stored
- ``portable``: logarithms and exponentials with the same bits on every CPU (host numpy)
- ``tasks``: Gaussian-mixture tasks and their exact posterior
- ``model``: the MLP; ``kernel``: the CPU kernel's operations inside a program
- ``losses``, ``metrics``, ``estimators``: training losses, metrics against the truth, calibration
  estimators benchmarked against it; ``levelsets``: true calibration from the level sets of a score
- ``train``: ``Static`` (shapes, one compile per group), ``Dynamic`` (the vmapped numbers) and the
  training program; ``settings``: how a field of those declares a sweep setting
"""

from calibjax.core import (
    bisection,
    estimators,
    kernel,
    levelsets,
    losses,
    metrics,
    model,
    portable,
    rng,
    settings,
    tasks,
    train,
)
from calibjax.core.metrics import EvalSpec
from calibjax.core.tasks import GaussianTask, make_task
from calibjax.core.train import NUMBERS_VERSION, Dynamic, RunResult, Static, make_dynamic, train_run, train_single

__all__ = [
    "NUMBERS_VERSION",
    "Dynamic",
    "EvalSpec",
    "GaussianTask",
    "RunResult",
    "Static",
    "bisection",
    "estimators",
    "kernel",
    "losses",
    "make_dynamic",
    "make_task",
    "levelsets",
    "metrics",
    "model",
    "portable",
    "rng",
    "settings",
    "tasks",
    "train",
    "train_run",
    "train_single",
]
