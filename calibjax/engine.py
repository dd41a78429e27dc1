"""Execution: group runs by static settings, cut groups into chunks, train, write.

Each group (one ``train.Static``) compiles once; its runs are cut into chunks
of equal padded size, so every chunk of a group reuses that one executable.
Finished chunks are written atomically, so a rerun on the same directory
trains only what is missing.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from calibjax import store, sweep as sweep_mod, train

CPU_INNER_BATCH = 32   # runs vmapped together per device on CPU: small enough to stay in cache
GPU_INNER_BATCH = 4096  # on accelerators, wide batches fill the device
DEFAULT_MAX_CHUNK = 1024


class ResultsExist(sweep_mod.SweepError):
    """The output directory holds results of a different sweep file."""


@dataclass(frozen=True)
class Layout:
    """How a group's runs are laid out on the hardware."""

    devices: tuple          # devices the run axis is sharded over
    inner_batch: int        # runs vmapped together on one device (lax.map over such batches)
    max_chunk: int          # most runs per compiled call (bounds memory and lost work on a kill)

    @property
    def backend(self) -> str:
        return self.devices[0].platform

    def chunk_size(self, n_runs: int) -> tuple[int, int]:
        """(padded chunk size, inner batch) for a group of n_runs: multiples of the device count."""
        n_dev = len(self.devices)
        per_device = math.ceil(min(n_runs, self.max_chunk) / n_dev)
        inner = min(self.inner_batch, per_device)
        per_device = math.ceil(per_device / inner) * inner
        return per_device * n_dev, inner


def default_layout(chunk_size: int | None = None, inner_batch: int | None = None,
                   devices=None) -> Layout:
    devices = tuple(devices if devices is not None else jax.local_devices())
    cpu = devices[0].platform == "cpu"
    inner = inner_batch or (CPU_INNER_BATCH if cpu else GPU_INNER_BATCH)
    return Layout(devices, inner, chunk_size or DEFAULT_MAX_CHUNK)


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


def group_runs(sw: sweep_mod.Sweep) -> tuple[list[train.Static], list[int]]:
    """Distinct static settings in order of first appearance, and each run's group index."""
    statics: dict[train.Static, int] = {}
    group_of = [statics.setdefault(sweep_mod.static_of(r), len(statics)) for r in sw.runs]
    return list(statics), group_of


def plan_chunks(sw: sweep_mod.Sweep, layout: Layout, run_ids=None, done=frozenset()) -> list[Chunk]:
    """Cut each group's pending runs (those in run_ids and not done) into chunks."""
    statics, group_of = group_runs(sw)
    wanted = set(range(len(sw.runs)) if run_ids is None else run_ids) - set(done)
    chunks = []
    for g, static in enumerate(statics):
        ids = [i for i, gi in enumerate(group_of) if gi == g and i in wanted]
        if ids:
            size, inner = layout.chunk_size(len(ids))
            chunks += [Chunk(g, static, ids[i:i + size], size, inner) for i in range(0, len(ids), size)]
    return chunks


def runs_table(sw: sweep_mod.Sweep) -> pd.DataFrame:
    statics, group_of = group_runs(sw)
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
                            **{k: out[k].reshape(-1).astype(np.float64)
                               for k in ("kl", "tv", "max_err", "accuracy", "bayes_accuracy", "loss")}})
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
    tables = {"status": status, "metrics": metrics, "density": density}
    if static.curve_points:
        p, m = static.curve_points, static.num_classes
        tables["curves"] = pd.DataFrame({
            "run_id": np.repeat(ids, c * p * m),
            "step": np.tile(np.repeat(steps, p * m), r),
            "x": np.tile(np.repeat(out["curve_x"], m, axis=1), (1, c)).reshape(-1).astype(np.float64),
            "class": np.tile(np.arange(1, m + 1), r * c * p),
            "model_prob": out["curve_model"].reshape(-1).astype(np.float64),
            "true_prob": np.tile(out["curve_true"].reshape(r, 1, p * m), (1, c, 1)).reshape(-1).astype(np.float64)})
    return tables


