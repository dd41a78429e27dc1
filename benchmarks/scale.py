"""The host path at scale: everything calibjax does around training, for 10k to 1M runs.

    python benchmarks/scale.py                       # 10k, 100k and 1M runs (make bench-scale; about 6 minutes here)
    python benchmarks/scale.py --runs 10000 --old    # with 0.5.0's code paths beside, where they exist

Nothing trains: each chunk's result is synthetic (``calibjax.execution.synthetic``), of the shapes the
sweep's program returns. The sweep is sweeps/scale_10k.toml's (the study's model, 3 checkpoints)
with its grid widened to the run count. Stages, each in a fresh process (so its peak resident
memory, sampled every 5 ms from /proc/self/statm, is its own; JAX and the sweep loaded first):

- expand:   load and check the sweep, plan its chunks (what ``calibjax plan`` does besides JAX)
- inputs:   every run's dynamic settings, stacked per chunk (what a chunk's call is given)
- chunks:   chunk tables from the results, written atomically (``results.write_chunk``)
- final:    the runs table (identities included) and the final tables (``results.finalize``)
- summaries:``summaries.write_summaries`` (per run, over seeds)
- figures:  ``figures.standard_figures`` (kl against steps, the summary heatmaps)

``--old`` also times, in the same processes, 0.5.0's summaries (tests/summaries_reference.py)
and 0.5.0's expansion (every run resolved, tests/test_scale.py's ``naive``) on the same sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SWEEP = """
name = "scale_{runs}"
seeds = 16
[task]
means = [0.0, 3.0]
sigmas = [1.0, 1.0]
[train]
lr = 1e-3
batch_size = 64
n_data = 100_000
steps = 1000
checkpoints = [10, 100, 1000]
[grid]
mu2 = {{linspace = [0.5, 5.0], num = {side}}}
sigma1 = {{logspace = [0.5, 4.0], num = {side}}}
"""
PAGE = os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak resident memory while a stage runs, sampled from /proc/self/statm."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


STAGES = ("expand", "inputs", "chunks", "final", "summaries", "figures")


def one(runs: int, stage_name: str, out: Path, old: bool) -> list[dict]:
    """One stage for one run count, in this (fresh) process: its peak memory is its own. The
    stages before it left their files in ``out``; loading the sweep again is not timed."""
    import calibjax

    calibjax.setup()
    import tomllib

    from calibjax import sweep
    from calibjax.analysis import figures, summaries
    from calibjax.execution import planning, synthetic
    from calibjax.storage import results

    side = round(math.sqrt(runs / 16))
    text = SWEEP.format(runs=runs, side=side)
    n = side * side * 16
    rows = []

    def stage(name, fn, path="new", untimed=lambda: 0.0):
        """Time fn, less ``untimed()`` seconds of work inside it that is not the host's."""
        with Peak() as p:
            value = fn()
        seconds = p.seconds - untimed()
        rows.append(
            {
                "runs": n,
                "stage": name,
                "path": path,
                "seconds": seconds,
                "us_per_run": 1e6 * seconds / n,
                "peak_mb": p.peak / 2**20,
            }
        )
        note = f" ({untimed():.1f} s not counted)" if untimed() else ""
        print(
            f"{n:>9,} {name:<10} {path:<4} {seconds:8.2f} s {1e6 * seconds / n:8.1f} us/run "
            f"peak {p.peak / 2**20:7.0f} MB{note}",
            flush=True,
        )
        return value

    layout = planning.default_layout()
    parse = lambda: sweep.parse(tomllib.loads(text), "scale.toml", text)  # noqa: E731
    if stage_name == "expand":
        stage("expand", lambda: planning.plan_chunks(parse(), layout))
        if old:
            from test_scale import naive

            stage("expand", lambda: naive(parse()), "old")
        return rows
    sw = parse()
    chunks = planning.plan_chunks(sw, layout)
    if stage_name == "inputs":
        stage("inputs", lambda: [sweep.chunk_dynamic(sw, c.run_ids) for c in chunks])
    elif stage_name == "chunks":
        synthetic.new_results(sw, out, layout)
        made = [0.0]

        def write():
            for c in chunks:  # the stand-in for training is made here, one chunk at a time, not timed
                t0 = time.perf_counter()
                result = synthetic.fake_result(c.static, len(c.run_ids), int(c.run_ids[0]))
                made[0] += time.perf_counter() - t0
                results.write_chunk(out, c.chunk_id, c.static, c.run_ids, c.hashes, result, layout.identity)

        stage("chunks", write, untimed=lambda: made[0])
    elif stage_name == "final":
        stage("final", lambda: results.finalize(out, sweep.runs_table(sw), layout.identity))
    elif stage_name == "summaries":
        stage("summaries", lambda: summaries.write_summaries(out))
        if old:
            import summaries_reference as ref

            from calibjax.storage import reader

            t = reader.load_results(out, ("runs", "metrics"))
            summary = stage("summaries", lambda: ref.summarize(t["metrics"], t["runs"]), "old")
            stage("aggregate", lambda: ref.aggregate(summary), "old")
            stage("aggregate", lambda: summaries.aggregate(summary), "new")
    elif stage_name == "figures":
        stage("figures", lambda: figures.standard_figures(out))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--old", action="store_true", help="also time 0.5.0's code paths where they exist")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=STAGES,
        help="run these stages only (a stage reads what the ones before it wrote: with --keep)",
    )
    p.add_argument("--keep", help="results directory to write and keep (default: a temporary one)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the worker: one run count,
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one stage,
    p.add_argument("--dir", help=argparse.SUPPRESS)  # on this results directory
    args = p.parse_args()
    if args.one:
        print("ROWS " + json.dumps(one(args.one, args.stage, Path(args.dir), args.old)))
        return
    rows = []
    for runs in args.runs:
        with tempfile.TemporaryDirectory(prefix="calibjax-scale-") as tmp:
            for stage in args.stages:  # a fresh process each, so a peak is the stage's own
                where = f"{args.keep}-{runs}" if args.keep else f"{tmp}/r"
                cmd = [sys.executable, __file__, "--one", str(runs), "--stage", stage, "--dir", where]
                proc = subprocess.run(cmd + (["--old"] if args.old else []), capture_output=True, text=True)
                sys.stdout.write(
                    "".join(f"{line}\n" for line in proc.stdout.splitlines() if not line.startswith("ROWS "))
                )
                if proc.returncode:
                    sys.exit(proc.stderr)
                rows += json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))[5:])
    print("\nhost overhead per run (all stages, new path):")
    for runs in sorted({r["runs"] for r in rows}):
        new = [r for r in rows if r["runs"] == runs and r["path"] == "new" and r["stage"] != "aggregate"]
        print(
            f"  {runs:>9,} runs: {sum(r['us_per_run'] for r in new) / 1000:.3f} ms/run, "
            f"peak {max(r['peak_mb'] for r in new):,.0f} MB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
