"""Execution: group runs by static settings, cut groups into chunks, train, write.

Each group (one ``train.Static``) compiles once; its runs are cut into chunks
of equal padded size, so every chunk of a group reuses that one executable.
Finished chunks are written atomically, so a rerun on the same directory
trains only what is missing.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from calibjax import plots, store, summaries, sweep as sweep_mod, train

CPU_INNER_BATCH = 32    # runs vmapped together per device on CPU: small enough to stay in cache
GPU_INNER_BATCH = 4096  # on accelerators, wide batches fill the device
CPU_MAX_CHUNK = 1024    # most runs per call: bounds lost work on a kill and keeps progress moving
GPU_MAX_CHUNK = 16384
MEMORY_FRACTION = 0.5   # of device (or, on CPU, host) memory a chunk may plan to use
F32 = 4


# metrics.parquet columns after run_id, step (see README for definitions)
METRIC_COLUMNS = ("kl", "tv", "max_err", "accuracy", "bayes_accuracy", "loss", "err_dense", "err_sparse",
                  "ece", "ece_mass", "brier", "nll", "true_ece", "excess_brier", "cal_term", "grouping_term")


def configure_compilation_cache() -> str | None:
    """Keep compiled programs on disk, so a resumed, repeated or sharded sweep skips most compiling.

    JAX's persistent cache, keyed by the program and the compiler flags, so it cannot serve a
    wrong program. Directory: $CALIBJAX_CACHE_DIR, else $XDG_CACHE_HOME/calibjax/xla, else
    ~/.cache/calibjax/xla; CALIBJAX_CACHE_DIR=off disables it; a directory set through
    jax.config by the user is left alone.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    choice = os.environ.get("CALIBJAX_CACHE_DIR")
    if choice in ("off", "0", ""):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(choice) if choice else base / "calibjax" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return str(path)


class ResultsExist(sweep_mod.SweepError):
    """The output directory holds results of a different sweep file."""


def memory_per_run(static: train.Static) -> tuple[int, int]:
    """Estimated bytes per run: (working set while it trains, results held until the chunk ends).

    Working set: parameters, gradients and two Adam moments; training activations (forward and
    backward) of one batch; the evaluation set and its forward pass; posterior curves.
    Held: the run's output arrays plus the host tables built from them (about 56 bytes a row).
    """
    widths = (static.dim, *static.hidden, static.num_classes)
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    units = sum(widths)
    g, m, nb, c, p = (static.eval.points, static.num_classes, static.eval.num_bins,
                      len(static.checkpoints), static.curve_points)
    s, cb = static.eval.calibration_samples, static.eval.calibration_bins
    p = p ** static.dim
    working = F32 * (4 * n_params + 3 * static.batch_size * units
                     + (g + s) * (static.dim + 2 * m + nb + 5) + 2 * (g + s) * units + p * (units + m)
                     + g * static.eval.true_bins)
    rows = c * (1 + nb + cb + p * m)
    held = F32 * c * (len(METRIC_COLUMNS) + 3 * nb + 6 * cb + p * m) + 56 * rows
    return working, held


