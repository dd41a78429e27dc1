"""Which execution layouts change a run's bits? The study's model (1-64-64-2), 1000 steps.

    python benchmarks/layout_bits.py

Trains 32 runs vmapped together (the reference), then the same runs permuted within the batch,
beside a diverging run, on 2 and 4 devices, in several lax.map batches, at width 16, and alone,
and prints for each whether every number of every run is bit-identical to the reference.
calibjax's fixed vectorisation width rests on this (calibjax/planning.py). Takes about 2 minutes
on 2 CPU cores.
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibjax  # noqa: E402

calibjax.setup(cpu_devices=4, cache_dir="off")
import jax  # noqa: E402
import numpy as np  # noqa: E402

from calibjax.core import metrics, tasks, train  # noqa: E402

W = 32
STATIC = train.Static(steps=1000, checkpoints=(100, 1000), eval=metrics.EvalSpec(points=512))


def task(mu2):
    return tasks.make_task([0.5, 0.5], [[[0.0]], [[mu2]]], [[[1.0]], [[1.0]]])


RUNS = [train.make_dynamic(task(1 + (i % 5) * 0.5), lr=1e-3 * (1 + i % 3), n_data=10_000, seed=i) for i in range(4 * W)]
one_run = functools.partial(train.train_run, STATIC)


def leaves(out):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(out)]


def same(a, b, pairs) -> bool:
    """Every leaf of run i of a equals run j of b, bit for bit (nan equal to nan)."""
    return all(np.array_equal(x[i], y[j], equal_nan=True) for i, j in pairs for x, y in zip(a, b, strict=True))


def on_devices(n, inner=None):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("runs",))
    spec = jax.sharding.PartitionSpec("runs")
    local = jax.vmap(one_run) if inner is None else (lambda d: jax.lax.map(one_run, d, batch_size=inner))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def main():
    vmapped = jax.jit(jax.vmap(one_run))
    ref = leaves(vmapped(train.stack_dynamic(RUNS[:W])))
    diag = [(i, i) for i in range(W)]
    rows = {
        "permuted within the batch": same(
            ref, leaves(vmapped(train.stack_dynamic(RUNS[:W][::-1]))), [(i, W - 1 - i) for i in range(W)]
        ),
        "beside a diverging run (lr 1e30)": same(
            ref,
            leaves(
                vmapped(
                    train.stack_dynamic(
                        RUNS[: W - 1] + [train.make_dynamic(task(3.0), lr=1e30, n_data=10_000, seed=999)]
                    )
                )
            ),
            diag[:-1],
        ),
        "lax.map, 2 batches of 32": same(
            ref,
            leaves(jax.jit(lambda d: jax.lax.map(one_run, d, batch_size=W))(train.stack_dynamic(RUNS[: 2 * W]))),
            diag,
        ),
        "width 16": same(ref, leaves(vmapped(train.stack_dynamic(RUNS[:16]))), diag[:16]),
        "alone (width 1)": same(ref, [x[None] for x in leaves(jax.jit(one_run)(RUNS[0]))], [(0, 0)]),
    }
    if len(jax.devices()) >= 4:  # CPU: simulated devices; a single GPU skips these rows
        rows["2 devices x 32"] = same(ref, leaves(on_devices(2)(train.stack_dynamic(RUNS[: 2 * W]))), diag)
        rows["4 devices x 32"] = same(ref, leaves(on_devices(4)(train.stack_dynamic(RUNS[: 4 * W]))), diag)
        rows["2 devices x lax.map 2 x 32"] = same(
            ref, leaves(on_devices(2, W)(train.stack_dynamic(RUNS[: 4 * W]))), diag
        )
    print(f"bit-identical to the same runs vmapped {W} at a time on 1 device ({jax.default_backend()}):")
    for name, equal in rows.items():
        print(f"  {name:<36} {'identical' if equal else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
