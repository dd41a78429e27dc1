"""Execution: train a sweep's chunks on the devices and write each one as it finishes.

Each group (one ``train.Static``) compiles once, for calls of devices x inner batch runs; its
chunks (``planning``) go through that executable call by call. Finished chunks are written
atomically, so a rerun on the same directory trains only what is missing. ``run_sweep`` ends
with the final tables once every run is there; summaries and figures are the caller's
(``calibjax.pipeline`` chains them).
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from calibjax import sweep as sweep_mod
from calibjax.core import train
from calibjax.execution import planning, runtime
from calibjax.storage import chunks, files, results

POLL_S = 1.0  # how often a process waits for chunks that another process is training


class Trainer:
    """Compiles once per static settings and trains chunks of runs, ``layout.inner_batch``
    at a time on each device."""

    def __init__(self, layout: planning.Layout):
        self.layout = layout
        self.mesh = jax.sharding.Mesh(np.asarray(layout.devices), ("runs",)) if len(layout.devices) > 1 else None
        self._compiled: dict = {}
        self.compiles = 0
        self.compile_s = 0.0

    @property
    def per_call(self) -> int:
        """Runs per call of the compiled program: one batch of ``inner_batch`` on every device."""
        return len(self.layout.devices) * self.layout.inner_batch

    def executable(self, static: train.Static, on_compile=None):
        """The compiled program for calls of ``per_call`` runs of this group (compiled on first use)."""
        static = self.layout.static(static)
        if static not in self._compiled:
            if on_compile:
                on_compile(static, self.per_call)
            t0 = time.perf_counter()
            fn = train.batched_train_fn(static, self.layout.inner_batch, self.mesh)
            placeholders = train.stack_dynamic([train.placeholder_dynamic(static)] * self.per_call)
            self._compiled[static] = fn.lower(placeholders).compile()
            self.compile_s += time.perf_counter() - t0
            self.compiles += 1
        return self._compiled[static]

    def __call__(
        self, static: train.Static, dyn: train.Dynamic, on_compile=None, stop=lambda: False, on_progress=None
    ) -> train.RunResult:
        """Train the runs of the stacked ``dyn``; numpy results.

        Runs go through the compiled program ``per_call`` at a time (the last call padded with
        copies of the last run), so ``on_progress(runs_done)`` hears of each call as it ends and one
        program serves every chunk size; a run's bits do not depend on its call (``planning``).

        Compiling and training run in a worker thread while this (main) thread waits in short
        slices, so a SIGINT or SIGTERM handler runs within a fraction of a second, never after
        the chunk: the caller can then stop at once (the worker stops after the call in flight).
        """
        n = len(dyn.seed)
        per_call = self.per_call
        calls = -(-n // per_call)
        padded = train.take_dynamic(dyn, np.minimum(np.arange(calls * per_call), n - 1))
        box: dict = {"done": 0}

        def work():
            try:
                program = self.executable(static, on_compile)
                parts = []
                for i in range(calls):
                    if box.get("stop"):
                        return
                    out = program(train.take_dynamic(padded, slice(i * per_call, (i + 1) * per_call)))
                    parts.append(jax.tree.map(np.asarray, out))
                    box["done"] = min(n, (i + 1) * per_call)
                box["out"] = jax.tree.map(lambda *v: np.concatenate(v)[:n], *parts)
            except BaseException as e:  # handed to the caller below
                box["error"] = e

        worker = threading.Thread(target=work, daemon=True, name="calibjax-chunk")
        worker.start()
        reported = 0
        while worker.is_alive():
            worker.join(0.1)
            if stop():
                box["stop"] = True
                raise KeyboardInterrupt
            if on_progress and box["done"] != reported:
                reported = box["done"]
                on_progress(reported)
        if "error" in box:
            raise box["error"]
        return box["out"]


@dataclass
class Report:
    """What a call of ``run_sweep`` did, filled in as chunks finish (an interrupted caller reads it)."""

    sweep: sweep_mod.Sweep | None = None
    out: Path | None = None
    shard: tuple[int, int] | None = None
    runs: int = 0
    trained: int = 0
    chunks: int = 0
    compiles: int = 0
    compile_s: float = 0.0
    train_s: float = 0.0
    wall_s: float = 0.0
    model_steps: int = 0
    failed: list[str] = field(default_factory=list)
    complete: bool = False
    missing: list[int] = field(default_factory=list)  # run_ids still missing after the final tables (unsharded)

    @property
    def steps_per_s(self) -> float:
        return self.model_steps / self.train_s if self.train_s else 0.0

    @property
    def where(self) -> Path | None:
        """Where this call wrote its chunks: the directory, or its shard's part."""
        if self.out is None or self.shard is None:
            return self.out
        return self.out / "shards" / f"{self.shard[0]}-of-{self.shard[1]}"


