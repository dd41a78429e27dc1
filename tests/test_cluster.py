"""calibjax on a real SLURM cluster (make test-cluster): submit, cancel, requeue, time limits, resubmit.

A one-node cluster of Debian's slurm-wlm and munge is started on localhost (tests/slurm_cluster.py).
Three directories train the same 32-run sweep (1000 steps) side by side, and each must end
bit-identical (``DataFrame.equals``) to one unsharded run:

- A, by ``calibjax submit`` (4 shards, 2 at a time): one task is cancelled after its first chunk,
  another is requeued by ``scontrol requeue``; the merge job runs anyway and reports the missing
  shard; ``calibjax status`` names it and prints the command that resubmits it alone; that command
  is run as printed.
- B, by ``sweeps/slurm_array.sh`` (a user's own sbatch line) with a one-minute limit while a chunk
  of it is held by this test: the early-warning signal makes the task requeue itself; given time,
  the requeued task finishes.
- C, by a plain ``sbatch --wrap`` with a one-minute limit and no early warning: SLURM kills it at
  the limit; what it leaves resumes.
"""

import glob
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import pandas as pd
import pytest
from slurm_cluster import Cluster, missing_parts

from calibjax import sweep
from calibjax.execution import planning
from calibjax.storage import chunks, files

from conftest import cli as calibjax
from conftest import sweep_text

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
SWEEP = sweep_text(
    name="cluster",
    seeds=16,
    model={"hidden": [16]},
    grid={"lr": [0.001, 0.003]},
    train={"steps": 1000, "checkpoints": [500, 1000]},
)


def SLURM(cluster: Cluster) -> dict:  # noqa: N802
    """For calibjax commands that submit: SLURM's configuration, and no device count of the tests'
    (sbatch passes the environment on, and the tasks must take theirs from the allocation)."""
    return {"SLURM_CONF": str(cluster.conf), "CALIBJAX_CPU_DEVICES": None}


TABLES = ("runs", "metrics", "density", "calibration", "summary")


@pytest.fixture(scope="module")
def cluster():
    missing = missing_parts()
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}; make test-cluster installs slurm-wlm and munge")
    root = Path(tempfile.mkdtemp(prefix="calibjax-slurm-"))  # not under pytest's 0700 folder: munged must reach it
    c = Cluster(root)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


JOB_LOGS: list[str] = []  # glob patterns of the jobs' output, shown when a wait fails


def job_logs() -> str:
    return "\n".join(f"--- {p}\n{Path(p).read_text()[-2000:]}" for g in JOB_LOGS for p in sorted(glob.glob(g)))


def wait_for(predicate, what: str, cluster: Cluster, timeout: float = 180, every: float = 0.1):
    t0 = time.time()
    while not (value := predicate()):
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{what}: not after {timeout} s\n{job_logs()}\n{cluster.logs()}")
        time.sleep(every)
    return value


def finished_chunks(part: Path) -> int:
    return sum(chunks.chunk_complete(d) for d in part.glob("chunks/g*"))


def hold_last_chunk(sw, part: Path, shard, chunk_size: int) -> chunks.ChunkLock:
    """Lock the last chunk a task of this directory will train, as a process training it would:
    the task trains the others, then waits for this one."""
    layout = planning.Layout(tuple(jax.devices()[:1]), planning.CPU_INNER_BATCH, chunk_size, 1 << 40)
    chunk = planning.plan_chunks(sw, layout, planning.shard_run_ids(len(sw.runs), shard))[-1]
    lock = chunks.ChunkLock(part, chunk.chunk_id)
    assert lock.acquire(), f"the task took {chunk.chunk_id} first"
    return lock


def log_of(pattern: str) -> str:
    files = sorted(Path(p) for p in glob.glob(pattern))
    return "".join(p.read_text() for p in files)