def device_memory(device) -> int:
    """Bytes a chunk may plan on: the accelerator's limit, or the host's RAM shared by CPU devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host // max(1, len(jax.local_devices(backend="cpu")))


@dataclass(frozen=True)
class Layout:
    """How a group's runs are laid out on the hardware."""

    devices: tuple      # devices the run axis is sharded over
    inner_batch: int    # most runs vmapped together on one device (lax.map over such batches)
    max_chunk: int      # most runs per compiled call
    memory: int         # bytes per device a chunk may plan to use

    @property
    def backend(self) -> str:
        return self.devices[0].platform

    def chunk_size(self, n_runs: int, static: train.Static) -> tuple[int, int, int]:
        """(runs per chunk, padded runs per call, inner batch) for a group of n_runs.

        Runs per chunk is bounded by max_chunk and the memory budget; the call size is that
        rounded up to a multiple of devices x inner batch, so every chunk of the group (the
        last one padded with copies) reuses one compiled program.
        """
        n_dev = len(self.devices)
        working, held = memory_per_run(static)
        inner = max(1, min(self.inner_batch, self.memory // (2 * working)))
        by_memory = max(1, (self.memory - inner * working) // held) * n_dev
        runs = max(1, min(n_runs, self.max_chunk, by_memory))
        inner = min(inner, math.ceil(runs / n_dev))
        return runs, math.ceil(runs / (n_dev * inner)) * n_dev * inner, inner

    def describe(self) -> dict:
        return {"devices": len(self.devices), "backend": self.backend, "inner_batch": self.inner_batch,
                "max_chunk": self.max_chunk, "memory_per_device": self.memory}


def default_layout(chunk_size: int | None = None, inner_batch: int | None = None,
                   devices=None) -> Layout:
    """The fastest layout measured for the hardware at hand (benchmarks/throughput.py --explore)."""
    devices = tuple(devices if devices is not None else jax.local_devices())
    cpu = devices[0].platform == "cpu"
    inner = inner_batch or (CPU_INNER_BATCH if cpu else GPU_INNER_BATCH)
    max_chunk = chunk_size or (CPU_MAX_CHUNK if cpu else GPU_MAX_CHUNK)
    return Layout(devices, inner, max_chunk, int(device_memory(devices[0]) * MEMORY_FRACTION))


@dataclass
class Chunk:
    group: int
    static: train.Static
    run_ids: list[int]
    size: int    # padded number of runs per call (the same for every chunk of a group)
    inner: int   # runs vmapped together per device

    @property
    def chunk_id(self) -> str:
        return f"g{self.group:03d}-r{self.run_ids[0]:07d}-n{len(self.run_ids)}"


@dataclass
class Report:
    runs: int = 0
    trained: int = 0
    groups: int = 0
    chunks: int = 0
    compiles: int = 0
    compile_s: float = 0.0
    train_s: float = 0.0
    wall_s: float = 0.0
    model_steps: int = 0
    failed: list[str] = field(default_factory=list)
    complete: bool = False

    @property
    def steps_per_s(self) -> float:
        return self.model_steps / self.train_s if self.train_s else 0.0


def shard_run_ids(n_runs: int, shard: tuple[int, int] | None) -> list[int]:
    """Shard k of n owns run_ids i with i % n == k: deterministic, and balanced over groups."""
    if shard is None:
        return list(range(n_runs))
    k, n = shard
    return list(range(k, n_runs, n))


def plan_chunks(sw: sweep_mod.Sweep, layout: Layout, run_ids=None, done=frozenset()) -> list[Chunk]:
    """Cut each group's pending runs (those in run_ids and not done) into chunks."""
    statics, group_of = sw.groups
    wanted = set(range(len(sw.runs)) if run_ids is None else run_ids) - set(done)
    chunks = []
    for g, static in enumerate(statics):
        ids = [i for i, gi in enumerate(group_of) if gi == g and i in wanted]
        if ids:
            runs, size, inner = layout.chunk_size(len(ids), static)
            chunks += [Chunk(g, static, ids[i:i + runs], size, inner) for i in range(0, len(ids), runs)]
    return chunks


def runs_table(sw: sweep_mod.Sweep) -> pd.DataFrame:
    statics, group_of = sw.groups
    df = pd.DataFrame([sweep_mod.run_row(i, r) for i, r in enumerate(sw.runs)])
    df["group"] = group_of
    return df


def chunk_tables(static: train.Static, run_ids: list[int], out: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
    """Turn a chunk's output arrays (leading axis = runs) into long tables."""
    r, c = len(run_ids), len(static.checkpoints)
    ids = np.asarray(run_ids, np.int64)
    steps = np.asarray(static.checkpoints, np.int64)
    run_col, step_col = np.repeat(ids, c), np.tile(steps, r)
    metrics = pd.DataFrame({"run_id": run_col, "step": step_col,
                            **{k: out[k].reshape(-1).astype(np.float64) for k in METRIC_COLUMNS}})
    lo, hi = static.eval.bin_bounds()
    nb = len(lo)
    density = pd.DataFrame({
        "run_id": np.repeat(ids, c * nb), "step": np.tile(np.repeat(steps, nb), r),
        "log10_density_lo": np.tile(lo, r * c), "log10_density_hi": np.tile(hi, r * c),
        "mass": out["bin_mass"].reshape(-1).astype(np.float64),
        "kl": out["bin_kl"].reshape(-1).astype(np.float64),
        "max_err": out["bin_max_err"].reshape(-1).astype(np.float64)})
    trained = np.diff(np.asarray((0, *static.checkpoints))) > 0
    finite = np.isfinite(out["kl"]).all(1) & np.isfinite(out["loss"][:, trained]).all(1)
    status = pd.DataFrame({"run_id": ids, "status": np.where(finite, "ok", "diverged"),
                           "bayes_loss": out["bayes_loss"].astype(np.float64)})
    cb = static.eval.calibration_bins
    edges = np.linspace(0.0, 1.0, cb + 1)
    calibration = pd.DataFrame({
        "run_id": np.repeat(ids, c * cb), "step": np.tile(np.repeat(steps, cb), r),
        "conf_lo": np.tile(edges[:-1], r * c), "conf_hi": np.tile(edges[1:], r * c),
        **{name: out[f"rel_{name}"].reshape(-1).astype(np.float64)
           for name in ("est_count", "est_conf", "est_acc", "true_mass", "true_conf", "true_acc")}})
    tables = {"status": status, "metrics": metrics, "density": density, "calibration": calibration}
    if static.curve_points:
        p, m = static.curve_points ** static.dim, static.num_classes
        xs = {"x" if d == 0 else f"x{d + 1}": np.tile(np.repeat(out["curve_x"][..., d], m, axis=1), (1, c))
              .reshape(-1).astype(np.float64) for d in range(static.dim)}
        tables["curves"] = pd.DataFrame({
            "run_id": np.repeat(ids, c * p * m),
            "step": np.tile(np.repeat(steps, p * m), r),
            **xs,
            "class": np.tile(np.arange(1, m + 1), r * c * p),
            "model_prob": out["curve_model"].reshape(-1).astype(np.float64),
            "true_prob": np.tile(out["curve_true"].reshape(r, 1, p * m), (1, c, 1)).reshape(-1).astype(np.float64)})
    return tables


class Trainer:
    """Compiles once per (static settings, chunk size) and trains chunks of runs."""

    def __init__(self, layout: Layout):
        configure_compilation_cache()
        self.layout = layout
        self.mesh = jax.sharding.Mesh(np.asarray(layout.devices), ("runs",)) if len(layout.devices) > 1 else None
        self._compiled: dict = {}
        self.compiles = 0
        self.compile_s = 0.0

    def executable(self, static: train.Static, example: train.Dynamic, size: int, inner: int, on_compile=None):
        """The compiled program for chunks of ``size`` runs of this group (compiled on first use)."""
        key = (static, size, inner)
        if key not in self._compiled:
            if on_compile:
                on_compile(static, size)
            t0 = time.perf_counter()
            fn = train.batched_train_fn(static, inner, self.mesh)
            self._compiled[key] = fn.lower(train.stack_dynamic([example] * size)).compile()
            self.compile_s += time.perf_counter() - t0
            self.compiles += 1
        return self._compiled[key]

    def __call__(self, static: train.Static, dyns: list[train.Dynamic], size: int, inner: int,
                 on_compile=None) -> dict[str, np.ndarray]:
        n = len(dyns)
        padded = train.stack_dynamic(dyns + [dyns[-1]] * (size - n))  # pad with copies of the last run
        out = self.executable(static, dyns[0], size, inner, on_compile)(padded)
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def environment() -> dict:
    versions = {}
    for pkg in ("calibjax", "jax", "jaxlib", "flax", "optax", "numpy", "pandas", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()]}


def check_same_numbers(manifest: dict, where: Path, sha256: str, hint: str) -> None:
    """Refuse to join results of a different sweep file, or of a calibjax that computes other numbers."""
    if manifest.get("sweep_sha256") != sha256:
        raise ResultsExist(f"{where}: holds results of a different sweep file (sha256 "
                           f"{manifest.get('sweep_sha256', '?')[:12]} != {sha256[:12]}); {hint}")
    theirs = manifest.get("numbers_version", 1)
    if theirs != train.NUMBERS_VERSION:
        raise ResultsExist(f"{where}: holds results of calibjax {manifest.get('versions', {}).get('calibjax', '?')}, "
                           f"whose runs give other numbers (numbers_version {theirs}, this calibjax has "
                           f"{train.NUMBERS_VERSION}); joining them would mix the two; {hint}")


def prepare_output(sw: sweep_mod.Sweep, out: Path, overwrite: bool) -> None:
    """Create or reuse the output directory; refuse to mix results of other sweep files or numbers."""
    manifest = store.read_manifest(out)
    if manifest is not None and not overwrite:
        check_same_numbers(manifest, out, sw.sha256, "use --overwrite to replace them or --out to write elsewhere")
    if overwrite and out.exists():
        store.remove_results(out)
    out.mkdir(parents=True, exist_ok=True)
    store.clean_debris(out)


def sweep_manifest(sw: sweep_mod.Sweep) -> dict:
    return {"sweep_name": sw.name, "sweep_file": sw.path, "sweep_sha256": sw.sha256, "sweep_text": sw.text,
            "numbers_version": train.NUMBERS_VERSION, "runs": len(sw.runs), "groups": len(sw.groups[0])}


def run_sweep(sw: sweep_mod.Sweep, out: str | Path, *, layout: Layout | None = None,
              shard: tuple[int, int] | None = None, overwrite: bool = False, quiet: bool = False,
              figures: bool = True) -> Report:
    """Train every unfinished run of a sweep (or of one shard of it) into ``out``.

    Without a shard, the final tables and figures are written once every run has finished.
    Shard k of n writes its chunks to ``out/shards/k-of-n`` and leaves joining to ``merge``.
    """
    t_start = time.perf_counter()
    out = Path(out)
    layout = layout or default_layout()
    prepare_output(sw, out, overwrite)
    manifest = {**sweep_manifest(sw), **environment(), "layout": layout.describe()}
    if store.read_manifest(out) is None:
        store.write_json(out / "manifest.json", {**manifest, "complete": False})
    part = out / "shards" / f"{shard[0]}-of-{shard[1]}" if shard else out

    chunks = plan_chunks(sw, layout, shard_run_ids(len(sw.runs), shard), done=store.finished_run_ids(out))
    report = Report(runs=len(sw.runs), groups=len({c.group for c in chunks}), chunks=len(chunks))
    trainer = Trainer(layout)
    bar = tqdm(total=sum(len(c.run_ids) for c in chunks), unit="run", disable=quiet, dynamic_ncols=True,
               desc=sw.name, smoothing=0.1)

    def on_compile(static, size):
        if not quiet:
            bar.write(f"compiling group: hidden {list(static.hidden)} {static.activation} {static.optimizer}, "
                      f"batch {static.batch_size}, {static.steps} steps; {size} runs per call")

    for chunk in chunks:
        dyns = [sweep_mod.dynamic_of(sw.runs[i]) for i in chunk.run_ids]
        try:
            compile_before = trainer.compile_s
            t0 = time.perf_counter()
            outputs = trainer(chunk.static, dyns, chunk.size, chunk.inner, on_compile)
            report.train_s += time.perf_counter() - t0 - (trainer.compile_s - compile_before)
            store.write_chunk(part, chunk.chunk_id, chunk_tables(chunk.static, chunk.run_ids, outputs))
        except Exception as e:  # a broken chunk must not stop the others
            report.failed.append(chunk.chunk_id)
            bar.write(f"chunk {chunk.chunk_id} failed: {type(e).__name__}: {e}")
            if not quiet:
                traceback.print_exc()
            continue
        report.trained += len(chunk.run_ids)
        report.model_steps += len(chunk.run_ids) * chunk.static.steps
        bar.update(len(chunk.run_ids))
        bar.set_postfix(steps_s=f"{report.steps_per_s:,.0f}")
    bar.close()
    report.compiles, report.compile_s = trainer.compiles, trainer.compile_s

    if not report.failed and shard is None:
        report.complete = not finalize(out, runs_table(sw))
        if report.complete:
            summaries.write_summaries(out)
            if figures:
                plots.standard_figures(out)
    report.wall_s = time.perf_counter() - t_start
    store.write_json(part / "manifest.json", {
        **manifest, "shard": list(shard) if shard else None, "complete": report.complete,
        "trained_this_call": report.trained, "chunks_this_call": report.chunks,
        "failed_chunks": report.failed, "compiles": report.compiles,
        "compile_s": round(report.compile_s, 3), "train_s": round(report.train_s, 3),
        "wall_s": round(report.wall_s, 3), "model_steps_per_s": round(report.steps_per_s, 1)})
    return report


def finalize(out: Path, runs: pd.DataFrame) -> list[int]:
    """Join the finished chunks (own and shards') into the final tables; return missing run_ids.

    Runs not finished yet appear in runs.parquet with status "missing".
    """
    tables = store.read_tables(out, ("status", "metrics", "density", "calibration", "curves"))
    status = tables.pop("status")
    if status is None:
        status = pd.DataFrame({"run_id": pd.Series([], dtype=np.int64), "status": pd.Series([], dtype=str),
                               "bayes_loss": pd.Series([], dtype=np.float64)})
    table = runs.merge(status, on="run_id", how="left")
    table["status"] = table["status"].fillna("missing")
    store.write_parquet(out / "runs.parquet", table)
    for name, df in tables.items():
        if df is not None:
            store.write_parquet(out / f"{name}.parquet", df)
    return table.loc[table["status"] == "missing", "run_id"].tolist()


def merge(out: str | Path, figures: bool = True) -> list[int]:
    """Join shard parts (and any unsharded chunks) of ``out`` into its final tables.

    Refuses parts written from a different sweep file. Returns the run_ids still missing.
    """
    out = Path(out)
    manifest = store.read_manifest(out)
    if manifest is None:
        raise sweep_mod.SweepError(f"{out}: no manifest.json here; is it a calibjax results directory?")
    for part in sorted(out.glob("shards/*")):
        m = store.read_manifest(part)
        if m is not None:
            check_same_numbers(m, part, manifest["sweep_sha256"], f"it does not belong with {out}/manifest.json")
    sw = sweep_mod.parse(tomllib.loads(manifest["sweep_text"]), manifest["sweep_file"], manifest["sweep_text"])
    store.clean_debris(out)
    missing = finalize(out, runs_table(sw))
    store.write_json(out / "manifest.json", {**manifest, "complete": not missing, "merged": True,
                                             "missing_runs": len(missing)})
    if not missing:
        summaries.write_summaries(out)
        if figures:
            plots.standard_figures(out)
    return missing


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


# Fraction of the matmul rate that training and evaluation reach, for plan's time estimate:
# CPU 0.35 (calibjax 0.2.0 here: benchmarks/throughput.py 0.36-0.40 with one evaluation per run;
# the shipped sweeps 0.29-0.43 of the training FLOPs, scale_10k 0.35); GPU 0.05 (H200, 0.1.0: 0.08
# of its TF32 matmul rate).
EFFICIENCY = {"cpu": 0.35, "gpu": 0.05}
COMPILE_S = 10.0  # typical compile time of one group here (CPU); plan adds it per group


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
        rows.append({"group": g, "hidden": "-".join(map(str, st.hidden)), "optimizer": st.optimizer,
                     "batch_size": st.batch_size, "steps": st.steps, "classes": st.num_classes,
                     "dim": st.dim, "runs": n, "chunks": len(cs), "runs_per_call": cs[0].size,
                     "inner_batch": cs[0].inner,
                     "memory_per_chunk_mb": (cs[0].inner * working * len(layout.devices) + cs[0].size * held) / 2**20,
                     "est_seconds": COMPILE_S + n * st.flops_per_run / rate})
    return pd.DataFrame(rows)
