"""The runs table (runs.parquet): one row per run, its identity, task entries and settings,
built by index arithmetic over a sweep's blocks; and a task back from a row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from calibjax.core import tasks
from calibjax.sweep.expand import Block, Sweep
from calibjax.sweep.resolve import Run, _entry, _entry_index
from calibjax.sweep.schema import ADDRESS, COLUMNS, SETTINGS, column_value


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
    """The runs-table row: identity, task entries and the settings with a column (``schema.COLUMNS``)."""
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
        **{name: column_value(name, s[name]) for name in COLUMNS},
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
            column = [column_value(key, v) for v in values[key]]
            df[key] = np.asarray(column, object if isinstance(column[0], str) else float)[digits[a]]
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
