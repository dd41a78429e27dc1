"""Running a sweep on a SLURM cluster: shards fixed once, job arrays, status, requeue.

``calibjax submit`` writes two batch scripts into ``DIR/slurm/`` and submits them with ``sbatch``:
a job array whose task K trains shard K of N (``calibjax run``), and a merge job that runs after
the array whatever happened to its tasks (``afterany``) and reports what is missing. The shard
count N is stored in the results directory's manifest once, so a resubmitted subset of array
indices (``--array=2``, ``0,3``, steps) trains exactly those shards. ``calibjax status DIR`` says
which shards are done, running or missing and prints the command that resubmits only the missing
ones. Everything here reads and writes the results directory; only ``submit``, ``requeue_self`` and
``queued_tasks`` call SLURM's commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax import sweep as sweep_mod
from calibjax.errors import CalibjaxError
from calibjax.execution import planning
from calibjax.storage import chunks, files, reader, results


class ClusterError(CalibjaxError):
    """A bad submit or shard setting, or a SLURM command that failed (the message says which)."""


NO_SBATCH = (
    "sbatch not found: calibjax submit needs SLURM's client commands on this machine "
    "(--dry-run prints the scripts without them)"
)
SUBMISSIONS = "submissions.json"  # DIR/slurm/: what calibjax submit did, for status and resubmission
WARN_S = 90  # the early-warning signal (SIGUSR1) comes this long before the time limit...
MIN_WARN_S = 10  # ...or a quarter of the limit, at least this, for short limits


# ---------------------------------------------------------------- shards


def _env_int(env, name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ClusterError(f"{name}: expected an integer, got {raw!r}") from None


def resolve_shard(
    text: str | None, manifest: dict | None, out: Path, env=os.environ
) -> tuple[tuple[int, int], int] | None:
    """The shard this process trains, as ((K, N), first array task id), or None for every run.

    ``--shard K/N`` if given; else, inside a SLURM job array, the task id against the shard count
    stored in the manifest (K = SLURM_ARRAY_TASK_ID - first). A directory without a stored count
    takes it from this array (SLURM_ARRAY_TASK_COUNT, first = SLURM_ARRAY_TASK_MIN) if the array is
    one contiguous range; the first sharded run stores it (``engine.run_sweep``).
    """
    stored = (manifest or {}).get("shards")
    first = (manifest or {}).get("shard_first", 0)
    if text is not None:
        try:
            k, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ClusterError(f"--shard: expected K/N such as 0/4, got {text!r}") from None
        if not (n >= 1 and 0 <= k < n):
            raise ClusterError(f"--shard: need 0 <= K < N, got {text!r}")
        results.check_shard_count(manifest, out, n)
        return (k, n), first
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if stored is None:
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise ClusterError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --shard K/N")
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
        last = _env_int(env, "SLURM_ARRAY_TASK_MAX", first + count - 1)
        if last - first + 1 != count:
            raise ClusterError(
                f"{out}: no shard count stored yet, and this array ({count} task ids from {first} to "
                f"{last}) is not one range, so it cannot define one: submit the whole range first "
                "(sbatch --array=0-N), or use calibjax submit"
            )
        stored = count
    k = task - first
    if not 0 <= k < stored:
        raise ClusterError(
            f"{out}: array task id {task} is not a shard of this directory's {stored} "
            f"(task ids {first}-{first + stored - 1}, manifest.json)"
        )
    return (k, stored), first


# ---------------------------------------------------------------- submit


def parse_minutes(text: str) -> float:
    """SLURM's --time formats (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ClusterError(f"--time: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]], got {text!r}")
    d, a, b, c = (int(v) if v is not None else None for v in m.groups())
    if d is not None:  # D-H, D-H:M, D-H:M:S
        return d * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    if c is not None:
        return a * 60 + b + c / 60
    if b is not None:
        return a + b / 60
    return float(a)


