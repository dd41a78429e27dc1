"""Results of a sweep on disk: the manifest, which results belong together, final tables, merge.

A results directory holds one sweep's results (by its name). Its manifest records the current
sweep text, the settings the figures need (``plot_steps``) and what fixes the bits of a run
besides its settings (``numbers_identity``); chunks and shard parts are joined only with a
manifest that matches. Runs are known by their identity (``sweep.Sweep.hashes``), not their
run_id: after an edit of the sweep file (more seeds, more grid points, a comment) every run whose
settings are unchanged is reused, under its new run_id, and only new runs are trained. Final
tables are rebuilt from exactly the current sweep's finished runs, sorted by each table's keys
(``tables.TABLES``).
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax import sweep as sweep_mod
from calibjax.core import train
from calibjax.errors import CalibjaxError
from calibjax.storage import chunks, files, owned, tables
from calibjax.storage.files import CorruptResults


class ResultsExist(CalibjaxError):
    """The output directory holds results of another sweep, or runs that give other bits."""


def numbers_identity(backend: str, vector_width: int, dense: str, cpu_class: str | None) -> dict:
    """What besides its settings fixes the bits of a run: calibjax's numbers version, the backend,
    the vectorisation width (``planning``), how the dense layers' products are computed
    (``calibjax.core.kernel``) and, on CPU, the class of CPUs that give the same bits (``runtime.cpu_class``:
    with the kernel, every x86-64 CPU with AVX2 or AVX-512; None on other backends, whose numbers
    do not depend on the host CPU). Results join only if all five match."""
    return {
        "numbers_version": train.NUMBERS_VERSION,
        "backend": backend,
        "vector_width": vector_width,
        "dense": dense,
        "cpu_class": cpu_class,
    }


def recorded_identity(manifest: dict) -> dict:
    """The numbers identity a manifest records (one written before 0.8.0 computed its products with XLA)."""
    return numbers_identity(
        manifest.get("backend"), manifest.get("vector_width"), manifest.get("dense", "xla"), manifest.get("cpu_class")
    )


# The numbers identity of a results directory that no run has written to yet: ``calibjax submit``
# writes it before the cluster's tasks start, since the login node's backend is not theirs; the
# first task to start fills it in.
PENDING = {"numbers_version": None, "backend": None, "vector_width": None, "dense": None, "cpu_class": None}


def numbers_pending(manifest: dict) -> bool:
    # (0.7.0's had no dense, 0.8.0's no cpu_class)
    return all(k in manifest and manifest[k] is None for k in PENDING if k not in ("dense", "cpu_class"))


def sweep_manifest(sw: sweep_mod.Sweep) -> dict:
    """What identifies a sweep's results, and what the figures need to know about it."""
    return {
        "sweep_name": sw.name,
        "sweep_file": sw.path,
        "sweep_sha256": sw.sha256,
        "sweep_text": sw.text,
        "runs": len(sw.runs),
        "groups": len(sw.block_groups[0]),
        "plot_steps": sw.plot_steps(),
    }


def check_same_numbers(manifest: dict, where: Path, name: str, identity: dict, hint: str) -> None:
    """Refuse to join results of another sweep (by name), or results whose runs give other bits:
    another calibjax numbers version, backend, vectorisation width, product path or CPU class
    (``numbers_identity``)."""
    if manifest.get("sweep_name") != name:
        raise ResultsExist(
            f"{where}: holds results of a different sweep ({manifest.get('sweep_name')!r}, not {name!r}); {hint}"
        )
    if numbers_pending(manifest):
        return
    theirs = manifest.get("numbers_version", 1)
    if theirs != identity["numbers_version"]:
        raise ResultsExist(
            f"{where}: holds results of calibjax {manifest.get('versions', {}).get('calibjax', '?')}, "
            f"whose runs give other numbers (numbers_version {theirs}, this calibjax has "
            f"{identity['numbers_version']}); joining them would mix the two; {hint}"
        )
    recorded = recorded_identity(manifest)
    for key, what in (
        ("backend", "with backend"),
        ("vector_width", "with vectorisation width (--inner-batch)"),
        ("dense", "with dense-layer products (--dense)"),
        ("cpu_class", "on CPUs of class"),
    ):
        if recorded[key] != identity[key]:
            if key == "cpu_class":  # a cluster's tasks can land on nodes of several kinds
                hint = f"keep its runs on CPUs of one kind (SLURM: sbatch --constraint); {hint}"
            raise ResultsExist(
                f"{where}: holds results computed {what} {recorded[key]!r}, "
                f"not {identity[key]!r}; their runs' last bits differ, so joining them would mix "
                f"the two; {hint}"
            )


