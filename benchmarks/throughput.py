"""Throughput of the study's model: vmapped runs against one-at-a-time baselines.

    python benchmarks/throughput.py                  # the table for the README
    python benchmarks/throughput.py --explore        # compare execution layouts (devices x inner batch)

One model-step = one optimiser update of one classifier (1-64-64-2 MLP, batch 64, Adam, finite
N = 100,000): 1.73 MFLOP by the dense-layer count (train.Static.flops_per_step). Each row trains R
runs with the engine's Trainer (one compiled program, called per devices x inner batch) and, in the
same process, times the same work done one run at a time by the jitted single-run program; if
PyTorch is importable, also the study's own DataLoader loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibjax  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    p.add_argument("--steps", type=int, default=500, help="optimiser updates per run")
    p.add_argument("--inner-batch", type=int, help="runs vmapped together per device (default: calibjax's)")
    p.add_argument("--single-runs", type=int, default=3, help="runs timed one at a time for the baseline")
    p.add_argument("--torch-steps", type=int, default=2000, help="steps of the PyTorch baseline (0: skip)")
    p.add_argument("--precision", default="float32", help="matmul precision (float32, tensorfloat32, default)")
    p.add_argument("--explore", action="store_true", help="time layouts in subprocesses and exit")
    p.add_argument("--widths", type=int, nargs="+", help="time these vectorisation widths (inner batches) "
                   "against each other in this process, interleaved, for R = max(--runs), and exit")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args()


def torch_rate(steps: int) -> float | None:
    """The study's PyTorch loop (seed code): DataLoader over N = 100,000, batch 64, Adam 1e-3."""
    try:
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError:
        return None
    torch.manual_seed(0)
    n = 100_000
    c = torch.randint(0, 2, (n,))
    x = torch.randn(n, 1) + 3.0 * c[:, None]
    loader = DataLoader(TensorDataset(x, c), batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    done, t0 = 0, None
    while done < steps:
        for xb, cb in loader:
            if done == 50:
                t0 = time.perf_counter()  # warm-up excluded
            opt.zero_grad()
            loss_fn(model(xb), cb).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return (steps - 50) / (time.perf_counter() - t0)


def product_ceiling(layout, static, seconds: float = 2.0) -> float:
    """Model-steps/s if a step cost only its three hidden-layer products, in the engine's layout.

    Each device runs, for ``layout.inner_batch`` runs at once, the forward product h @ W, the input
    gradient dz @ W^T and the weight gradient h^T @ dz of the 64 x 64 layer (batch 64): the
    dense-layer work of one step minus the thin first and last layers. Every other part of a step
    (activations, softmax, Adam, the data draw) is extra, so training cannot exceed this rate.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    width, b, r = static.hidden[-1], static.batch_size, layout.inner_batch
    n_dev = len(layout.devices)
    iters = 200

    def local(h, w, dz):
        def body(_, c):
            h, w, dz = c
            z = jnp.einsum("rbi,rio->rbo", h, w)
            dh = jnp.einsum("rbo,rio->rbi", dz, w)
            dw = jnp.einsum("rbi,rbo->rio", h, dz)
            return h + 1e-3 * dh, w - 1e-6 * dw, dz + 1e-3 * z
        return jax.lax.fori_loop(0, iters, body, (h, w, dz))

    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.asarray(layout.devices), ("runs",))
        spec = jax.sharding.PartitionSpec("runs")
        local = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    fn = jax.jit(local)
    key = jax.random.key(0)
    args = [0.1 * jax.random.normal(k, (n_dev * r, b, width)) for k in jax.random.split(key, 3)]
    jax.block_until_ready(fn(*args))
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(fn(*args))
        calls += 1
    return calls * iters * n_dev * r / (time.perf_counter() - t0)


def peak_memory_mb() -> float:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: process peak RSS


def main():
    args = parse_args()
    if args.explore:
        return explore(args)
    if args.widths:
        return compare_widths(args)
    calibjax.setup()  # one XLA CPU device per core ($CALIBJAX_CPU_DEVICES), compilation cache
    import jax

    from calibjax import engine, planning, tasks, train

    task = tasks.make_task([0.5, 0.5], [[[0.0]], [[3.0]]], [[[1.0]], [[1.0]]])
    static = train.Static(steps=args.steps, checkpoints=(args.steps,), matmul_precision=args.precision)
    flops = static.flops_per_step
    layout = planning.default_layout(inner_batch=args.inner_batch, chunk_size=max(args.runs))
    trainer = engine.Trainer(layout)
    peak = planning.matmul_rate(seconds=2.0, n=2048)
    print(f"backend {jax.default_backend()}, {len(layout.devices)} device(s): {layout.devices[0].device_kind}; "
          f"float32 matmul {peak / 1e9:,.1f} GFLOP/s (JAX default precision); model-step {flops / 1e6:.2f} MFLOP; "
          f"{args.steps} steps per run; training matmuls in {args.precision}")

    ceiling = product_ceiling(layout, static)
    print(f"ceiling: the step's three {static.hidden[-1]}x{static.hidden[-1]} products alone, in this layout "
          f"({len(layout.devices)} device(s) x {layout.inner_batch} runs): {ceiling:,.0f} model-steps/s")

    single = train.train_single.lower(static, train.make_dynamic(task, n_data=100_000)).compile()
    single(train.make_dynamic(task, n_data=100_000, seed=99))  # warm-up
    t0 = time.perf_counter()
    for s in range(args.single_runs):
        jax.block_until_ready(single(train.make_dynamic(task, n_data=100_000, seed=s)))
    single_rate = args.single_runs * args.steps / (time.perf_counter() - t0)
    torch = torch_rate(args.torch_steps) if args.torch_steps else None
    print(f"one run at a time (jitted single-run loop): {single_rate:,.0f} model-steps/s"
          + (f"; PyTorch loop of the study: {torch:,.0f} model-steps/s" if torch else "; PyTorch not installed"))

    head = (f"{'runs':>6} {'model-steps/s':>14} {'% matmul peak':>14} {'% ceiling':>10} {'x single':>9} "
            f"{'x torch':>8} {'compile s':>10} {'peak MB':>8}")
    print(head)
    rows = []
    for r in args.runs:
        dyns = train.stack_dynamic([train.make_dynamic(task, n_data=100_000, seed=s) for s in range(r)])
        trainer.executable(static)
        compile_s = trainer.compile_s
        trainer.compile_s = 0.0
        t0 = time.perf_counter()
        trainer(static, dyns)
        wall = time.perf_counter() - t0
        rate = r * args.steps / wall
        row = {"runs": r, "model_steps_per_s": rate, "frac_matmul_peak": rate * flops / peak,
               "frac_ceiling": rate / ceiling,
               "vs_single": rate / single_rate, "vs_torch": rate / torch if torch else None,
               "compile_s": compile_s, "peak_mb": peak_memory_mb(), "inner_batch": layout.inner_batch,
               "padded_runs": -(-r // trainer.per_call) * trainer.per_call,
               "devices": len(layout.devices), "backend": jax.default_backend()}
        rows.append(row)
        vs_torch = f"{row['vs_torch']:.1f}x" if torch else "-"
        print(f"{r:>6} {rate:>14,.0f} {100 * row['frac_matmul_peak']:>13.1f}% {100 * row['frac_ceiling']:>9.0f}% "
              f"{row['vs_single']:>8.1f}x "
              f"{vs_torch:>8} {compile_s:>10.1f} {row['peak_mb']:>8.0f}", flush=True)
    split = fixed_cost(trainer, layout, task, args.steps, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops": peak, "ceiling": ceiling, "single_rate": single_rate,
                                               "torch_rate": torch, "rows": rows, "fixed_cost": split}, indent=2))


def fixed_cost(trainer, layout, task, steps, rows) -> dict | None:
    """Split the largest row's time into each run's fixed cost and its training steps.

    The fixed cost (initialisation, the evaluation set, one checkpoint's evaluation of 7,048
    points) is timed by the same R runs trained for one step.
    """
    from calibjax import train

    row = max((r for r in rows if r["runs"] <= 1024), key=lambda r: r["runs"], default=None)
    if row is None or steps < 2:
        return None
    r = row["runs"]
    one = train.Static(steps=1, checkpoints=(1,))
    dyns = train.stack_dynamic([train.make_dynamic(task, n_data=100_000, seed=s) for s in range(r)])
    trainer(one, dyns)  # compile and warm up
    t0 = time.perf_counter()
    trainer(one, dyns)
    fixed = time.perf_counter() - t0
    wall = r * steps / row["model_steps_per_s"]
    train_rate = r * (steps - 1) / (wall - fixed)
    print(f"R = {r}: fixed cost {1e3 * fixed / r:.2f} ms per run (initialisation, evaluation set, one "
          f"checkpoint's evaluation) = {100 * fixed / wall:.0f} % of the time; training steps alone "
          f"{train_rate:,.0f} model-steps/s")
    return {"runs": r, "fixed_s_per_run": fixed / r, "fixed_fraction": fixed / wall, "train_rate": train_rate}


def compare_widths(args, rounds: int = 4):
    """Model-steps/s of each vectorisation width, timed in one process, interleaved (the machine
    drifts by 20 % within minutes, so separate processes would compare drift)."""
    calibjax.setup()
    from calibjax import engine, planning, tasks, train

    r = max(args.runs)
    task = tasks.make_task([0.5, 0.5], [[[0.0]], [[3.0]]], [[[1.0]], [[1.0]]])
    static = train.Static(steps=args.steps, checkpoints=(args.steps,), matmul_precision=args.precision)
    dyns = train.stack_dynamic([train.make_dynamic(task, n_data=100_000, seed=s) for s in range(r)])
    trainers = {}
    for w in args.widths:
        layout = planning.default_layout(inner_batch=w, chunk_size=r)
        trainers[w] = engine.Trainer(layout)
        trainers[w](static, dyns)  # compile and warm up
    rates = {w: [] for w in args.widths}
    for i in range(rounds):
        for w in args.widths if i % 2 == 0 else args.widths[::-1]:
            t0 = time.perf_counter()
            trainers[w](static, dyns)
            rates[w].append(r * args.steps / (time.perf_counter() - t0))
    for w in args.widths:
        v = sorted(rates[w])
        n_dev = len(trainers[w][0].layout.devices)
        print(f"width {w:>5}: median {v[len(v) // 2]:,.0f} model-steps/s ({r} runs, {n_dev} device(s); "
              f"rounds: {', '.join(f'{x:,.0f}' for x in rates[w])})", flush=True)


def explore(args):
    """Time R = max(--runs) runs under each layout, each in a fresh process."""
    r = max(args.runs)
    cores = len(os.sched_getaffinity(0))
    for devices in sorted({1, cores}):
        for inner in (8, 16, 32, 64, 128, r):
            env = {**os.environ, "CALIBJAX_CPU_DEVICES": str(devices)}  # the child's calibjax.setup() reads it
            out = subprocess.run([sys.executable, __file__, "--runs", str(r), "--steps", str(args.steps),
                                  "--inner-batch", str(inner), "--single-runs", "1", "--torch-steps", "0"],
                                 env=env, capture_output=True, text=True)
            row = [line for line in out.stdout.splitlines() if line.split()[:1] == [str(r)]]
            line = row[-1] if out.returncode == 0 and row else out.stderr[-300:]
            print(f"devices {devices} inner {inner:>5}: {line}", flush=True)


if __name__ == "__main__":
    main()
