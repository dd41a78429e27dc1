"""The sweep engine: chunking, devices, shards, failures and memory planning.

A run's numbers must be the same bits whatever layout trained it: the matrix below compares every
table with DataFrame.equals on a sweep of two static groups, curves on, 1000 steps and a diverging
run among the others (one-ulp differences would have grown visible by then).
"""

import dataclasses
import tomllib

import jax
import numpy as np
import pandas as pd
import pytest

from calibjax import pipeline, sweep
from calibjax.core import kernel
from calibjax.execution import engine, kernel_loader, planning
from calibjax.storage import files, reader, results

from conftest import sweep_doc, to_toml

DOC = sweep_doc(
    name="eng",
    train={"steps": 20, "checkpoints": [5, 20], "n_data": 300},
    eval={"points": 64},
    grid={"mu2": [1.0, 2.0, 3.0], "lr": [1e-3, 1e-2]},
)
TEXT = to_toml(DOC)
N_RUNS = 12
WIDTH = 4  # runs vmapped together per device in these tests (small, so padding stays cheap)

# 3 cases x 2 batch sizes (two static groups) x 2 seeds; case "wild" diverges. With the split of kl
# (eval.kl_split: two level-set solves as one batch).
MATRIX_DOC = sweep_doc(
    name="matrix",
    train={"steps": 1000, "checkpoints": [10, 100, 1000], "n_data": 300},
    eval={"points": 64, "calibration_samples": 200, "curves": True, "curve_points": 5, "kl_split": True},
    cases={"a": {}, "b": {"mu2": 1.0, "sigma1": 2.0}, "wild": {"lr": 1e30}},
    grid={"batch_size": [16, 32]},
)
MATRIX = to_toml(MATRIX_DOC)
# The matrix with a hidden-to-hidden layer (24 x 24: a 16-column and an 8-column panel, batches of
# 16 and 32 rows), the layer calibjax's CPU kernel computes (without the split of kl: the evaluation
# is XLA's on both product paths, tested above).
KERNEL_MATRIX = to_toml(MATRIX_DOC | {"model": {"hidden": [24, 24]}, "eval": {**MATRIX_DOC["eval"], "kl_split": False}})
TABLES = ("runs", "metrics", "density", "calibration", "curves", "summary", "summary_by_setting")


def load(text=TEXT):
    return sweep.parse(tomllib.loads(text), "eng.toml", text)


def layout(chunk=None, devices=4, width=WIDTH, dense="xla"):
    return planning.default_layout(chunk_size=chunk, inner_batch=width, devices=jax.devices()[:devices], dense=dense)


def finished(out) -> dict[str, pd.DataFrame]:
    """Every final table of a results directory, after summaries (as `calibjax run` leaves it)."""
    pipeline.finish(out, figures=False)
    return {k: v for k, v in reader.load_results(out).items() if k in TABLES}


def assert_identical(a: dict, b: dict):
    assert set(a) == set(b) == set(TABLES)
    for name in TABLES:
        assert a[name].equals(b[name]), name


@pytest.fixture(scope="module")
def matrix_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    report = engine.run_sweep(load(MATRIX), out, layout=layout(), quiet=True)
    assert report.complete and report.compiles == 2 and report.trained == 12
    return finished(out)


@pytest.mark.slow
@pytest.mark.parametrize("chunk,devices", [(1, 4), (7, 4), (8, 4), (None, 2), (5, 1)])
def test_a_runs_bits_do_not_depend_on_chunk_size_or_device_count(tmp_path, matrix_reference, chunk, devices):
    t = matrix_reference
    assert (t["runs"]["status"] == "diverged").sum() == 4 and (t["runs"]["status"] == "ok").sum() == 8
    report = engine.run_sweep(load(MATRIX), tmp_path, layout=layout(chunk, devices), quiet=True)
    assert report.complete
    assert_identical(finished(tmp_path), t)