def manifest_sweep(manifest: dict) -> sweep_mod.Sweep:
    """The sweep a manifest records (its text, as the results were made from it)."""
    return sweep_mod.parse(tomllib.loads(manifest["sweep_text"]), manifest["sweep_file"], manifest["sweep_text"])


def check_shard_count(manifest: dict | None, out: Path, shards: int | None, hint: str | None = None) -> None:
    """A results directory is split into shards once (the first sharded run or ``calibjax submit``
    records the count): shard K of another count would train other runs under another name."""
    stored = (manifest or {}).get("shards")
    if shards is not None and stored is not None and shards != stored:
        first = manifest.get("shard_first", 0)
        raise ResultsExist(
            f"{out}: split into {stored} shards (manifest.json, fixed when it was first sharded), "
            f"not {shards}; "
            + (hint or f"use --shard K/{stored} (array task ids {first}-{first + stored - 1})")
            + ", or --out for a new directory"
        )


def foreign(out: Path) -> bool:
    """out exists with something in it besides the temporary files of live calibjax writers."""
    return out.exists() and (not out.is_dir() or not all(files.in_flight(p.name) for p in out.iterdir()))


def prepare_output(sw: sweep_mod.Sweep, out: Path, identity: dict, overwrite: bool) -> None:
    """Create or reuse the output directory; refuse to mix results of other sweep files or numbers,
    and refuse (even with overwrite) a non-empty directory that calibjax did not write."""
    manifest = files.read_manifest(out)
    if manifest is None and foreign(out):
        # Another process starting this directory renames its manifest into place after writing it
        # to a temporary file: read again, in case it did so since the first look.
        manifest = files.read_manifest(out)
        if manifest is None:
            raise ResultsExist(
                f"{out}: exists and is not a calibjax results directory (no manifest.json); "
                "calibjax writes only into a new or empty directory or its own: choose another --out"
            )
    if manifest is not None and not overwrite:
        check_same_numbers(
            manifest, out, sw.name, identity, "use --overwrite to replace them or --out to write elsewhere"
        )
    if overwrite and manifest is not None:
        owned.remove_results(out)
    out.mkdir(parents=True, exist_ok=True)
    files.clean_debris(out)


def write_chunk(
    part: Path, chunk_id: str, static: train.Static, run_ids, run_hashes, result: train.RunResult, identity: dict
) -> bool:
    """One finished chunk's tables, written as a unit (False: another process wrote it first)."""
    chunk_tables = tables.chunk_tables(static, run_ids, result)
    return chunks.write_chunk_tables(part, chunk_id, chunk_tables, run_ids, run_hashes, identity)


def finished_run_ids(out: Path, sw: sweep_mod.Sweep, identity: dict | None, rejected: list | None = None) -> set[int]:
    """run_ids of the sweep whose runs (by identity) are finished in ``out``, in chunks that check
    out with this numbers identity (``chunks.check_chunk``; None: any); the others are appended to
    ``rejected`` as (directory, why)."""
    done = chunks.finished_hashes(out, identity, rejected)
    return {i for i, h in enumerate(sw.hashes) if h in done} if done else set()


REJECTED_HINT = (
    "rerun the calibjax run that trained it (for shards/K-of-N: with --shard K/N): "
    "it moves the chunk aside and trains its runs again"
)


def rejected_chunks_error(rejected: list, hint: str) -> CorruptResults:
    d, why = rejected[0]
    more = f" (and {len(rejected) - 1} more chunk(s))" if len(rejected) > 1 else ""
    return CorruptResults(f"{d}: {why}{more}; its runs are not joined; {hint}")


