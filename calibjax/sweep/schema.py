"""The sweep file's schema: its sections, its settings and the names a grid may address.

Most settings are declared on the fields that hold them (``train.Static``, ``metrics.EvalSpec``,
``train.Dynamic``; see ``calibjax.core.settings``); the few that no single field holds are
declared in ``OTHER``. Everything else here is derived from those declarations.
"""

from __future__ import annotations

import re

from calibjax.core import metrics, train
from calibjax.core.settings import REQUIRED, SECTIONS, Setting, declared

MAX_RUNS = 10_000_000  # a sweep with more runs is refused before it is expanded (--max-runs raises it)

STATIC = declared(train.Static)  # settings fixed per compiled program (static_of)
EVAL = declared(metrics.EvalSpec)  # the [eval] settings that fix shapes (Static.eval)
DYNAMIC = train.DYNAMIC_SETTINGS  # the numbers vmapped over (train.make_dynamic), part of the run hash
# Settings that no single field holds: resolved into the task's arrays (task_arrays), into hidden
# (resolve_hidden) or Static.curve_points (static_of), or used by the host (plot_steps).
OTHER = {
    "means": Setting("task", "means"),
    "sigmas": Setting("task", "sigmas"),
    "priors": Setting("task", "priors", None),  # None: equal priors
    "weights": Setting("task", "class_weights", None),  # None: equal component weights
    "width": Setting("model", "pos_int", None),  # with depth: hidden = [width] * depth
    "depth": Setting("model", "nonneg_int", None),
    "curves": Setting("eval", "bool", False),  # record posterior curves (curves.parquet)
    "curve_points": Setting("eval", "curve_points", 201),  # per axis, when curves = true
    "plot_steps": Setting("eval", "checkpoints", None),  # checkpoints the posterior figure shows; None: 3 spread out
}
SETTINGS: dict[str, Setting] = dict(
    sorted({**OTHER, **STATIC, **EVAL, **DYNAMIC}.items(), key=lambda item: SECTIONS.index(item[1].section))
)
COLUMNS = sorted((n for n, s in SETTINGS.items() if s.column is not None), key=lambda n: SETTINGS[n].column)
# Grid axes over these settings, and over task entries mu*/sigma*, are independent (expand.Axis):
# no static setting and no check of another setting depends on their values.
INDEPENDENT = frozenset(n for n, s in SETTINGS.items() if s.independent)
# Settings calibjax no longer has: a sweep that sets one is refused with this reason.
REMOVED = {
    "true_levels": "removed in 0.12.0: the true calibration curve is now integrated over every level "
    "of the evaluation grid, so there are no levels to choose; delete it",
}
TOP_LEVEL = ("name", "description", "seeds", *SECTIONS, "cases", "grid")
ADDRESS = re.compile(r"^(?:(mu|sigma)(\d+)(?:_k(\d+))?(?:_d(\d+))?|(prior)(\d+)|(weight)(\d+)_k(\d+))$")
RANGE_KEYS = {"linspace", "logspace", "range", "num", "step", "int"}

__all__ = [
    "ADDRESS",
    "COLUMNS",
    "DYNAMIC",
    "EVAL",
    "INDEPENDENT",
    "MAX_RUNS",
    "OTHER",
    "RANGE_KEYS",
    "REQUIRED",
    "SECTIONS",
    "SETTINGS",
    "STATIC",
    "TOP_LEVEL",
    "column_value",
    "is_independent",
]


def is_independent(key: str) -> bool:
    m = ADDRESS.match(key)
    return key in INDEPENDENT or bool(m and m.group(1))


def column_value(name: str, value):
    """A setting's value as its runs.parquet column holds it."""
    kind = SETTINGS[name].column_type
    return kind(value) if kind is not None else value