def assert_same_tables(out: Path, ref: Path) -> None:
    for name in TABLES:
        a, b = pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(ref / f"{name}.parquet")
        assert a.equals(b), f"{out.name}: {name} differs from the unsharded run"


def test_submit_cancel_requeue_time_limit_resubmit_merge(cluster, tmp_path):
    t_start = time.time()
    path = tmp_path / "cluster.toml"
    path.write_text(SWEEP)
    sw = sweep.load(path)
    ref = tmp_path / "ref"
    # The unsharded reference, on one device with calls of 8 runs like every task below: it also
    # puts that program in the compilation cache the tasks share.
    r = calibjax(
        "run", path, "--out", ref, "--quiet", "--no-figures", "--chunk-size", "8", env={"CALIBJAX_CPU_DEVICES": "1"}
    )
    assert r.returncode == 0, r.stderr
    t_ref = time.time()
    JOB_LOGS[:] = [f"{tmp_path}/*.out", f"{tmp_path}/A/slurm/*.out"]

    # --- A: calibjax submit, 4 shards, 2 at a time, one chunk (of one run) per call
    a = tmp_path / "A"
    r = calibjax(
        "submit",
        path,
        "--out",
        a,
        "--tasks",
        "4",
        "--max-parallel",
        "2",
        "--cpus",
        "1",
        "--mem",
        "1G",
        "--time",
        "10",
        "--chunk-size",
        "1",
        env=SLURM(cluster),
    )
    assert r.returncode == 0, r.stderr
    array, merge = re.search(r"array job (\d+) .* merge job (\d+)", r.stdout).groups()
    assert cluster.job(merge)["JobState"] == "PENDING" and f"afterany:{array}" in cluster.job(merge)["Dependency"]

    # --- B: the repository's script, a one-minute limit, an early warning 10 s before it
    b = tmp_path / "B"
    r = cluster.run(
        "sbatch",
        "--parsable",
        "--array=0-1",
        "-c",
        "1",
        "--mem=1G",
        "--time=1",
        "--signal=B:USR1@10",
        f"--output={tmp_path}/B-%A_%a.out",
        "sweeps/slurm_array.sh",
        path,
        "--out",
        b,
        "--chunk-size",
        "2",
        cwd=REPO,
    )
    b_job = r.stdout.strip()

    # --- C: a plain sbatch line, a one-minute limit, no early warning
    c = tmp_path / "C"
    r = cluster.run(
        "sbatch",
        "--parsable",
        "-c",
        "1",
        "--mem=1G",
        "--time=1",
        f"--output={tmp_path}/C.out",
        "--wrap",
        f"exec {sys.executable} -m calibjax run {path} --out {c} --chunk-size 2 --quiet",
    )
    c_job = r.stdout.strip()

    # Hold the last chunk of C and of B's shard 0 once their tasks have made the directories theirs.
    locks = {}
    while len(locks) < 2:
        for out, part, shard in ((c, c, None), (b, b / "shards" / "0-of-2", (0, 2))):
            if out not in locks and (out / "manifest.json").exists():
                locks[out] = hold_last_chunk(sw, part, shard, 2)
        assert time.time() - t_ref < 120, f"B and C did not start\n{job_logs()}"
        time.sleep(0.05)

    # A: requeue task 0 and cancel task 1, each after its first chunk
    todo = {"0": "requeue", "1": "scancel"}
    while todo:
        for k in list(todo):
            if finished_chunks(a / "shards" / f"{k}-of-4"):
                if todo.pop(k) == "requeue":
                    cluster.run("scontrol", "requeue", f"{array}_{k}")
                else:
                    cluster.run("scancel", f"{array}_{k}")
        time.sleep(0.05)
        assert time.time() - t_ref < 120, f"A's tasks 0 and 1 wrote no chunk\n{job_logs()}"
    assert finished_chunks(a / "shards" / "1-of-4") < 8  # cancelled mid-run

    # B: the early warning came while the task waited for the held chunk: it requeued itself
    wait_for(
        lambda: "requeued job" in log_of(f"{tmp_path}/B-{b_job}_0.out"),
        "B requeued itself",
        cluster,
        timeout=150,
        every=0.5,
    )
    log = log_of(f"{tmp_path}/B-{b_job}_0.out")
    assert "calibjax: time limit near (SIGUSR1); the chunk in flight is abandoned" in log, log
    cluster.run("scontrol", "update", f"JobId={b_job}_0", "TimeLimit=5")  # the next attempt gets time
    locks[b].release()

    # A: the merge job ran after the array although a task was cancelled, and said what is missing
    fields = cluster.wait_state(merge, ("COMPLETED", "FAILED"))
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "1:0", fields
    assert cluster.job(f"{array}_1")["JobState"] == "CANCELLED"
    task0 = cluster.job(f"{array}_0")
    assert task0["JobState"] == "COMPLETED" and task0["Restarts"] == "1", task0
    log0 = log_of(f"{a}/slurm/cluster-{array}_0.out")
    assert "interrupted by SIGTERM; finished chunks are kept" in log0 and "attempt 2" in log0, log0
    trained = [int(n) for n in re.findall(r"(\d+) runs trained \(", log0)]
    assert trained and trained[-1] < 8, log0  # the requeued attempt resumed: it did not start over
    merge_log = log_of(f"{a}/slurm/cluster-merge-{merge}.out")
    assert "run(s) missing" in merge_log and "--only 1" in merge_log, merge_log

    status = calibjax("status", a, env=SLURM(cluster))
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if re.match(r"\s*\d+\s+8\s", line)}
    assert rows["1"][-1] == "missing" and all(rows[k][-1] == "done" for k in "023"), status.stdout
    command = next(line.strip() for line in status.stdout.splitlines() if line.strip().startswith("calibjax submit"))
    assert "--only 1 " in command and "--tasks 4" in command, command
    words = shlex.split(command)
    r = calibjax(*words[1:], env=SLURM(cluster))  # exactly as printed
    assert r.returncode == 0, r.stderr
    array2, merge2 = re.search(r"array job (\d+) .* merge job (\d+)", r.stdout).groups()
    assert cluster.wait_state(merge2, ("COMPLETED", "FAILED"))["JobState"] == "COMPLETED", log_of(f"{a}/slurm/*")
    assert cluster.job(f"{array2}_1")["JobState"] == "COMPLETED"
    assert_same_tables(a, ref)
    shard = files.read_manifest(a / "shards" / "2-of-4")
    assert shard["layout"]["devices"] == 1  # from --cpus 1, not the node's cores
    assert shard["layout"]["memory_per_device"] == (1 << 30) * planning.MEMORY_FRACTION  # from --mem 1G

    # B: the requeued attempt finished shard 0; shard 1 never waited
    for k in "01":
        assert cluster.wait_state(f"{b_job}_{k}", ("COMPLETED", "FAILED", "TIMEOUT"))["JobState"] == "COMPLETED"
    assert cluster.job(f"{b_job}_0")["Restarts"] == "1"
    assert calibjax("merge", b, "--no-figures").returncode == 0
    assert_same_tables(b, ref)

    # C: killed at the time limit while it waited; the kill is logged and what is left resumes
    fields = cluster.wait_state(c_job, ("TIMEOUT", "COMPLETED", "FAILED"), timeout=150)
    log = log_of(f"{tmp_path}/C.out")
    assert fields["JobState"] == "TIMEOUT" and "interrupted by SIGTERM; finished chunks are kept" in log, log
    locks[c].release()
    r = calibjax("run", path, "--out", c, "--chunk-size", "2", "--quiet", "--no-figures")
    assert r.returncode == 0 and "2 runs trained" in r.stdout, r.stdout + r.stderr
    assert_same_tables(c, ref)
    print(f"cluster scenario: reference {t_ref - t_start:.0f} s, all {time.time() - t_start:.0f} s")