@dataclass
class Submission:
    sweep: str  # the sweep file as the user named it
    out: str
    tasks: int
    max_parallel: int | None = None
    cpus: int = 2
    mem: str = "4G"
    time: str = "04:00:00"
    gres: str | None = None
    partition: str | None = None
    run_args: tuple = ()  # calibjax run options passed on (--chunk-size, --inner-batch, ...)
    sbatch_args: tuple = ()  # after "--": given to sbatch for both jobs
    only: tuple = ()  # shards to submit (default all)

    @property
    def minutes(self) -> float:
        return parse_minutes(self.time)

    @property
    def warn_s(self) -> int:
        return int(max(MIN_WARN_S, min(WARN_S, self.minutes * 60 / 4)))

    @property
    def chunk_minutes(self) -> float:
        """Work per chunk: what a task loses at most on a kill; a sixth of the time limit, at most 5 min."""
        return round(max(0.1, min(5.0, self.minutes / 6)), 2)

    def array_spec(self) -> str:
        ids = self.only or range(self.tasks)
        spec = ",".join(_ranges(sorted(ids)))
        return spec + (f"%{self.max_parallel}" if self.max_parallel else "")

    def command(self, only=()) -> str:
        """The calibjax submit command line that submits these shards (all, or ``only``)."""
        words = ["calibjax", "submit", self.sweep, "--out", self.out, "--tasks", str(self.tasks)]
        if only:
            words += ["--only", ",".join(_ranges(sorted(only)))]
        for flag, value in (
            ("--max-parallel", self.max_parallel),
            ("--cpus", self.cpus),
            ("--mem", self.mem),
            ("--time", self.time),
            ("--gres", self.gres),
            ("--partition", self.partition),
        ):
            if value is not None:
                words += [flag, str(value)]
        words += list(self.run_args)
        if self.sbatch_args:
            words += ["--", *self.sbatch_args]
        return shlex.join(words)


def _ranges(ids) -> list[str]:
    """[0, 1, 2, 5, 7, 8] -> ["0-2", "5", "7-8"]."""
    out, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v > start else f"{v}")
            start = None
    return out


def parse_only(text: str, tasks: int) -> tuple[int, ...]:
    """--only 2,5-7 -> (2, 5, 6, 7), each a shard index below ``tasks``."""
    ids = []
    for item in text.split(","):
        a, sep, b = item.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ClusterError(f"--only: expected shard indices such as 2,5-7, got {text!r}") from None
        ids += range(lo, hi + 1)
    bad = [i for i in ids if not 0 <= i < tasks]
    if bad or not ids:
        raise ClusterError(f"--only {text}: shard indices must lie in 0-{tasks - 1} (--tasks {tasks})")
    return tuple(sorted(set(ids)))


def scripts(sub: Submission, sweep_copy: Path, name: str) -> tuple[str, str]:
    """The array script and the merge script (sbatch reads the #SBATCH lines; --array is given on
    the command line, so resubmissions reuse the same script)."""
    out = Path(sub.out).resolve()
    common = [f"#SBATCH --mem={sub.mem}", f"#SBATCH --time={sub.time}", "#SBATCH --open-mode=append"]
    if sub.partition:
        common.append(f"#SBATCH --partition={sub.partition}")
    return _array_script(sub, sweep_copy, name, out, common), _merge_script(sub, name, out, common)


def _array_script(sub: Submission, sweep_copy: Path, name: str, out: Path, common: list[str]) -> str:
    run = [sys.executable, "-m", "calibjax", "run", str(sweep_copy), "--out", str(out), "--quiet"]
    run += ["--chunk-minutes", str(sub.chunk_minutes), *sub.run_args]
    lines = [
        "#!/bin/bash",
        f"# Written by calibjax submit for {sub.sweep}: task K of this array trains shard K of {sub.tasks}.",
        f"# What is done and how to resubmit what is missing: calibjax status {shlex.quote(str(out))}",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={out / 'slurm'}/%x-%A_%a.out",
        f"#SBATCH --cpus-per-task={sub.cpus}",
        *common,
        *([f"#SBATCH --gres={sub.gres}"] if sub.gres else []),
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{sub.warn_s}",
        'echo "calibjax: array task ${SLURM_ARRAY_TASK_ID}, job ${SLURM_JOB_ID},'
        ' attempt $((${SLURM_RESTART_COUNT:-0} + 1)), on $(hostname) at $(date -Is)"',
        "exec " + shlex.join(run),
        "",
    ]
    return "\n".join(lines)


def _merge_script(sub: Submission, name: str, out: Path, common: list[str]) -> str:
    lines = [
        "#!/bin/bash",
        f"# Written by calibjax submit for {sub.sweep}: joins the shards once the array has ended, however it ended.",
        f"#SBATCH --job-name={name}-merge",
        f"#SBATCH --output={out / 'slurm'}/%x-%j.out",
        "#SBATCH --cpus-per-task=1",
        *common,
        'echo "calibjax: merge, job ${SLURM_JOB_ID}, on $(hostname) at $(date -Is)"',
        "exec " + shlex.join([sys.executable, "-m", "calibjax", "merge", str(out)]),
        "",
    ]
    return "\n".join(lines)


