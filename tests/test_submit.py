"""calibjax submit and status without a cluster: shard resolution, scripts, resources, refusals.

The same commands run on a real SLURM in tests/test_cluster.py (make test-cluster)."""

import os
import re
from pathlib import Path

import jax
import pytest

from calibjax import cluster, sweep
from calibjax.execution import engine, planning, runtime
from calibjax.storage import files, results

from conftest import cli as calibjax
from conftest import sweep_text

NO_SLURM = {k: None for k in os.environ if k.startswith("SLURM_")}


def slurm(task, count, first=0, last=None):
    last = first + count - 1 if last is None else last
    return {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_ARRAY_TASK_MIN": str(first),
        "SLURM_ARRAY_TASK_MAX": str(last),
    }


def test_a_resubmitted_task_trains_its_shard_of_the_stored_count(tmp_path):
    out = tmp_path / "res"
    # The first array (0-3) fixes the count; without a stored one, the array defines it.
    assert cluster.resolve_shard(None, None, out, slurm(2, 4)) == ((2, 4), 0)
    assert cluster.resolve_shard(None, None, out, slurm(3, 4, first=1)) == ((2, 4), 1)  # --array=1-4
    stored = {"shards": 4, "shard_first": 0}
    # Resubmitting one index (--array=2: a count of 1), a list (0,3) or a step array (0-6:2) keeps it.
    assert cluster.resolve_shard(None, stored, out, slurm(2, 1, first=2)) == ((2, 4), 0)
    assert cluster.resolve_shard(None, stored, out, slurm(3, 2, first=0, last=3)) == ((3, 4), 0)
    with pytest.raises(cluster.ClusterError, match="task id 6 is not a shard of this directory's 4 .task ids 0-3"):
        cluster.resolve_shard(None, stored, out, slurm(6, 4, first=0, last=6))
    with pytest.raises(cluster.ClusterError, match="is not one range"):  # a step array cannot define the count
        cluster.resolve_shard(None, None, out, slurm(2, 4, first=0, last=6))
    with pytest.raises(results.ResultsExist, match="split into 4 shards .* not 3; use --shard K/4"):
        cluster.resolve_shard("1/3", stored, out, {})
    assert cluster.resolve_shard("1/4", stored, out, slurm(0, 9)) == ((1, 4), 0)  # --shard wins over SLURM
    assert cluster.resolve_shard(None, stored, out, {}) is None  # outside an array: every run


@pytest.mark.parametrize(
    "text,minutes",
    [("10", 10), ("1:30", 1.5), ("02:00:00", 120), ("1-0", 1440), ("1-02:30", 1590), ("0-00:00:30", 0.5)],
)
def test_time_limits_in_slurms_formats(text, minutes):
    assert cluster.parse_minutes(text) == pytest.approx(minutes)


def test_shard_lists_and_array_specs():
    assert cluster.parse_only("5,0-2,7", 8) == (0, 1, 2, 5, 7)
    with pytest.raises(cluster.ClusterError, match="must lie in 0-3"):
        cluster.parse_only("4", 4)
    sub = cluster.Submission("s.toml", "res", tasks=8, max_parallel=2, only=(0, 1, 2, 5, 7))
    assert sub.array_spec() == "0-2,5,7%2"
    assert cluster.Submission("s.toml", "res", tasks=3).array_spec() == "0-2"
    assert "--only 1,3-4 " in cluster.Submission("s.toml", "res", tasks=8).command(only=[1, 3, 4])


def test_devices_and_memory_come_from_the_allocation(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    ram, source = runtime.memory_limit()
    assert source in ("host RAM", "cgroup memory limit")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1024")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert runtime.memory_limit() == (ram, source)  # not in a job: SLURM's variables are not ours
    assert runtime.usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert runtime.memory_limit() == (1 << 30, "SLURM_MEM_PER_NODE")
    assert runtime.usable_cpus() == 1 and runtime.cpu_device_request() == 1
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "300")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert runtime.memory_limit() == (600 << 20, "SLURM_MEM_PER_CPU")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "two")
    with pytest.raises(runtime.SetupError, match="SLURM_CPUS_PER_TASK: expected a positive integer, got 'two'"):
        runtime.usable_cpus()


