"""Throughput of the study's model: vmapped runs, both product paths, against PyTorch baselines.

    python benchmarks/throughput.py                  # the table for the README
    python benchmarks/throughput.py --explore        # compare execution layouts (devices x inner batch)

One model-step = one optimiser update of one classifier (1-64-64-2 MLP, batch 64, Adam, finite
N = 100,000): 1.65 MFLOP by the dense-layer count (train.Static.flops_per_step). First, for each
product path (XLA's dot; on CPU also calibjax's kernel, cpu_kernel), the rate of the step's three
64 x 64 products alone in the engine's layout: GFLOP/s and the model-steps/s they would allow (the
ceiling). Then each row trains R runs with the engine's Trainer for each path, interleaved (this
machine drifts by 20 % within minutes), and reports model-steps/s all-in (initialisation, the
evaluation set and one checkpoint's evaluation included) and of the training steps alone (the same
runs trained for one step, subtracted). Baselines in the same process: the jitted single-run
program; if PyTorch is importable, the study's own DataLoader loop and a batched PyTorch ensemble
of the same R models (stacked weights, baddbmm, fused Adam) at R <= 1024.
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

NAMES = {"xla": "XLA's dot", "kernel": "calibjax kernel"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--steps", type=int, default=500, help="optimiser updates per run")
    p.add_argument("--inner-batch", type=int, help="runs vmapped together per device (default: calibjax's)")
    p.add_argument("--single-runs", type=int, default=3, help="runs timed one at a time for the baseline")
    p.add_argument("--torch-steps", type=int, default=2000, help="steps of the PyTorch baseline (0: skip)")
    p.add_argument("--precision", default="float32", help="matmul precision (float32, tensorfloat32, default)")
    p.add_argument("--explore", action="store_true", help="time layouts in subprocesses and exit")
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        help="time these vectorisation widths (inner batches) "
        "against each other in this process, interleaved, for R = max(--runs), and exit",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved timings of each path per row (fastest kept)")
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


def torch_ensemble_rate(r: int, seconds: float = 3.0) -> float | None:
    """Model-steps/s of R study models trained as one batched PyTorch ensemble: weights stacked
    (R, in, out), forward by baddbmm, cross-entropy summed over the runs, Adam with fused=True;
    each step draws a fresh batch of 64 per run from the study's example 1 (what calibjax's online
    training does). PyTorch uses every core (torch.get_num_threads())."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    widths = (1, 64, 64, 2)
    params = []
    for a, b in zip(widths, widths[1:], strict=False):
        bound = a**-0.5
        params += [
            (torch.rand(r, a, b) * 2 - 1).mul_(bound).requires_grad_(),
            (torch.rand(r, 1, b) * 2 - 1).mul_(bound).requires_grad_(),
        ]
    try:
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)

    def step():
        c = torch.randint(0, 2, (r, 64))
        x = (torch.randn(r, 64, 1) + 3.0 * c[..., None]).float()
        h = x
        for i in range(0, len(params), 2):
            h = torch.baddbmm(params[i + 1], h, params[i])
            if i + 2 < len(params):
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h.reshape(-1, 2), c.reshape(-1), reduction="sum") / 64
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return r * steps / (time.perf_counter() - t0)