def finalize(out: Path, runs: pd.DataFrame, identity: dict | None, into: Path | None = None) -> list[int]:
    """Join the finished chunks (own and shards') into the final tables; return the missing run_ids.

    Runs are matched by identity and take the current sweep's run_ids; runs no longer in it are
    left out. Runs not finished yet appear in runs.parquet with status "missing". Each table is
    streamed chunk by chunk into its file (``chunks.write_merged``), never held whole; the tables
    are switched into place together once all are written (``files.Staged``), each naming in its
    footer the generation that manifest.json then records. Chunks that do not check out with
    ``identity`` (None: any) raise CorruptResults, and nothing is written. ``into``: write the
    tables (and the generation, into its manifest) there instead (a partial view: ``files.PARTIAL``).
    """
    into = Path(out if into is None else into)
    current = pd.Series(runs["run_id"].to_numpy(np.int64), index=runs["run_hash"].to_numpy())
    parts, rejected = [], []
    for d, owned_runs in chunks.finished_chunks(out, identity, rejected).items():
        written = np.fromiter(owned_runs, np.int64, len(owned_runs))
        now = current.reindex(list(owned_runs.values())).to_numpy()
        keep = np.flatnonzero(~np.isnan(now))
        keep = keep[np.argsort(written[keep], kind="stable")]
        parts.append((d, (written[keep], now[keep].astype(np.int64))))
    if rejected:
        raise rejected_chunks_error(rejected, REJECTED_HINT)
    status = [t for d, ids in parts if len(ids[0]) and (t := chunks.read_chunk_table(d, "status", ids)) is not None]
    status = pd.concat(status, ignore_index=True) if status else tables.empty_status()
    table = runs.merge(status, on="run_id", how="left")
    table["status"] = table["status"].fillna("missing")
    generation = content_generation(table, parts)
    with files.Staged() as staged:
        files.write_parquet(into / "runs.parquet", table, generation=generation, staged=staged)
        for name, spec in tables.TABLES.items():
            path = into / f"{name}.parquet"
            if name != "status" and not chunks.write_merged(
                path, parts, list(spec.keys), generation=generation, staged=staged
            ):
                staged.removed.append(path)  # an earlier version's, of runs no longer here
        staged.commit()
    manifest = files.read_manifest(into)
    if manifest is not None:
        files.write_json(into / "manifest.json", {**manifest, "generation": generation})
    return table.loc[table["status"] == "missing", "run_id"].tolist()


def content_generation(runs: pd.DataFrame, parts) -> str:
    """The generation of final tables joined from ``parts`` (chunk directory, (run_ids written,
    run_ids now)) under the runs table ``runs``: a digest of exactly what they are made of
    (calibjax's version, the runs table, each chunk's chunk.json and the runs taken from it). Two
    processes joining the same chunks (three on one directory finish together) write the same
    generation, so a reader between their writes sees one set; any other content, another."""
    import calibjax  # (its version: another version may write the same runs' tables otherwise)

    h = hashlib.sha256(f"{calibjax.__version__}\n{list(runs.columns)}\n".encode())
    for name in runs.columns:
        column = runs[name].to_numpy()
        h.update(column.tobytes() if column.dtype.kind in "biuf" else "\0".join(map(str, column)).encode())
    for d, (written, now) in parts:
        h.update(f"{d.name}:{chunks.info_digest(d)}".encode())
        h.update(np.ascontiguousarray(written, np.int64).tobytes() + np.ascontiguousarray(now, np.int64).tobytes())
    return h.hexdigest()[:32]


def joined_identity(out: Path, manifest: dict) -> dict | None:
    """The numbers identity the chunks of ``out`` (own and shards') must have to be joined; refuses
    a directory, or shard part, of other numbers (``check_same_numbers``)."""
    identity = recorded_identity(manifest)
    check_same_numbers(
        manifest,
        out,
        manifest.get("sweep_name"),
        identity,
        "rerun the sweep with this calibjax (calibjax run SWEEP --overwrite)",
    )
    identity = None if numbers_pending(manifest) else identity
    for part in sorted(out.glob("shards/*")):
        m = files.read_manifest(part)
        if m is not None:  # (identity pending: submitted, and no task has filled it in: the first part's)
            identity = identity or recorded_identity(m)
            check_same_numbers(
                m, part, manifest.get("sweep_name"), identity, f"it does not belong with {out}/manifest.json"
            )
    # Chunks of parts without a manifest (a task killed early) are judged by their own chunk.json.
    return identity or chunks.first_identity(out)


def merge(out: str | Path) -> list[int]:
    """Join shard parts (and any unsharded chunks) of ``out`` into its final tables.

    Refuses parts of another sweep or other numbers; joins runs by identity. Returns the run_ids still missing.
    """
    out = Path(out)
    manifest = files.read_manifest(out)
    if manifest is None:
        raise sweep_mod.SweepError(f"{out}: no manifest.json here; is it a calibjax results directory?")
    identity = joined_identity(out, manifest)
    sw = manifest_sweep(manifest)
    missing = finalize(out, sweep_mod.runs_table(sw), identity)
    files.write_json(
        out / "manifest.json",
        {
            **files.read_manifest(out),  # (with the generation finalize recorded)
            **(identity or {}),
            **sweep_manifest(sw),
            "complete": not missing,
            "merged": True,
            "missing_runs": len(missing),
        },
    )
    return missing
