"""Synthetic results: what training would hand the host, of the right shapes, without training.

The host path (chunk tables and writes, final tables, summaries, figures) depends on a sweep's
shapes, not on its numbers; ``benchmarks/scale.py`` measures it at a million runs, and tests check
it on the shipped sweeps' shapes, with these stand-ins. The kl falls with training like a power
law with noise, so summaries cross thresholds at varied steps; a share of runs diverges.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from calibjax import sweep as sweep_mod
from calibjax.core import train
from calibjax.execution import planning
from calibjax.storage import files, results


def fake_result(static: train.Static, n_runs: int, seed: int, diverged: float = 0.02) -> train.RunResult:
    """A chunk's result (leading run axis) for ``static``: uniform noise in every field, then a
    falling kl (and kl_rel, loss) per run; about ``diverged`` of the runs end in nan."""
    rng = np.random.default_rng(seed)
    shapes = train.output_shapes(static)
    leaves, treedef = jax.tree.flatten(shapes)
    out = jax.tree.unflatten(treedef, [rng.uniform(0.0, 1.0, (n_runs, *s.shape)).astype(s.dtype) for s in leaves])
    steps = np.asarray(static.checkpoints, np.float64)
    scale = 10 ** rng.uniform(-1.5, 0.5, (n_runs, 1))
    rate = rng.uniform(0.2, 1.2, (n_runs, 1))
    kl = scale * (1.0 + steps) ** -rate * np.exp(rng.normal(0.0, 0.3, (n_runs, len(steps))))
    kl[rng.random(n_runs) < diverged, -1] = np.nan
    info = rng.uniform(0.05, 0.7, (n_runs, 1))
    sc = out.checkpoints.scalars._replace(
        kl=kl.astype(np.float32), kl_rel=(kl / info).astype(np.float32), loss=(kl + 0.3).astype(np.float32)
    )
    return out._replace(checkpoints=out.checkpoints._replace(scalars=sc), mutual_info=info[:, 0].astype(np.float32))


def write_chunks(sw: sweep_mod.Sweep, out: Path, layout: planning.Layout, seed: int = 0, diverged: float = 0.02) -> int:
    """Write every chunk of a sweep, as training would, with synthetic results; returns the chunk count."""
    chunks = planning.plan_chunks(sw, layout)
    for chunk in chunks:
        result = fake_result(chunk.static, len(chunk.run_ids), seed + int(chunk.run_ids[0]), diverged)
        results.write_chunk(out, chunk.chunk_id, chunk.static, chunk.run_ids, chunk.hashes, result, layout.identity)
    return len(chunks)


def new_results(sw: sweep_mod.Sweep, out: Path, layout: planning.Layout) -> None:
    """A results directory for the sweep (manifest and all), as ``calibjax run`` starts one."""
    identity = layout.identity
    results.prepare_output(sw, out, identity, overwrite=False)
    files.write_json(out / "manifest.json", {**results.sweep_manifest(sw), **identity, "complete": False})