def product_ceiling(layout, static, seconds: float = 2.0) -> float:
    """Model-steps/s if a step cost only its three hidden-layer products, in the engine's layout.

    Each device runs, for ``layout.inner_batch`` runs at once, by the layout's product path
    (``layout.dense``), the forward product h @ W, the input
    gradient dz @ W^T and the weight gradient h^T @ dz of the 64 x 64 layer (batch 64): the
    dense-layer work of one step minus the thin first and last layers. Every other part of a step
    (activations, softmax, Adam, the data draw) is extra, so training cannot exceed this rate.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from calibjax.core import kernel

    width, b, r = static.hidden[-1], static.batch_size, layout.inner_batch
    n_dev = len(layout.devices)
    iters = 200

    def local(h, w, dz):
        def body(_, c):
            h, w, dz = c
            if layout.dense == "kernel":
                z = kernel.batched_matmul(h, w)
                dh = kernel.batched_matmul(dz, w, trans_b=True)
                dw = kernel.batched_matmul(h, dz, trans_a=True)
            else:
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


def cpu_model() -> str:
    from calibjax.execution import kernel_loader, runtime

    kernel = f", kernel variant {kernel_loader.loaded_variant()}" if kernel_loader.available() else ""
    return (
        f"{runtime.cpu_model() or 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores, vector ISA "
        f"{runtime.cpu_isa()}{kernel}"
    )


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

    from calibjax.core import tasks, train
    from calibjax.execution import engine, kernel_loader, planning

    task = tasks.make_task([0.5, 0.5], [[[0.0]], [[3.0]]], [[[1.0]], [[1.0]]])
    static = train.Static(steps=args.steps, checkpoints=(args.steps,), matmul_precision=args.precision)
    one_step = train.Static(steps=1, checkpoints=(1,), matmul_precision=args.precision)
    flops = static.flops_per_step
    product_flops = 3 * 2 * static.batch_size * static.hidden[-1] ** 2  # the three hidden products of a step
    paths = ["xla"] + (["kernel"] if jax.default_backend() == "cpu" and kernel_loader.available() else [])
    layouts = {
        p: planning.default_layout(inner_batch=args.inner_batch, chunk_size=max(args.runs), dense=p) for p in paths
    }
    layout = layouts["xla"]
    trainers = {p: engine.Trainer(layouts[p]) for p in paths}
    peak = planning.matmul_rate(seconds=2.0, n=2048)
    print(
        f"backend {jax.default_backend()}, {len(layout.devices)} device(s): {layout.devices[0].device_kind} "
        f"({cpu_model()}); float32 matmul {peak / 1e9:,.1f} GFLOP/s (2048^2, XLA); model-step "
        f"{flops / 1e6:.2f} MFLOP; {args.steps} steps per run; training matmuls in {args.precision}"
    )

    ceilings = {}
    for p in paths:
        ceilings[p] = product_ceiling(layouts[p], static)
        print(
            f"{NAMES[p]:>15}: the step's three {static.hidden[-1]}x{static.hidden[-1]} products (batch "
            f"{static.batch_size}) alone, {len(layout.devices)} device(s) x {layout.inner_batch} runs: "
            f"{ceilings[p] * product_flops / 1e9:,.1f} GFLOP/s = ceiling {ceilings[p]:,.0f} model-steps/s",
            flush=True,
        )

    single = train.train_single.lower(static, train.make_dynamic(task, n_data=100_000)).compile()
    single(train.make_dynamic(task, n_data=100_000, seed=99))  # warm-up
    t0 = time.perf_counter()
    for s in range(args.single_runs):
        jax.block_until_ready(single(train.make_dynamic(task, n_data=100_000, seed=s)))
    single_rate = args.single_runs * args.steps / (time.perf_counter() - t0)
    torch = torch_rate(args.torch_steps) if args.torch_steps else None
    print(
        f"one run at a time (jitted single-run loop): {single_rate:,.0f} model-steps/s"
        + (f"; PyTorch loop of the study: {torch:,.0f} model-steps/s" if torch else "; PyTorch not installed")
    )

    head = (
        f"{'runs':>6} {'path':>7} {'model-steps/s':>14} {'training only':>14} {'% ceiling':>10} {'x xla':>6} "
        f"{'torch ens.':>11} {'x ens.':>7} {'x single':>9} {'compile s':>10} {'peak MB':>8}"
    )
    print(head)
    rows = []
    for r in args.runs:
        dyns = train.stack_dynamic([train.make_dynamic(task, n_data=100_000, seed=s) for s in range(r)])
        compile_s = {}
        for p in paths:
            trainers[p].compile_s = 0.0
            trainers[p].executable(static), trainers[p].executable(one_step)
            compile_s[p] = trainers[p].compile_s
        walls = {p: [] for p in paths}
        for i in range(args.rounds):  # interleaved, alternating which path goes first
            for p in paths if i % 2 == 0 else paths[::-1]:
                t0 = time.perf_counter()
                trainers[p](one_step, dyns)
                t1 = time.perf_counter()
                trainers[p](static, dyns)
                walls[p].append((t1 - t0, time.perf_counter() - t1))
        ensemble = torch_ensemble_rate(r) if torch is not None and r <= 1024 else None
        base = None
        for p in paths:
            fixed, wall = min(walls[p], key=lambda w: w[1])  # the fastest round
            rate = r * args.steps / wall
            train_rate = r * (args.steps - 1) / max(wall - fixed, 1e-9)
            base = base or train_rate
            row = {
                "runs": r,
                "path": p,
                "model_steps_per_s": rate,
                "train_steps_per_s": train_rate,
                "frac_ceiling": train_rate / ceilings[p],
                "vs_xla": train_rate / base,
                "torch_ensemble": ensemble,
                "vs_ensemble": train_rate / ensemble if ensemble else None,
                "vs_single": rate / single_rate,
                "vs_torch_loop": rate / torch if torch else None,
                "compile_s": compile_s[p],
                "peak_mb": peak_memory_mb(),
                "inner_batch": layout.inner_batch,
                "padded_runs": -(-r // trainers[p].per_call) * trainers[p].per_call,
                "devices": len(layout.devices),
                "backend": jax.default_backend(),
                "rounds": [r * args.steps / w for _, w in walls[p]],
            }
            rows.append(row)
            ens = f"{ensemble:>11,.0f} {row['vs_ensemble']:>6.1f}x" if ensemble else f"{'-':>11} {'-':>7}"
            print(
                f"{r:>6} {p:>7} {rate:>14,.0f} {train_rate:>14,.0f} {100 * row['frac_ceiling']:>9.0f}% "
                f"{row['vs_xla']:>5.2f}x {ens} {row['vs_single']:>8.1f}x {compile_s[p]:>10.1f} "
                f"{row['peak_mb']:>8.0f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "matmul_flops": peak,
                    "ceilings": ceilings,
                    "single_rate": single_rate,
                    "torch_rate": torch,
                    "rows": rows,
                },
                indent=2,
            )
        )


def compare_widths(args, rounds: int = 4):
    """Model-steps/s of each vectorisation width, timed in one process, interleaved (the machine
    drifts by 20 % within minutes, so separate processes would compare drift)."""
    calibjax.setup()
    from calibjax.core import tasks, train
    from calibjax.execution import engine, planning

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
        print(
            f"width {w:>5}: median {v[len(v) // 2]:,.0f} model-steps/s ({r} runs, {n_dev} device(s); "
            f"rounds: {', '.join(f'{x:,.0f}' for x in rates[w])})",
            flush=True,
        )


def explore(args):
    """Time R = max(--runs) runs under each layout, each in a fresh process."""
    r = max(args.runs)
    cores = len(os.sched_getaffinity(0))
    for devices in sorted({1, cores}):
        for inner in (8, 16, 32, 64, 128, r):
            env = {**os.environ, "CALIBJAX_CPU_DEVICES": str(devices)}  # the child's calibjax.setup() reads it
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--runs",
                    str(r),
                    "--steps",
                    str(args.steps),
                    "--inner-batch",
                    str(inner),
                    "--single-runs",
                    "1",
                    "--torch-steps",
                    "0",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            row = [line for line in out.stdout.splitlines() if line.split()[:1] == [str(r)]]
            line = row[-1] if out.returncode == 0 and row else out.stderr[-300:]
            print(f"devices {devices} inner {inner:>5}: {line}", flush=True)


if __name__ == "__main__":
    main()