@pytest.fixture(scope="module")
def kernel_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix-kernel")
    report = engine.run_sweep(load(KERNEL_MATRIX), out, layout=layout(dense="kernel"), quiet=True)
    assert report.complete and files.read_manifest(out)["dense"] == "kernel"
    t = finished(out)
    assert (t["runs"]["status"] == "diverged").sum() == 4 and (t["runs"]["status"] == "ok").sum() == 8
    return t


@pytest.mark.slow
@pytest.mark.skipif(not kernel_loader.available(), reason="the CPU kernel cannot be built or run here")
@pytest.mark.parametrize("chunk,devices", [(7, 4), (None, 2), (5, 1)])
def test_with_the_cpu_kernel_a_runs_bits_do_not_depend_on_chunk_size_or_device_count(
    tmp_path, kernel_reference, chunk, devices
):
    report = engine.run_sweep(load(KERNEL_MATRIX), tmp_path, layout=layout(chunk, devices, dense="kernel"), quiet=True)
    assert report.complete
    assert_identical(finished(tmp_path), kernel_reference)


@pytest.mark.skipif(not kernel_loader.available(), reason="the CPU kernel cannot be built or run here")
def test_results_of_the_other_product_path_are_refused_and_a_resume_keeps_the_recorded_one(tmp_path):
    sw = load(to_toml(DOC | {"model": {"hidden": [16, 16]}}))
    engine.run_sweep(sw, tmp_path, layout=layout(chunk=4, dense="kernel"), quiet=True)
    assert files.read_manifest(tmp_path)["dense"] == "kernel"
    with pytest.raises(results.ResultsExist, match=r"dense-layer products \(--dense\) 'kernel', not 'xla'"):
        engine.run_sweep(sw, tmp_path, layout=layout(), quiet=True)
    assert planning.dense_choice(None, files.read_manifest(tmp_path)) == "kernel"
    program = engine.Trainer(layout(dense="kernel")).executable(sw.block_groups[0][0])
    assert kernel.TARGET in program.as_text()  # the engine's program calls the kernel


@pytest.mark.slow
def test_three_shards_merged_are_bit_identical_to_the_unsharded_sweep(tmp_path, matrix_reference):
    sw = load(MATRIX)
    for k, devices in zip(range(3), (4, 1, 2), strict=True):  # each shard on its own device count
        r = engine.run_sweep(sw, tmp_path, layout=layout(devices=devices), shard=(k, 3), quiet=True)
        assert r.trained == 4 and not r.complete
        assert not (tmp_path / "metrics.parquet").exists()
    assert results.merge(tmp_path) == []
    assert_identical(finished(tmp_path), matrix_reference)


@pytest.mark.slow
def test_results_of_another_vectorisation_width_are_refused(tmp_path):
    """The width can change a run's bits (benchmarks/layout_bits.py: widths 16 and 32 of the study's
    model differ after 1000 steps), so a directory keeps one and refuses results of another."""
    doc = {k: v for k, v in MATRIX_DOC.items() if k != "grid"}  # one group: two compiles, not four
    sw = load(to_toml(doc | {"train": MATRIX_DOC["train"] | {"steps": 100, "checkpoints": [10, 100]}}))
    engine.run_sweep(sw, tmp_path / "w4", layout=layout(devices=1), quiet=True)
    engine.run_sweep(sw, tmp_path / "w2", layout=layout(devices=1, width=2), quiet=True)
    assert files.read_manifest(tmp_path / "w2")["vector_width"] == 2
    with pytest.raises(results.ResultsExist, match="vectorisation width .*4.*not 2"):
        engine.run_sweep(sw, tmp_path / "w4", layout=layout(devices=1, width=2), quiet=True)


def test_chunks_have_one_call_size_of_whole_batches():
    chunks = planning.plan_chunks(load(), layout(chunk=5))
    assert [len(c.run_ids) for c in chunks] == [5, 5, 2]
    n_dev = min(4, jax.device_count())
    assert {c.size for c in chunks} == {n_dev * WIDTH}  # one call size (one compile), whole batches
    assert [c.size for c in planning.plan_chunks(load(), layout(chunk=100))] == [n_dev * WIDTH]