def product(layout: planning.Layout) -> str:
    """How the layout computes the dense layers, in words."""
    return "calibjax's CPU kernel" if layout.dense == "kernel" else "XLA's dot"


def describe_plan(sw: sweep_mod.Sweep, layout: planning.Layout, chunks: list[planning.Chunk], shard) -> str:
    """The line a run starts with: what it trains, where, and about how long it takes."""
    what = f" (shard {shard[0]} of {shard[1]})" if shard else ""
    todo = sum(len(c.run_ids) for c in chunks)
    if not todo:
        return f"{sw.name}{what}: already complete ({len(sw.runs):,} runs in the sweep); nothing to train"
    groups = len({c.group for c in chunks})
    est = planning.estimate_seconds(chunks, layout)
    return (
        f"{sw.name}{what}: training {todo:,} of {len(sw.runs):,} runs in {len(chunks)} chunk(s), "
        f"{groups} compiled program(s); {layout.backend}, {len(layout.devices)} device(s) x {layout.inner_batch} "
        f"runs vmapped, dense layers by {product(layout)}; about {planning.duration(est)} at a nominal rate "
        f"(calibjax plan measures this machine)"
    )


def run_sweep(
    sw: sweep_mod.Sweep,
    out: str | Path,
    *,
    layout: planning.Layout | None = None,
    shard: tuple[int, int] | None = None,
    shard_first: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    stop=lambda: False,
    report: Report | None = None,
    after_chunk=lambda: None,
) -> Report:
    """Train every unfinished run of a sweep (or of one shard of it) into ``out``.

    Without a shard, the final tables are written once every run has finished. Shard k of n
    writes its chunks to ``out/shards/k-of-n`` and leaves joining to ``results.merge``; the first
    sharded run records n (and ``shard_first``, the array task id of shard 0) in the manifest, and
    shards of another n are refused. ``stop()`` is asked between chunks and while one trains; when
    it says yes, KeyboardInterrupt is raised (finished chunks stay, the chunk in flight is
    abandoned). ``report``, if given, is filled in as chunks finish (the caller sees it on an
    interruption too). ``after_chunk()`` is called after each chunk this process writes.
    """
    t_start = time.perf_counter()
    out = Path(out)
    layout = layout or planning.default_layout()
    report = report if report is not None else Report()
    report.sweep, report.out, report.shard = sw, out, shard
    for line in planning.check_sizes(sw, layout):  # (refuses what cannot fit, before anything is written)
        print(line, flush=True)
    opened = open_manifest(sw, out, layout, shard, shard_first, overwrite)
    todo = planning.plan_chunks(
        sw, layout, planning.shard_run_ids(len(sw.runs), shard), done=finished_run_ids(sw, out, layout.identity)
    )
    report.runs, report.chunks = len(sw.runs), len(todo)
    print(describe_plan(sw, layout, todo, shard), flush=True)
    trainer = Trainer(layout)
    ChunkLoop(sw, opened.part, trainer, report, quiet, stop, after_chunk).run(todo)
    report.compiles, report.compile_s = trainer.compiles, trainer.compile_s
    if not report.failed and shard is None:
        report.missing = results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
        report.complete = not report.missing
    report.wall_s = time.perf_counter() - t_start
    close_manifest(opened, shard, report)
    return report


def finished_run_ids(sw: sweep_mod.Sweep, out: Path, identity: dict) -> set[int]:
    """The runs finished in ``out`` in chunks that check out (``chunks.check_chunk``); a chunk that
    does not is moved aside, with one line saying which and why, and its runs are trained again."""
    rejected = []
    done = results.finished_run_ids(out, sw, identity, rejected)
    for d, why in rejected:
        try:
            aside = chunks.set_aside(d)
        except OSError:  # (moved by another process meanwhile)
            continue
        print(f"{d}: {why}; moved aside to {aside.name}, its runs are trained again", flush=True)
    return done


@dataclass
class Opened:
    """A results directory (or shard part) opened for training: the manifest it will be closed with."""

    out: Path
    part: Path  # where chunks go: out, or out/shards/K-of-N
    manifest: dict
    sharding: dict  # shards and shard_first, once a directory is sharded


def open_manifest(
    sw: sweep_mod.Sweep, out: Path, layout: planning.Layout, shard, shard_first: int, overwrite: bool
) -> Opened:
    """Check that ``out`` may take this sweep's runs (``results.prepare_output``, the shard count)
    and record the sweep, the environment and the numbers identity in its manifest."""
    identity = layout.identity
    results.prepare_output(sw, out, identity, overwrite)
    manifest = {**results.sweep_manifest(sw), **runtime.environment(), **identity, "layout": layout.describe()}
    previous = files.read_manifest(out) or {}
    results.check_shard_count(previous, out, shard and shard[1])
    sharding = {k: previous[k] for k in ("shards", "shard_first") if k in previous}
    if shard and not sharding:
        sharding = {"shards": shard[1], "shard_first": shard_first}
    if (
        previous.get("sweep_sha256") != sw.sha256
        or results.numbers_pending(previous)  # new, edited, submitted
        or sharding.keys() - previous.keys()
    ):
        files.write_json(out / "manifest.json", {**previous, **manifest, **sharding, "complete": False})
    part = out / "shards" / f"{shard[0]}-of-{shard[1]}" if shard else out
    return Opened(out, part, manifest, sharding)


