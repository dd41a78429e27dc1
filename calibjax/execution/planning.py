"""Planning: how a sweep's runs are laid on the devices and cut into chunks; memory and time.

Nothing here trains. A ``Layout`` says which devices share the run axis, how many runs each
vmaps at once (the vectorisation width) and how much memory a chunk may use; ``plan_chunks``
cuts each static group's pending runs into chunks of one padded size (one compile per group);
``plan`` estimates a sweep's memory and time for ``calibjax plan``.

The vectorisation width is part of a run's numbers: XLA computes a vmapped batch of W runs with
kernels chosen for W, and one-ulp differences grow over training (measured: widths 16 and 32
give different bits after 1000 steps). Everything else about the layout does not change a bit
(measured and tested: a run's position in its batch, its neighbours, diverging ones included,
the number of batches per device, the number of devices). So the width is fixed per backend and
never narrowed to fit a small chunk: chunks are padded to whole batches instead, and a results
directory records its width and accepts no results of another.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from dataclasses import dataclass, field

import jax
import numpy as np
import pandas as pd

from calibjax import sweep as sweep_mod
from calibjax.core import estimators, levelsets, metrics, train
from calibjax.execution import kernel_loader, runtime
from calibjax.storage import chunks, results, tables

# Runs vmapped together per device (the vectorisation width): narrow on CPU (padding wastes least),
# wide on GPU (fills the device). The measurements behind every constant here: docs/performance.md,
# "Planning constants".
CPU_INNER_BATCH = 8
GPU_INNER_BATCH = 1024
CPU_MAX_CHUNK = 1024  # most runs per chunk: bounds lost work on a kill
GPU_MAX_CHUNK = 16384
MEMORY_FRACTION = 0.5  # of device (or, on CPU, host) memory a chunk may plan to use
# A chunk is the work an interruption can lose: at most this long by a nominal rate per device.
# The rate is a fixed constant, not measured, so that chunk boundaries (and names) depend only on
# the sweep and the layout, and processes sharing a directory plan the same chunks.
MAX_CHUNK_SECONDS = 300.0
DEFAULT_CHUNK_MINUTES = MAX_CHUNK_SECONDS / 60  # calibjax run --chunk-minutes
NOMINAL_FLOPS_PER_DEVICE = {"cpu": 2.5e10, "gpu": 1e13}  # ~15k model-steps/s per CPU core
F32, F64 = 4, 8
# Fraction of the matmul rate that training and evaluation reach, for plan's time estimate.
EFFICIENCY = {"cpu": 0.35, "gpu": 0.05}
COMPILE_S = 10.0  # typical compile time of one group here (CPU); plan adds it per group


def _estimator_working(static: train.Static, units: int) -> int:
    """Words the estimator benchmark holds per run (0 when off): one draw's sample, its model outputs
    and sorted copies, and the forward pass of one block."""
    n = max(static.eval.estimator_sizes, default=0)
    if not n:
        return 0
    return n * (static.dim + 3 * static.num_classes + 16) + 2 * min(estimators.FORWARD_BLOCK, n) * units


@functools.lru_cache(maxsize=256)
def memory_per_run(static: train.Static) -> tuple[int, int]:
    """Estimated bytes per run: (working set while it trains, results held until the chunk ends).

    Working set (a model of the compiled program): parameters, gradients and two Adam moments;
    training activations (forward and backward) of one batch; the evaluation set and its forward
    pass; posterior curves. Held: the run's result on the device (its exact size, from the traced
    function) and the host tables built from it (8-byte columns).
    """
    widths = (static.dim, *static.hidden, static.num_classes)
    n_params = sum(a * b + b for a, b in itertools.pairwise(widths))
    units = sum(widths)
    g, m, nb = static.eval.points, static.num_classes, static.eval.num_bins
    s, p = static.eval.calibration_samples, static.curve_points**static.dim
    working = F32 * (
        4 * n_params
        + 3 * static.batch_size * units
        + (g + s) * (static.dim + 2 * m + nb + 5)
        + g * nb
        + 2 * (g + s) * units
        + p * (units + m)
        + g * levelsets.LEVEL_SET_WORDS * (2 if static.eval.kl_split and m == 2 else 1)  # (a batch of two solves)
        + _estimator_working(static, units)
    )
    table_bytes = sum(rows * cols * F64 for rows, cols in tables.row_counts(static).values())
    return working, tables.output_bytes(static) + table_bytes


def device_memory(device) -> int:
    """Bytes a chunk may plan on: the accelerator's limit, or the host memory this process may use
    (``runtime.memory_limit``: RAM, a SLURM allocation or a cgroup limit) shared by CPU devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return runtime.memory_limit()[0] // max(1, len(jax.local_devices(backend="cpu")))