@pytest.mark.slow
def test_merge_reports_missing_runs(tmp_path):
    engine.run_sweep(load(), tmp_path, layout=layout(), shard=(1, 4), quiet=True)
    missing = results.merge(tmp_path)
    assert missing == [i for i in range(N_RUNS) if i % 4 != 1]
    runs = pd.read_parquet(tmp_path / "runs.parquet")
    assert (runs["status"] == "missing").sum() == len(missing)


@pytest.mark.slow
def test_a_failing_chunk_is_reported_and_retried_alone(tmp_path, monkeypatch):
    original = engine.Trainer.__call__

    def flaky(self, static, dyn, *args, **kwargs):
        if float(dyn.task.mean[0, 1, 0, 0]) == 2.0:  # the chunk holding mu2 = 2
            raise RuntimeError("simulated device failure")
        return original(self, static, dyn, *args, **kwargs)

    monkeypatch.setattr(engine.Trainer, "__call__", flaky)
    first = engine.run_sweep(load(), tmp_path / "a", layout=layout(chunk=4), quiet=True)
    assert len(first.failed) == 1 and first.trained == 8 and not first.complete
    assert not (tmp_path / "a" / "metrics.parquet").exists()
    monkeypatch.setattr(engine.Trainer, "__call__", original)
    second = engine.run_sweep(load(), tmp_path / "a", layout=layout(chunk=4), quiet=True)
    assert second.trained == 4 and second.complete and not second.failed
    engine.run_sweep(load(), tmp_path / "b", layout=layout(), quiet=True)
    for name in ("runs", "metrics", "density", "calibration"):
        assert pd.read_parquet(tmp_path / "a" / f"{name}.parquet").equals(
            pd.read_parquet(tmp_path / "b" / f"{name}.parquet")
        ), name


