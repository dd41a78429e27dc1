"""Sweep settings declared on the fields that hold them.

A field of ``train.Static``, ``metrics.EvalSpec`` or ``train.Dynamic`` that a sweep file may set is
declared with ``setting(...)``: its section of the sweep file, the check its values get, its
default, its column in runs.parquet and whether a grid axis over it is independent. That field is
the one place a setting is written: the sweep layer (``calibjax.sweep.schema``) derives from the
declarations its schema, validation, the static settings of a run (``static_of``), its dynamic
settings (``train.make_dynamic``), the run hash and the runs table's columns. Adding a dynamic
setting is one field of ``Dynamic`` and its use in the program.

The few settings no single field holds (the task's means, sigmas, priors and weights; width and
depth, which make ``hidden``; curves; plot_steps) are declared in ``calibjax.sweep.schema``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a setting without a default: a sweep file must give it
SECTIONS = ("task", "model", "train", "eval")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the sweep layer needs to know about one setting."""

    section: str  # its table in a sweep file: task, model, train or eval
    kind: str  # the check its values get: a key of calibjax.sweep.validate.VALIDATORS
    default: Any = REQUIRED  # the value of a sweep file that omits it (lists where the field holds tuples)
    column: int | None = None  # its position among runs.parquet's setting columns; None: no column
    column_type: type | None = None  # the column's type where it is not the value's own (n_data: float, inf online)
    independent: bool = False  # a grid axis over it changes no static setting and no other setting's check
    encode: Callable[[Any], Any] | None = None  # Dynamic fields: the sweep value -> the numpy scalar vmapped over


def setting(section: str, kind: str, default: Any = REQUIRED, *, sweep_default: Any = REQUIRED, **kw) -> Any:
    """A dataclass field that is also a sweep setting (keywords: those of ``Setting``).

    ``default`` is the field's default and, unless ``sweep_default`` is given, the sweep file's; a
    field without a default (``REQUIRED``) may still have a sweep default (checkpoints: computed
    from steps when a sweep omits them)."""
    if section not in SECTIONS:
        raise ValueError(f"section {section!r}: expected one of {SECTIONS}")
    swept = default if sweep_default is REQUIRED else sweep_default
    if isinstance(swept, tuple):
        swept = list(swept)  # a sweep file writes lists; static_of turns them back into tuples
    meta = {"setting": Setting(section, kind, swept, **kw)}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls) -> dict[str, Setting]:
    """The settings declared on the fields of a dataclass, by field name, in field order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}