def _sbatch(args: list[str]) -> str:
    try:
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ClusterError(NO_SBATCH) from None
    if r.returncode != 0:
        raise ClusterError(f"sbatch {shlex.join(args)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]  # "<jobid>" or "<jobid>;<cluster>"


def submit(sub: Submission, sw: sweep_mod.Sweep, dry_run: bool = False, echo=print) -> dict:
    """Submit the array and its merge job (or, with dry_run, print what would be submitted).

    Before anything is submitted: the results directory must be new, empty or this sweep's, and
    split into ``sub.tasks`` shards if it was split before; its manifest then records the count.
    """
    out = Path(sub.out)
    manifest = check_submission(sub, sw, out)
    logs = out / "slurm"
    sweep_copy = logs / f"{sw.name}-{sw.sha256[:12]}.toml"  # tasks read this copy: editing the file changes nothing
    array, merge = scripts(sub, sweep_copy, sw.name)
    array_args = ["--array", sub.array_spec(), *sub.sbatch_args]
    if dry_run:
        echo(f"# {logs}/array.sh, submitted as: sbatch --parsable {shlex.join(array_args)} {logs}/array.sh\n{array}")
        echo(
            f"# {logs}/merge.sh, submitted as: sbatch --parsable --dependency afterany:<array job id> "
            f"{shlex.join(list(sub.sbatch_args))} {logs}/merge.sh\n{merge}"
        )
        return {}
    if shutil.which("sbatch") is None:
        raise ClusterError(NO_SBATCH)
    _write_submission(sub, sw, out, manifest, sweep_copy, {"array.sh": array, "merge.sh": merge})
    array_id = _sbatch([*array_args, str(logs / "array.sh")])
    merge_id = _sbatch(["--dependency", f"afterany:{array_id}", *sub.sbatch_args, str(logs / "merge.sh")])
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "array_job": array_id,
        "merge_job": merge_id,
        "shards": list(sub.only or range(sub.tasks)),
        "submission": asdict(sub),
    }
    history = submissions(out)
    files.write_json(logs / SUBMISSIONS, [*history, record])
    return record


def check_submission(sub: Submission, sw: sweep_mod.Sweep, out: Path) -> dict | None:
    """Refuse a submission before anything is written: too many shards, a bad time limit, a
    directory of another sweep or another shard count. Returns the directory's manifest (None: new)."""
    if sub.tasks > len(sw.runs):
        raise ClusterError(f"--tasks {sub.tasks}: more shards than the sweep's {len(sw.runs)} runs")
    parse_minutes(sub.time)
    manifest = files.read_manifest(out)
    if manifest is None and results.foreign(out):
        raise ClusterError(
            f"{out}: exists and is not a calibjax results directory (no manifest.json); choose another --out"
        )
    if manifest is not None:
        if manifest.get("sweep_name") != sw.name:
            raise ClusterError(
                f"{out}: holds results of a different sweep ({manifest.get('sweep_name')!r}, not "
                f"{sw.name!r}); use --out for a new directory"
            )
        results.check_shard_count(
            manifest, out, sub.tasks, hint=f"submit with --tasks {manifest.get('shards')} (--only picks shards)"
        )
    return manifest


def submissions(out: Path) -> list[dict]:
    try:
        data = json.loads((Path(out) / "slurm" / SUBMISSIONS).read_text())
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def _write_submission(sub: Submission, sw, out: Path, manifest: dict | None, sweep_copy: Path, texts: dict) -> None:
    """The manifest with the shard count, the sweep's copy the tasks read, and the two scripts."""
    if manifest is None:
        shards = {"complete": False, "shards": sub.tasks, "shard_first": 0}
        files.write_json(out / "manifest.json", {**results.sweep_manifest(sw), **results.PENDING, **shards})
    elif "shards" not in manifest:
        files.write_json(out / "manifest.json", {**manifest, "shards": sub.tasks, "shard_first": 0})
    files.write_atomic(sweep_copy, lambda tmp: Path(tmp).write_text(sw.text))
    for name, text in texts.items():
        files.write_atomic(out / "slurm" / name, lambda tmp, text=text: Path(tmp).write_text(text))


# ---------------------------------------------------------------- status


