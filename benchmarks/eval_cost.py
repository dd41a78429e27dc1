"""Where a sweep's time goes besides the training steps: each phase of a run, per run, in one process.

    python benchmarks/eval_cost.py                        # the table in docs/performance.md
    python benchmarks/eval_cost.py --runs 256 --steps 500 --rounds 2 --json phases.json
    python benchmarks/eval_cost.py --kl-split              # and again with eval.kl_split (the split of kl)

The study's model (1-64-64-2, batch 64, Adam) on example 1, in the engine's layout (its devices,
inner batch and product path). Two tables:

1. Phases, per run (ms of wall time, the fastest of --rounds interleaved timings): each phase is
   its own jitted program over R runs, laid out like the training program (``lax.map`` over
   inner batches, ``shard_map`` over the devices): initialisation (weights and optimiser state),
   the evaluation set (grid, exact posterior, density bins, the run's labelled sample), and one
   checkpoint's evaluation split into its parts: the forward pass (grid and labelled sample), the
   exact metrics (kl, tv, errors, density bins), the true calibration (the level sets' true_ece,
   cal_term, grouping_term, and the reliability table), the estimated calibration (ECE, Brier,
   NLL from the labelled sample), and the whole checkpoint after the forward pass
   (``metrics.evaluate``: what the parts add up to, fused). Then the host work of a chunk of R
   runs: its inputs (``sweep.chunk_dynamic``) and its tables written (``results.write_chunk``).
2. Sweeps: R runs of S steps trained by the engine's Trainer with 1 and with 11 checkpoints, and
   the same runs for one step (the fixed cost: initialisation, evaluation set, one checkpoint);
   training-only = all-in minus the fixed cost. Ratios: all-in / training-only (target: >= 90 %
   at 500 steps) and 11 checkpoints / 1 checkpoint (target: <= 1.10 at 2000 steps).

Numbers vary with the machine and drift within minutes; the rounds are interleaved and the fastest
kept; compare rows of one run of this script only.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibjax  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[256, 1024], help="runs per chunk (R)")
    p.add_argument("--steps", type=int, nargs="+", default=[500, 2000, 5000], help="steps per run (sweep table)")
    p.add_argument("--sweep-runs", type=int, default=256, help="R of the sweep table")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timings of each phase (fastest kept)")
    p.add_argument("--json", help="also write both tables to this file")
    p.add_argument("--kl-split", action="store_true", help="also with eval.kl_split = true (both tables, after)")
    return p.parse_args()


def batched(fn, layout):
    """fn (one run's inputs -> outputs) over a leading run axis, laid out like the training program."""
    import jax
    import numpy as np

    from calibjax.core import train

    mesh = jax.sharding.Mesh(np.asarray(layout.devices), ("runs",)) if len(layout.devices) > 1 else None
    return train.batched(fn, layout.inner_batch, mesh)


SWEEP = """
name = "eval_cost"
seeds = {runs}
[task]
means = [0.0, 3.0]
sigmas = [1.0, 1.0]
[train]
steps = {steps}
checkpoints = {checkpoints}
n_data = 100000
[eval]
kl_split = {kl_split}
"""


def phase_table(r: int, layout, rounds: int, kl_split: bool = False) -> dict[str, float]:
    """ms per run of each phase, for a chunk of r runs (r a multiple of the layout's per-call runs)."""
    import jax

    from calibjax import sweep as sweep_mod
    from calibjax.core import losses, metrics, train
    from calibjax.execution import engine
    from calibjax.storage import chunks, results

    text = SWEEP.format(runs=r, steps=1, checkpoints="[1]", kl_split=str(kl_split).lower())
    sw = sweep_mod.parse(tomllib.loads(text), "eval_cost.toml", text)
    static = layout.static(sweep_mod.static_of(sw.runs[0]))
    spec = static.eval
    model = static.model
    dyn = sweep_mod.chunk_dynamic(sw, list(range(r)))

    def init(d):
        key = jax.random.split(jax.random.key(d.seed), 3)[0]
        params = model.init(key, jax.numpy.zeros((static.dim,), jax.numpy.float32))
        return params, train.make_optimizer(static.optimizer, d, static.steps).init(params)

    def eval_set(d):
        optimum = functools.partial(losses.log_optimum, static.loss, label_smoothing=0.0, focal_gamma=0.0)
        return metrics.make_eval_set(d.task, spec, d.seed, optimum)

    def forward(params, ev):
        log_softmax = jax.nn.log_softmax
        return log_softmax(model.apply(params, ev.x)), log_softmax(model.apply(params, ev.cal_x))

    def exact(ev, log_q):
        return metrics.errors(ev, log_q)

    def true_calibration(ev, log_q):
        return metrics.true_calibration(ev, log_q, spec)

    def estimated(ev, log_q_cal):
        return metrics.estimated_calibration(log_q_cal, ev.cal_y, spec)

    def checkpoint(ev, log_q, log_q_cal):
        return metrics.evaluate(ev, log_q, log_q_cal, spec, jax.numpy.float32(0.0))

    f_init, f_ev = batched(init, layout), batched(eval_set, layout)
    params, _ = f_init(dyn)
    ev = f_ev(dyn)
    f_fwd = batched(forward, layout)
    log_q, log_q_cal = f_fwd(params, ev)
    programs = {
        "initialisation": (f_init, (dyn,)),
        "evaluation set": (f_ev, (dyn,)),
        "checkpoint: forward pass": (f_fwd, (params, ev)),
        "checkpoint: exact metrics": (batched(exact, layout), (ev, log_q)),
        "checkpoint: true calibration": (batched(true_calibration, layout), (ev, log_q)),
        "checkpoint: estimated calibration": (batched(estimated, layout), (ev, log_q_cal)),
        "checkpoint: all but the forward pass": (batched(checkpoint, layout), (ev, log_q, log_q_cal)),
    }
    for fn, args in programs.values():  # compile every program before any timing
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(programs, float("inf"))
    for i in range(rounds):  # interleaved: each round times every phase once
        for name in list(programs) if i % 2 == 0 else list(programs)[::-1]:
            fn, args = programs[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    row = {name: 1e3 * t / r for name, t in best.items()}

    # Host work of a chunk: its inputs, and its tables written (from a real result of these runs).
    trainer = engine.Trainer(layout)
    result = trainer(static, dyn)
    inputs = writes = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(rounds):
            t0 = time.perf_counter()
            sweep_mod.chunk_dynamic(sw, list(range(r)))
            t1 = time.perf_counter()
            chunk_id = f"g0-c{k}-n{r}-{chunks.content_tag(sw.hashes)}"
            results.write_chunk(Path(tmp), chunk_id, static, list(range(r)), sw.hashes, result, layout.identity)
            inputs, writes = min(inputs, t1 - t0), min(writes, time.perf_counter() - t1)
    row["chunk host: inputs"] = 1e3 * inputs / r
    row["chunk host: tables written"] = 1e3 * writes / r
    return row


def sweep_table(r: int, steps_list: list[int], layout, rounds: int, kl_split: bool = False) -> list[dict]:
    """All-in and training-only rates of r runs through the engine, with 1 and 11 checkpoints."""
    from calibjax import sweep as sweep_mod
    from calibjax.execution import engine

    trainer = engine.Trainer(layout)
    rows = []
    for steps in steps_list:
        cks = {
            "fixed": "[1]",
            "1 checkpoint": f"[{steps}]",
            "11 checkpoints": str([round(steps * k / 10) for k in range(11)]),
        }
        statics, dyn = {}, None
        for name, ck in cks.items():
            text = SWEEP.format(
                runs=r, steps=1 if name == "fixed" else steps, checkpoints=ck, kl_split=str(kl_split).lower()
            )
            sw = sweep_mod.parse(tomllib.loads(text), "eval_cost.toml", text)
            statics[name] = sweep_mod.static_of(sw.runs[0])
            dyn = sweep_mod.chunk_dynamic(sw, list(range(r)))
            trainer.executable(statics[name])
        best = dict.fromkeys(cks, float("inf"))
        for i in range(rounds):
            for name in list(cks) if i % 2 == 0 else list(cks)[::-1]:
                t0 = time.perf_counter()
                trainer(statics[name], dyn)
                best[name] = min(best[name], time.perf_counter() - t0)
        train_only = best["1 checkpoint"] - best["fixed"]
        rows.append(
            {
                "runs": r,
                "steps": steps,
                "fixed_ms_per_run": 1e3 * best["fixed"] / r,
                "train_ms_per_run": 1e3 * train_only / r,
                "all_in_1_s": best["1 checkpoint"],
                "all_in_11_s": best["11 checkpoints"],
                "all_in_over_training": train_only / best["1 checkpoint"],
                "eleven_over_one": best["11 checkpoints"] / best["1 checkpoint"],
                "checkpoint_ms_per_run": 1e3 * (best["11 checkpoints"] - best["1 checkpoint"]) / 10 / r,
            }
        )
    return rows


def main():
    args = parse_args()
    calibjax.setup()
    import jax

    from calibjax.execution import planning

    layout = planning.default_layout(chunk_size=max(args.runs))
    print(
        f"calibjax {calibjax.__version__}; {jax.default_backend()}, {len(layout.devices)} device(s) x "
        f"{layout.inner_batch} runs vmapped, dense layers by {layout.dense}; fastest of {args.rounds} rounds"
    )
    results = {}
    for split in (False, True) if args.kl_split else (False,):  # off, then on, in this process
        phases = {r: phase_table(r, layout, args.rounds, split) for r in args.runs}
        print(
            f"\n{'phase (ms per run)' + (', kl_split' if split else ''):<40}"
            + "".join(f"{f'R = {r}':>12}" for r in args.runs)
        )
        for name in phases[args.runs[0]]:
            print(f"{name:<40}" + "".join(f"{phases[r][name]:>12.3f}" for r in args.runs))
        results[split] = {"phases": phases}
    for split, res in results.items():
        res["sweeps"] = sweeps = sweep_table(args.sweep_runs, args.steps, layout, args.rounds, split)
        print(
            f"\n{'runs':>6} {'steps':>6} {'fixed ms/run':>13} {'train ms/run':>13} {'ckpt ms/run':>12} "
            f"{'all-in / train':>15} {'11 / 1 ckpts':>13}" + ("   (kl_split)" if split else "")
        )
        for row in sweeps:
            print(
                f"{row['runs']:>6} {row['steps']:>6} {row['fixed_ms_per_run']:>13.3f} {row['train_ms_per_run']:>13.3f} "
                f"{row['checkpoint_ms_per_run']:>12.3f} {100 * row['all_in_over_training']:>14.1f}% "
                f"{row['eleven_over_one']:>13.3f}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                results[False] if not args.kl_split else {"off": results[False], "kl_split": results[True]}, indent=2
            )
        )


if __name__ == "__main__":
    main()