class Trainer:
    """Compiles once per (static settings, chunk size) and trains chunks of runs."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.mesh = jax.sharding.Mesh(np.asarray(layout.devices), ("runs",)) if len(layout.devices) > 1 else None
        self._compiled: dict = {}
        self.compiles = 0
        self.compile_s = 0.0

    def __call__(self, static: train.Static, dyns: list[train.Dynamic], size: int, inner: int,
                 on_compile=None) -> dict[str, np.ndarray]:
        n = len(dyns)
        padded = train.stack_dynamic(dyns + [dyns[-1]] * (size - n))  # pad with copies of the last run
        key = (static, size, inner)
        if key not in self._compiled:
            if on_compile:
                on_compile(static, size)
            t0 = time.perf_counter()
            fn = train.batched_train_fn(static, inner, self.mesh)
            self._compiled[key] = fn.lower(padded).compile()
            self.compile_s += time.perf_counter() - t0
            self.compiles += 1
        out = self._compiled[key](padded)
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


def prepare_output(sw: sweep_mod.Sweep, out: Path, overwrite: bool) -> None:
    """Create or reuse the output directory; refuse to mix results of different sweep files."""
    manifest = store.read_manifest(out)
    if manifest is not None and manifest.get("sweep_sha256") != sw.sha256:
        if not overwrite:
            raise ResultsExist(f"{out}: holds results of a different sweep file (sha256 "
                               f"{manifest.get('sweep_sha256', '?')[:12]} != {sw.sha256[:12]}); "
                               "use --overwrite to replace them or --out to write elsewhere")
    if overwrite and out.exists():
        for name in ("chunks", "figures"):
            store.shutil.rmtree(out / name, ignore_errors=True)
        for p in out.glob("*.parquet"):
            p.unlink()
        (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    store.clean_debris(out)


def run_sweep(sw: sweep_mod.Sweep, out: str | Path, *, layout: Layout | None = None,
              overwrite: bool = False, quiet: bool = False, figures: bool = True) -> Report:
    """Train every unfinished run of a sweep into ``out`` and write the final tables."""
    t_start = time.perf_counter()
    out = Path(out)
    layout = layout or default_layout()
    prepare_output(sw, out, overwrite)
    runs = runs_table(sw)
    manifest = {"sweep_name": sw.name, "sweep_file": sw.path, "sweep_sha256": sw.sha256,
                "sweep_text": sw.text, **environment(),
                "layout": {"devices": len(layout.devices), "inner_batch": layout.inner_batch,
                           "max_chunk": layout.max_chunk}}
    if store.read_manifest(out) is None:
        store.write_json(out / "manifest.json", {**manifest, "complete": False})

    done = store.finished_run_ids(out)
    chunks = plan_chunks(sw, layout, done=done)
    report = Report(runs=len(sw.runs), groups=len({c.group for c in chunks}), chunks=len(chunks))
    trainer = Trainer(layout)
    bar = tqdm(total=sum(len(c.run_ids) for c in chunks), unit="run", disable=quiet, dynamic_ncols=True,
               desc=sw.name)

    def on_compile(static, size):
        if not quiet:
            bar.write(f"compiling: {static.hidden} {static.activation} {static.optimizer} batch "
                      f"{static.batch_size}, {static.steps} steps, {size} runs per call")

    for chunk in chunks:
        dyns = [sweep_mod.dynamic_of(sw.runs[i]) for i in chunk.run_ids]
        try:
            compile_before = trainer.compile_s
            t0 = time.perf_counter()
            outputs = trainer(chunk.static, dyns, chunk.size, chunk.inner, on_compile)
            report.train_s += time.perf_counter() - t0 - (trainer.compile_s - compile_before)
            store.write_chunk(out, chunk.chunk_id, chunk_tables(chunk.static, chunk.run_ids, outputs))
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

    if not report.failed:
        finalize(out, runs)
        report.complete = True
        if figures:
            from calibjax import plots
            plots.standard_figures(out)
    report.wall_s = time.perf_counter() - t_start
    store.write_json(out / "manifest.json", {
        **manifest, "complete": report.complete, "runs": report.runs, "groups": len(group_runs(sw)[0]),
        "trained_this_call": report.trained, "chunks_this_call": report.chunks,
        "failed_chunks": report.failed, "compiles": report.compiles,
        "compile_s": round(report.compile_s, 3), "train_s": round(report.train_s, 3),
        "wall_s": round(report.wall_s, 3), "model_steps_per_s": round(report.steps_per_s, 1)})
    return report


def finalize(out: Path, runs: pd.DataFrame) -> None:
    """Join the finished chunks into the final tables."""
    status = store.read_chunks(out, "status")
    store.write_parquet(out / "runs.parquet", runs.merge(status, on="run_id", how="left"))
    for name in ("metrics", "density", "curves"):
        df = store.read_chunks(out, name)
        if df is not None:
            store.write_parquet(out / f"{name}.parquet", df)