def queued_tasks(job_ids) -> dict[str, str] | None:
    """{"<array job>_<task>": state} for tasks SLURM still knows (pending, running, requeued...), from
    squeue; None where squeue is not available."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    try:
        r = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None if "Invalid job id" not in r.stderr else {}
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


@dataclass
class Status:
    sweep: sweep_mod.Sweep
    out: Path
    shards: int | None
    first: int
    table: pd.DataFrame  # pandas DataFrame, one row per shard (or one for an unsharded directory)
    groups: pd.DataFrame  # per group: runs, done, missing
    writers: list[str]  # live chunk locks: "shards/2-of-4 g000-...: host-pid, 3 s ago"
    failed: list[str]
    resubmit: list[str]  # commands that train what is missing
    queued: dict | None
    rejected: list[str]  # chunks not counted: "chunks/g000-...: why"
    tables: list[str]  # what is wrong with the final tables (reader.table_problems)

    @property
    def missing(self) -> int:
        return int(self.table["missing"].sum())


def status(out: Path) -> Status:
    """What is done and missing in a results directory, per shard and per group."""
    manifest = files.read_manifest(out)
    if manifest is None:
        raise ClusterError(f"{out}: no manifest.json here; is it a calibjax results directory?")
    sw = results.manifest_sweep(manifest)
    shards, first = manifest.get("shards"), manifest.get("shard_first", 0)
    identity = None if results.numbers_pending(manifest) else results.recorded_identity(manifest)
    rejected = []
    done, runs_of, done_of = count_done(out, sw, shards, identity, rejected)
    history = submissions(out)
    queued = queued_tasks(sorted({h["array_job"] for h in history}))
    live = _queued_shards(history, queued, first)
    writers, busy, failed = _activity(out, manifest, shards)
    rows = []
    for k in range(shards or 1):
        n, d = int(runs_of[k]), int(done_of[k])
        state = "done" if d == n else live.get(k, "").lower() or ("training" if k in busy else "missing")
        rows.append({"shard": k if shards else "-", "runs": n, "done": d, "missing": n - d, "state": state})
    groups = pd.DataFrame({"group": sw.groups[1], "done": done}).groupby("group")["done"].agg(["size", "sum"])
    groups = groups.rename(columns={"size": "runs", "sum": "done"}).assign(missing=lambda g: g["runs"] - g["done"])
    todo = [int(r["shard"]) for r in rows if r["state"] == "missing"] if shards else []
    if shards:
        resubmit = resubmit_commands(sw, out, shards, first, todo, history)
    elif not done.all() and not busy:
        resubmit = [f"calibjax run {shlex.quote(sw.path)} --out {shlex.quote(str(out))}"]
    else:
        resubmit = []
    rejected = [f"{d.relative_to(out)}: {why}" for d, why in rejected]
    return Status(
        sw,
        out,
        shards,
        first,
        pd.DataFrame(rows),
        groups.reset_index(),
        writers,
        failed,
        resubmit,
        queued,
        rejected,
        reader.table_problems(out),
    )


def count_done(
    out: Path, sw: sweep_mod.Sweep, shards: int | None, identity: dict | None = None, rejected: list | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which runs are done, and runs and done runs per shard (one entry for an unsharded directory);
    chunks that do not check out with ``identity`` are not counted, but appended to ``rejected``."""
    n_runs = len(sw.runs)
    done = np.zeros(n_runs, bool)
    finished = results.finished_run_ids(out, sw, identity, rejected)
    if finished:
        done[np.fromiter(finished, np.int64, len(finished))] = True
    owner = np.arange(n_runs) % shards if shards else np.zeros(n_runs, np.int64)
    runs_of = np.bincount(owner, minlength=shards or 1)
    done_of = np.bincount(owner, weights=done, minlength=shards or 1).astype(np.int64)
    return done, runs_of, done_of


def _queued_shards(history: list[dict], queued: dict | None, first: int) -> dict[int, str]:
    """shard -> SLURM state of its latest task still queued."""
    live = {}
    for h in history:
        for k in h["shards"]:
            state = (queued or {}).get(f"{h['array_job']}_{first + k}")
            if state:
                live[k] = state
    return live