def _generation(out: Path) -> dict:
    """The final tables' generation as manifest.json records it now (``results.finalize``)."""
    manifest = files.read_manifest(out) or {}
    return {"generation": manifest["generation"]} if "generation" in manifest else {}


def close_manifest(opened: Opened, shard, report: Report) -> None:
    """The manifest of what this call did: complete or not, chunks, compiles and timings."""
    files.write_json(
        opened.part / "manifest.json",
        {
            **opened.manifest,
            **(opened.sharding if opened.part == opened.out else {}),
            **(_generation(opened.out) if opened.part == opened.out else {}),
            "shard": list(shard) if shard else None,
            "complete": report.complete,
            "trained_this_call": report.trained,
            "chunks_this_call": report.chunks,
            "failed_chunks": report.failed,
            "compiles": report.compiles,
            "compile_s": round(report.compile_s, 3),
            "train_s": round(report.train_s, 3),
            "wall_s": round(report.wall_s, 3),
            "model_steps_per_s": round(report.steps_per_s, 1),
        },
    )


class ChunkLoop:
    """Trains a list of chunks into ``part`` with a progress bar, each under its lock.

    Processes sharing the directory (a user's second run, a requeued task) cooperate: each chunk
    is trained by whoever locks it first; the others go on with other chunks, then wait for it.
    A chunk that fails is reported and the others go on."""

    def __init__(
        self, sw: sweep_mod.Sweep, part: Path, trainer: Trainer, report: Report, quiet: bool, stop, after_chunk
    ):
        self.sw, self.part, self.trainer, self.report, self.quiet, self.stop = sw, part, trainer, report, quiet, stop
        self.after_chunk = after_chunk
        self.bar = None

    def run(self, todo: list[planning.Chunk]) -> None:
        self.bar = tqdm(
            total=sum(len(c.run_ids) for c in todo),
            unit="run",
            disable=self.quiet,
            dynamic_ncols=True,
            desc=self.sw.name,
            smoothing=0.1,
        )
        pending = list(todo)
        while pending:
            waiting = []
            for chunk in pending:
                if self.stop():
                    raise KeyboardInterrupt
                lock = chunks.ChunkLock(self.part, chunk.chunk_id)
                if chunks.chunk_complete(self.part / "chunks" / chunk.chunk_id, self.trainer.layout.identity):
                    self.bar.update(len(chunk.run_ids))  # finished by another process
                elif lock.acquire():
                    self.train(chunk, lock)
                else:
                    waiting.append(chunk)
            if waiting and len(waiting) == len(pending):
                time.sleep(POLL_S)
            pending = waiting
        self.bar.close()

    def on_compile(self, static, size) -> None:
        if not self.quiet:
            self.bar.write(
                f"compiling group: hidden {list(static.hidden)} {static.activation} {static.optimizer}, "
                f"batch {static.batch_size}, {static.steps} steps; {size} runs per call"
            )

    def train(self, chunk: planning.Chunk, lock: chunks.ChunkLock) -> None:
        bar, report, trainer = self.bar, self.report, self.trainer
        dyn = sweep_mod.chunk_dynamic(self.sw, chunk.run_ids)
        base = bar.n
        try:
            compile_before = trainer.compile_s
            t0 = time.perf_counter()
            progress = lambda done: bar.update(base + done - bar.n)  # noqa: E731
            result = trainer(chunk.static, dyn, self.on_compile, self.stop, on_progress=progress)
            report.train_s += time.perf_counter() - t0 - (trainer.compile_s - compile_before)
            identity = trainer.layout.identity
            written = results.write_chunk(
                self.part, chunk.chunk_id, chunk.static, chunk.run_ids, chunk.hashes, result, identity
            )
        except Exception as e:  # a broken chunk must not stop the others
            bar.update(base - bar.n)
            report.failed.append(chunk.chunk_id)
            bar.write(f"chunk {chunk.chunk_id} failed: {type(e).__name__}: {e}")
            if not self.quiet:
                traceback.print_exc()
            return
        finally:
            lock.release()
        if written:
            report.trained += len(chunk.run_ids)
            report.model_steps += len(chunk.run_ids) * chunk.static.steps
        bar.update(base + len(chunk.run_ids) - bar.n)
        bar.set_postfix(steps_s=f"{report.steps_per_s:,.0f}")
        if written:
            self.after_chunk()
