"""Sweep files: parse, validate, expand into one row per run.

A sweep is TOML (the format: docs/sweep-files.md). Settings live in sections ([task], [model],
[train], [eval]); named cases ([cases.NAME]) and a cartesian [grid] override any setting by its
bare name, and single task entries by address (mu2, sigma1_k2_d1, prior1, weight3_k2). Cases x
grid x seeds expand, in file order, into runs with sequential run_ids.

- ``schema``: the settings (declared on the core's fields, ``calibjax.core.settings``) and sections
- ``validate``: one check per kind of value; ``SweepError``
- ``parsing``: ``load`` and ``parse``: TOML in, a checked ``Sweep`` out
- ``resolve``: a grid point's settings checked together; ``static_of`` and ``dynamic_of``
- ``expand``: ``Sweep``, made lazily from run indices (a million-run sweep is never held as objects)
- ``identity``: the run hash
- ``table``: the runs table

Every user mistake raises ``SweepError`` naming the file, the key and the problem, before
anything is computed or written.
"""

from calibjax.sweep import expand, identity, parsing, resolve, schema, table, validate
from calibjax.sweep.expand import Axis, Block, Sweep
from calibjax.sweep.identity import hash_parts, run_hash, static_json
from calibjax.sweep.parsing import load, parse
from calibjax.sweep.resolve import Run, chunk_dynamic, default_checkpoints, dynamic_of, static_of
from calibjax.sweep.schema import INDEPENDENT, MAX_RUNS, SETTINGS
from calibjax.sweep.table import run_row, runs_table, task_columns, task_from_row
from calibjax.sweep.validate import SweepError

__all__ = [
    "INDEPENDENT",
    "MAX_RUNS",
    "SETTINGS",
    "Axis",
    "Block",
    "Run",
    "Sweep",
    "SweepError",
    "chunk_dynamic",
    "default_checkpoints",
    "dynamic_of",
    "expand",
    "hash_parts",
    "identity",
    "load",
    "parse",
    "parsing",
    "resolve",
    "run_hash",
    "run_row",
    "runs_table",
    "schema",
    "static_json",
    "static_of",
    "table",
    "task_columns",
    "task_from_row",
    "validate",
]