def _activity(out: Path, manifest: dict, shards: int | None) -> tuple[list[str], set[int], list[str]]:
    """Chunks being trained now (live locks), the shards they are in, and failed chunks."""
    writers, busy, failed = [], set(), []
    parts = [(k, out / "shards" / f"{k}-of-{shards}") for k in range(shards)] if shards else [(0, out)]
    for k, part in parts:
        where = part.relative_to(out) if part != out else "."
        for chunk_id, holder, age in chunks.live_locks(part):
            writers.append(f"{where} {chunk_id}: {holder}, heartbeat {age:.0f} s ago")
            busy.add(k)
        m = manifest if part == out else files.read_manifest(part)
        failed += [f"{part.name}/{c}" for c in (m or {}).get("failed_chunks", [])]
    return writers, busy, failed


def resubmit_commands(sw, out: Path, shards: int, first: int, todo: list[int], history: list[dict]) -> list[str]:
    """The commands that train the missing shards: the last submission again for just those, or
    (for a directory not submitted by calibjax) the shipped array script and the plain runs."""
    if not todo:
        return []
    if history:
        saved = history[-1]["submission"]
        fixed = {"run_args": tuple(saved["run_args"]), "sbatch_args": tuple(saved["sbatch_args"]), "only": ()}
        return [Submission(**{**saved, **fixed}).command(only=todo)]
    path, where = shlex.quote(sw.path), shlex.quote(str(out))
    array = f"sbatch --array={','.join(_ranges([first + k for k in todo]))} sweeps/slurm_array.sh {path} --out {where}"
    return [array, *(f"calibjax run {path} --out {where} --shard {k}/{shards}" for k in todo)]


def watch(out: Path, every: float, emit, stop=lambda: False) -> Status:
    """``calibjax status DIR --watch``: the status every ``every`` seconds, with how fast runs
    finish (since watching began, over all shards and processes) and the time left at that rate;
    returns once every run is done, or when ``stop()`` says so. Each look reads only the chunks that
    are new since the last (chunk files are hashed once per process)."""
    first = None
    while True:
        st = status(out)
        n, done = int(st.table["runs"].sum()), int(st.table["done"].sum())
        now = time.monotonic()
        first = first or (now, done)
        rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
        pace = (
            f"{rate * 60:,.1f} runs/min since watching began, about {planning.duration((n - done) / rate)} left"
            if rate > 0
            else "no run finished since watching began"
        )
        emit(f"{format_status(st)}\n[{time.strftime('%H:%M:%S')}] {done} of {n} runs done; {pace}")
        if done == n:
            return st
        deadline = now + every
        while time.monotonic() < deadline:
            if stop():
                return st
            time.sleep(min(0.2, every))


def format_status(st: Status) -> str:
    n, done = int(st.table["runs"].sum()), int(st.table["done"].sum())
    lines = [
        f"{st.sweep.name}: {done} of {n} runs done, {n - done} missing"
        + (f"; {st.shards} shards (array task ids {st.first}-{st.first + st.shards - 1})" if st.shards else "")
    ]
    if st.shards:
        lines.append(st.table.to_string(index=False))
    if len(st.groups) > 1 and n - done:
        lines.append("by group (one compiled program each):")
        lines.append(st.groups.to_string(index=False))
    if st.writers:
        lines.append("training now (chunk locks with a recent heartbeat):")
        lines += [f"  {w}" for w in st.writers]
    if st.failed:
        lines.append("failed chunks (in the last run of their shard): " + ", ".join(st.failed))
    if st.rejected:
        lines.append("chunks not counted (calibjax run moves them aside and trains their runs again):")
        lines += [f"  {r}" for r in st.rejected]
    if st.tables:
        lines.append("final tables not readable as one set:")
        lines += [f"  {t}" for t in st.tables]
    if st.queued is None and submissions(st.out):
        lines.append("(squeue not available here: shards still queued on the cluster count as missing)")
    if st.resubmit:
        lines.append("to train what is missing:" if len(st.resubmit) == 1 else "to train what is missing, one of:")
        lines += [f"  {c}" for c in st.resubmit]
    elif n - done:
        lines.append("every missing shard is still queued or training; check again later")
    return "\n".join(lines)


# ---------------------------------------------------------------- inside a job


def requeue_self(env=os.environ) -> str:
    """Ask SLURM to requeue this job (the early-warning signal came and finished work was kept).
    Returns a line for the log."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not in a SLURM job: not requeued"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e}); resubmit with the command calibjax status prints"
    if r.returncode != 0:
        return (
            f"scontrol requeue {job} failed ({(r.stderr or r.stdout).strip()}); resubmit with the command "
            "calibjax status prints"
        )
    return f"requeued job {job}: it resumes from the finished chunks"