def test_chunks_shrink_to_fit_memory():
    st = dataclasses.replace(load().groups[0][0], curve_points=201)  # results held: ~50 kB/run
    working, held = planning.memory_per_run(st)
    big = layout()
    small = dataclasses.replace(big, memory=4 * working + 40 * held)
    runs_big, _ = big.chunk_size(10_000, st)
    runs_small, size_small = small.chunk_size(10_000, st)
    assert runs_big == min(10_000, big.max_chunk)
    n_dev = len(big.devices)
    assert runs_small < runs_big and size_small % (n_dev * WIDTH) == 0
    per_device = WIDTH * working + (size_small // n_dev) * held
    assert per_device <= small.memory * 1.1  # within budget (rounding to whole inner batches aside)
    # Curves add their table (C x P x M rows of run_id, step, x, class, model_prob, true_prob; 8 bytes
    # each) and their float32 device arrays x (P), true_prob (P x M), model_prob (C x P x M).
    c, p, m = len(st.checkpoints), 201, 2
    curves = c * p * m * 6 * 8 + (p + p * m + c * p * m) * 4
    assert held - planning.memory_per_run(dataclasses.replace(st, curve_points=0))[1] == curves


def test_plan_counts_runs_groups_and_chunks():
    sw = load(to_toml(DOC | {"grid": DOC["grid"] | {"batch_size": [16, 32]}}))
    table = planning.plan(sw, layout(chunk=5))
    assert table["runs"].tolist() == [12, 12] and table["chunks"].tolist() == [3, 3]
    assert (table["est_seconds"] > 0).all() and (table["memory_per_chunk_mb"] > 0).all()


def test_capacity_axes_make_one_group_per_architecture():
    """width x depth x activation in one sweep: one compiled group per architecture, holding the runs
    of every case and seed (a group compiles once: matrix_reference counts the compiles)."""
    doc = sweep_doc(
        name="cap",
        seeds=2,
        train={"steps": 20, "checkpoints": [5, 20]},
        model={"hidden": None},
        cases={"a": {}, "b": {"mu2": 1.0}},
        grid={"width": [4, 8], "depth": [1, 2], "activation": ["relu", "tanh"]},
    )
    sw = load(to_toml(doc))
    assert len(sw.runs) == 32 and len(sw.groups[0]) == 8
    runs = sweep.runs_table(sw)
    assert runs.groupby("group").size().eq(4).all() and runs.groupby("group")["case"].nunique().eq(2).all()
    assert set(runs["hidden"]) == {"4", "8", "4-4", "8-8"}
    assert {(s.hidden, s.activation) for s in map(sweep.static_of, sw.runs)} == {
        (h, a) for h in ((4,), (8,), (4, 4), (8, 8)) for a in ("relu", "tanh")
    }


TWO_D = to_toml(
    sweep_doc(
        name="two_d",
        task={
            "means": [[-1.0, 0.0], [1.0, 0.0], [[0.0, 2.0], [0.0, -2.0]]],
            "sigmas": [[1.0, 1.0], [1.0, 1.0], [[0.5, 0.5], [0.5, 0.5]]],
        },
        train={"steps": 20, "checkpoints": [5, 20], "n_data": 300},
        eval={"points": 256, "calibration_samples": 200, "curves": True, "curve_points": 7, "curve_range": [-3.0, 3.0]},
    )
)


@pytest.mark.slow
def test_two_d_three_class_mixture_sweep_writes_posterior_maps(tmp_path):
    from calibjax.core import tasks

    sw = load(TWO_D)
    report = engine.run_sweep(sw, tmp_path, layout=layout(), quiet=True)
    assert report.complete
    pipeline.finish(tmp_path)
    curves = pd.read_parquet(tmp_path / "curves.parquet")
    assert {"x", "x2"} <= set(curves.columns) and len(curves) == 2 * 2 * 7 * 7 * 3
    assert curves["x"].min() == -3.0 and curves["x2"].max() == 3.0
    # true_prob is the exact posterior at (x, x2)
    row = curves.iloc[123]
    task = sweep.dynamic_of(sw.runs[0]).task
    exact = np.exp(np.asarray(tasks.log_posterior(task, np.array([row["x"], row["x2"]], np.float32))))
    assert row["true_prob"] == pytest.approx(exact[int(row["class"]) - 1], abs=1e-6)
    assert (tmp_path / "figures" / "posterior_default.png").exists()
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert np.isfinite(m[["kl", "true_ece", "ece"]].to_numpy()).all()


@pytest.mark.slow
def test_results_of_a_calibjax_with_other_numbers_are_not_mixed(tmp_path):
    engine.run_sweep(load(), tmp_path, layout=layout(), shard=(0, 2), quiet=True)
    part = tmp_path / "shards" / "0-of-2" / "manifest.json"
    old = {**files.read_manifest(part.parent), "numbers_version": 1, "versions": {"calibjax": "0.1.0"}}
    files.write_json(part, old)
    with pytest.raises(results.ResultsExist, match="calibjax 0.1.0.*numbers_version 1"):
        results.merge(tmp_path)
    files.write_json(
        part, {**old, "numbers_version": files.read_manifest(tmp_path)["numbers_version"], "sweep_name": "another"}
    )  # a part copied from another sweep
    with pytest.raises(results.ResultsExist, match="0-of-2: holds results of a different sweep .'another'"):
        results.merge(tmp_path)
    files.write_json(part, old)
    top = {k: v for k, v in files.read_manifest(tmp_path).items() if k != "numbers_version"}  # written before the key
    files.write_json(tmp_path / "manifest.json", top)
    with pytest.raises(results.ResultsExist, match="numbers_version 1"):
        engine.run_sweep(load(), tmp_path, layout=layout(), shard=(1, 2), quiet=True)
    report = engine.run_sweep(load(), tmp_path, layout=layout(), overwrite=True, quiet=True)
    assert report.complete and report.trained == N_RUNS