@pytest.mark.slow
def test_submit_dry_run_prints_the_scripts_and_writes_nothing(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(sweep_text(seeds=8))
    out = tmp_path / "res"
    r = calibjax(
        "submit",
        path,
        "--out",
        out,
        "--tasks",
        "4",
        "--max-parallel",
        "2",
        "--cpus",
        "3",
        "--mem",
        "6G",
        "--time",
        "2:00:00",
        "--gres",
        "gpu:1",
        "--partition",
        "gpu",
        "--chunk-size",
        "64",
        "--dry-run",
        "--",
        "--account=lab",
        "--qos=long",
    )
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    cut = r.stdout.index("/slurm/merge.sh, submitted as")
    array, merge = r.stdout[:cut], r.stdout[cut:]
    assert "sbatch --parsable --array 0-3%2 --account=lab --qos=long" in array
    for line in (
        "--job-name=tiny",
        "--cpus-per-task=3",
        "--mem=6G",
        "--time=2:00:00",
        "--gres=gpu:1",
        "--partition=gpu",
        "--requeue",
        "--signal=B:USR1@90",
        "--open-mode=append",
        f"--output={out.resolve()}/slurm/%x-%A_%a.out",
    ):
        assert f"#SBATCH {line}\n" in array, line
    assert re.search(
        r"exec \S+ -m calibjax run \S+/slurm/tiny-[0-9a-f]{12}\.toml --out \S+ --quiet "
        r"--chunk-minutes 5\.0 --chunk-size 64\n",
        array,
    ), array
    assert "--dependency afterany:<array job id> --account=lab --qos=long" in merge
    assert "#SBATCH --gres" not in merge and "#SBATCH --cpus-per-task=1\n" in merge and " merge " in merge


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "4", "--time", "soon"], "--time: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]], got 'soon'"),
        (["--tasks", "9"], "--tasks 9: more shards than the sweep's 8 runs"),
        (["--tasks", "4", "--only", "4"], "--only 4: shard indices must lie in 0-3"),
        (["--tasks", "0"], "--tasks: expected a positive integer, got 0"),
        (["--tasks", "4"], "sbatch not found"),
    ],
)
def test_bad_submissions_are_one_line_and_write_nothing(tmp_path, args, message):
    path = tmp_path / "s.toml"
    path.write_text(sweep_text(seeds=8))
    out = tmp_path / "res"
    r = calibjax("submit", path, "--out", out, *args, env={"PATH": str(Path(os.__file__).parent)})
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_status_and_merge_name_the_missing_shard_and_the_command_that_trains_it(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(sweep_text(seeds=4, cases={"a": {}, "b": {"mu2": 1.0}}))
    out = tmp_path / "res"
    sw = sweep.load(path)
    engine.run_sweep(sw, out, layout=planning.default_layout(devices=jax.devices()[:1]), shard=(0, 2), quiet=True)
    assert files.read_manifest(out)["shards"] == 2
    with pytest.raises(results.ResultsExist, match="split into 2 shards"):  # a shard of another count
        engine.run_sweep(sw, out, layout=planning.default_layout(devices=jax.devices()[:1]), shard=(0, 3), quiet=True)
    st = cluster.status(out)
    assert st.table[["shard", "runs", "done", "missing", "state"]].values.tolist() == [
        [0, 4, 4, 0, "done"],
        [1, 4, 0, 4, "missing"],
    ]
    text = cluster.format_status(st)
    assert "tiny: 4 of 8 runs done, 4 missing; 2 shards" in text
    assert f"--out {out} --shard 1/2" in text and "sbatch --array=1 sweeps/slurm_array.sh" in text
    r = calibjax("merge", out, "--no-figures", env=NO_SLURM)
    assert r.returncode == 1 and "4 run(s) missing: run_id 1, 3, 5, 7" in r.stderr
    assert "--shard 1/2" in r.stdout
    # A resubmitted array of one task (--array=1: SLURM_ARRAY_TASK_COUNT=1) trains shard 1 of 2.
    r = calibjax("run", path, "--out", out, "--quiet", "--no-figures", env={**NO_SLURM, **slurm(1, 1, first=1)})
    assert r.returncode == 0 and "shards/1-of-2" in r.stdout, r.stderr
    assert cluster.status(out).missing == 0
    assert calibjax("merge", out, "--no-figures", env=NO_SLURM).returncode == 0