@dataclass(frozen=True)
class Layout:
    """How a group's runs are laid out on the hardware."""

    devices: tuple  # devices the run axis is sharded over
    inner_batch: int  # runs vmapped together on one device, always (lax.map over such batches)
    max_chunk: int  # most runs per chunk (written, locked and resumed as a unit)
    memory: int  # bytes per device a chunk may plan to use
    max_chunk_s: float = MAX_CHUNK_SECONDS  # most nominal seconds of work per chunk
    dense: str = "xla"  # how the dense layers are computed: "kernel" (calibjax's CPU kernel) or "xla"

    @property
    def backend(self) -> str:
        return self.devices[0].platform

    @property
    def identity(self) -> dict:
        """What besides their settings fixes the bits of the runs this layout trains."""
        cpu_class = runtime.cpu_class(self.dense) if self.backend == "cpu" else None
        return results.numbers_identity(self.backend, self.inner_batch, self.dense, cpu_class)

    def chunk_size(self, n_runs: int, static: train.Static) -> tuple[int, int]:
        """(runs per chunk, that rounded up to whole batches on every device) for a group of n_runs.

        Runs per chunk is bounded by max_chunk, the memory budget and max_chunk_s of work at the
        nominal rate (but is at least one batch per device). A chunk is trained in calls of
        devices x inner batch runs (``engine.Trainer``; its last call padded with copies), so
        every run is computed in a batch of exactly ``inner_batch`` runs by the group's one program.
        """
        n_dev = len(self.devices)
        working, held = memory_per_run(static)
        by_memory = max(1, (self.memory - self.inner_batch * working) // held) * n_dev
        per_call = n_dev * self.inner_batch
        rate = NOMINAL_FLOPS_PER_DEVICE.get(self.backend, NOMINAL_FLOPS_PER_DEVICE["gpu"]) * n_dev
        by_time = max(per_call, int(self.max_chunk_s * rate / static.flops_per_run) // per_call * per_call)
        runs = max(1, min(n_runs, self.max_chunk, by_memory, by_time))
        return runs, math.ceil(runs / per_call) * per_call

    def describe(self) -> dict:
        return {
            "devices": len(self.devices),
            "backend": self.backend,
            "inner_batch": self.inner_batch,
            "max_chunk": self.max_chunk,
            "memory_per_device": self.memory,
            "max_chunk_s": self.max_chunk_s,
            "dense": self.dense,
        }

    def static(self, static: train.Static) -> train.Static:
        """A group's settings as this layout compiles them (its dense-layer products)."""
        return static if static.dense == self.dense else dataclasses.replace(static, dense=self.dense)


def default_layout(
    chunk_size: int | None = None,
    inner_batch: int | None = None,
    devices=None,
    max_chunk_s: float = MAX_CHUNK_SECONDS,
    dense: str | None = None,
) -> Layout:
    """The fastest layout measured for the hardware at hand (benchmarks/throughput.py --explore).

    dense: "kernel", "xla" or "auto" (``kernel_loader.resolve``; None: ``dense_choice(None)``).
    """
    devices = tuple(devices if devices is not None else jax.local_devices())
    cpu = devices[0].platform == "cpu"
    inner = inner_batch or (CPU_INNER_BATCH if cpu else GPU_INNER_BATCH)
    max_chunk = chunk_size or (CPU_MAX_CHUNK if cpu else GPU_MAX_CHUNK)
    product = kernel_loader.resolve(dense or dense_choice(None), devices[0].platform)
    return Layout(devices, inner, max_chunk, int(device_memory(devices[0]) * MEMORY_FRACTION), max_chunk_s, product)


# How the dense layers are computed unless asked otherwise: "auto", calibjax's CPU kernel on CPU where
# it builds (faster than XLA's dot: docs/performance.md), XLA elsewhere.
DEFAULT_DENSE = "auto"


def dense_choice(flag: str | None, manifest: dict | None = None) -> str:
    """How to compute the dense layers' products: the --dense flag, else $CALIBJAX_DENSE, else what
    the results directory recorded for this backend (so a resumed sweep keeps its numbers; one
    written before the kernel existed used XLA), else DEFAULT_DENSE."""
    if flag or os.environ.get("CALIBJAX_DENSE"):
        return flag or os.environ["CALIBJAX_DENSE"]
    if manifest and manifest.get("backend") == jax.default_backend():
        return manifest.get("dense", "xla")
    return DEFAULT_DENSE


@dataclass
class Chunk:
    group: int
    static: train.Static
    run_ids: np.ndarray  # int64, ascending
    size: int  # runs per chunk of its group, rounded up to whole batches on every device
    sweep: sweep_mod.Sweep | None = field(default=None, repr=False)  # knows the runs' identities

    @functools.cached_property
    def hashes(self) -> tuple[str, ...]:
        """The runs' identities (sweep.Sweep.hashes), computed when the chunk is named."""
        return tuple(self.sweep.run_hashes(self.run_ids)) if self.sweep is not None else ()

    @property
    def chunk_id(self) -> str:
        """Names the chunk's place and, by a hash of its runs' identities, its content: a chunk of
        another version of the sweep never takes the name of a different set of runs."""
        return f"g{self.group:03d}-r{int(self.run_ids[0]):07d}-n{len(self.run_ids)}-{chunks.content_tag(self.hashes)}"


def shard_run_ids(n_runs: int, shard: tuple[int, int] | None) -> np.ndarray | None:
    """Shard k of n owns run_ids i with i % n == k: deterministic, and balanced over groups (None:
    no shard, every run)."""
    if shard is None:
        return None
    k, n = shard
    return np.arange(k, n_runs, n, dtype=np.int64)


def plan_chunks(sw: sweep_mod.Sweep, layout: Layout, run_ids=None, done=frozenset()) -> list[Chunk]:
    """Cut each group's runs (those in run_ids) into chunks, and keep what is not done.

    Chunks are cut before finished runs are left out, so their boundaries (and names) depend on
    the sweep and the layout alone: processes sharing a directory plan the same chunks whenever
    they start. A chunk partly done (by another layout) keeps only its unfinished runs.
    """
    done = np.fromiter(done, np.int64, len(done))
    chunks = []
    for g, static in enumerate(sw.block_groups[0]):
        ids = sw.group_runs(g, run_ids)
        if len(ids):
            runs, size = layout.chunk_size(len(ids), static)
            for start in range(0, len(ids), runs):
                todo = ids[start : start + runs]
                todo = todo[~np.isin(todo, done)] if len(done) else todo
                if len(todo):
                    chunks.append(Chunk(g, static, todo, size, sw))
    return chunks


def estimate_seconds(chunks: list[Chunk], layout: Layout) -> float:
    """Rough training time of these chunks at the nominal rate (padding included), plus one compile
    per group: what a run announces before it starts (``plan`` measures the machine instead)."""
    rate = NOMINAL_FLOPS_PER_DEVICE.get(layout.backend, NOMINAL_FLOPS_PER_DEVICE["gpu"]) * len(layout.devices)
    return sum(c.size * c.static.flops_per_run for c in chunks) / rate + COMPILE_S * len({c.group for c in chunks})


MAX_LAYERS = 64  # hidden layers: the compiled program grows (and compiles slower) with each
MAX_RUN_SECONDS = 7 * 24 * 3600.0  # one run longer than this at the nominal rate is refused
WARN_RUN_SECONDS = 3600.0  # ... and one longer than this announced


def _size(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"


def check_sizes(sw: sweep_mod.Sweep, layout: Layout) -> list[str]:
    """Refuse, before anything is written, a group whose one run cannot fit this machine: more
    hidden layers than MAX_LAYERS, a call's working set and one run's results beyond a device's
    memory budget, or a run longer than MAX_RUN_SECONDS at the nominal rate; each message names the
    sweep key that accounts for most of it (``_culprit``). Returns warnings for runs longer than
    WARN_RUN_SECONDS."""
    rate = NOMINAL_FLOPS_PER_DEVICE.get(layout.backend, NOMINAL_FLOPS_PER_DEVICE["gpu"])
    warnings = []
    for g, static in enumerate(sw.block_groups[0]):
        st = layout.static(static)
        h = list(st.hidden)
        where = f"{sw.path}: group {g} (hidden {h if len(h) <= 8 else f'[{h[0]}, ...] ({len(h)} layers)'})"
        if len(st.hidden) > MAX_LAYERS:
            raise sweep_mod.SweepError(f"{where}: model.hidden has {len(st.hidden)} layers; at most {MAX_LAYERS}")

        def need(s: train.Static) -> int:
            working, held = memory_per_run(s)
            return layout.inner_batch * working + held

        if need(st) > layout.memory:
            one = sum(memory_per_run(st))
            why = (
                f"--inner-batch accounts for most of it (one run needs {_size(one)})"
                if one <= layout.memory
                else f"{_culprit(st, need)} accounts for most of it"
            )
            raise sweep_mod.SweepError(
                f"{where}: one call of {layout.inner_batch} run(s) needs about {_size(need(st))} of memory, more "
                f"than the {_size(layout.memory)} a device may use here; {why}"
            )
        seconds = st.flops_per_run / rate
        if seconds > WARN_RUN_SECONDS:
            key = _culprit(st, lambda s: s.flops_per_run)
            line = f"{where}: one run takes about {duration(seconds)} at the nominal rate ({key} accounts for most)"
            if seconds > MAX_RUN_SECONDS:
                raise sweep_mod.SweepError(f"{line}; at most {duration(MAX_RUN_SECONDS)} per run")
            warnings.append(line)
    return warnings


def _culprit(st: train.Static, cost) -> str:
    """The sweep key whose default (for checkpoints: the last step alone) would cut ``cost(st)`` the
    most: what an error about a run's size names. (Features off by default are not candidates.)"""
    trials = {"train.checkpoints": dataclasses.replace(st, checkpoints=(st.checkpoints[-1],))}
    for spec, owner in ((train.Static, st), (metrics.EvalSpec, st.eval)):
        for f in dataclasses.fields(spec):
            value, default = getattr(owner, f.name), f.default
            if "setting" in f.metadata and isinstance(default, int | tuple) and default not in ((), True, False):
                if value != default:
                    key = f"{f.metadata['setting'].section}.{f.name}"
                    changed = dataclasses.replace(owner, **{f.name: default})
                    trials[key] = changed if owner is st else dataclasses.replace(st, eval=changed)
    if st.curve_points > 201:
        trials["eval.curve_points"] = dataclasses.replace(st, curve_points=201)
    if st.steps > 1000:
        trials["train.steps"] = dataclasses.replace(st, steps=1000, checkpoints=(1000,))
    return max(trials, key=lambda k: cost(st) - cost(trials[k]))


def duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def matmul_rate(seconds: float = 1.0, n: int = 1024) -> float:
    """Measured float32 matmul FLOP/s on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def plan(sw: sweep_mod.Sweep, layout: Layout, shard=None, done=frozenset()) -> pd.DataFrame:
    """One row per group: runs, chunks, call size, memory and time estimates (nothing trained)."""
    chunks = plan_chunks(sw, layout, shard_run_ids(len(sw.runs), shard), done)
    rate = matmul_rate(0.5) * EFFICIENCY.get(layout.backend, 0.05)
    rows = []
    for g in dict.fromkeys(c.group for c in chunks):
        cs = [c for c in chunks if c.group == g]
        st = cs[0].static
        working, held = memory_per_run(st)
        n = sum(len(c.run_ids) for c in cs)
        rows.append(
            {
                "group": g,
                "hidden": "-".join(map(str, st.hidden)),
                "optimizer": st.optimizer,
                "batch_size": st.batch_size,
                "steps": st.steps,
                "classes": st.num_classes,
                "dim": st.dim,
                "runs": n,
                "chunks": len(cs),
                "runs_per_chunk": cs[0].size,
                "inner_batch": layout.inner_batch,
                "memory_per_chunk_mb": (layout.inner_batch * working * len(layout.devices) + cs[0].size * held) / 2**20,
                "est_seconds": COMPILE_S + n * st.flops_per_run / rate,
            }
        )
    return pd.DataFrame(rows, columns=None if rows else ["group", "runs", "chunks", "est_seconds"])
