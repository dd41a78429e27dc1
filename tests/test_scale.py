"""The host path at scale equals the simple one: lazy expansion against resolving every run,
streamed final tables against sorting everything in memory, vectorised summaries against 0.5.0's
loops (tests/summaries_reference.py), on the shipped sweeps' shapes with synthetic results."""

import itertools
import math
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import summaries_reference as reference

from calibjax import sweep
from calibjax.analysis import summaries
from calibjax.execution import planning, synthetic
from calibjax.storage import chunks, files, reader, results, tables

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "sweeps").glob("*.toml"))

# Independent axes (means by address, lr, n_data, lr_schedule) crossed with coupled ones (hidden,
# a prior), cases of other shapes (components, a 2-D task) and entries set twice, in both orders.
MIXED = """
name = "mixed"
seeds = [3, 1, 4]
[task]
means = [0.0, [[1.0], [2.0]]]
sigmas = [1.0, 1.0]
[train]
steps = 100
[cases.a]
mu2_k1 = 5.0
[cases.b]
means = [[0.0, 1.0], [[1.0, 2.0], [3.0, 4.0]]]
sigmas = [1.0, 1.0]
mu2_k2 = 7.0
[grid]
mu2 = {linspace = [0, 2], num = 3}
hidden = [[8], [4, 4]]
lr = [1e-3, 1e-2]
sigma1_d1 = [0.5, 2.0]
n_data = [100, "online"]
lr_schedule = ["constant", "cosine"]
prior1 = [0.3, 0.5]
mu2_k1 = [9.0]
"""


def naive(sw: sweep.Sweep) -> tuple[pd.DataFrame, list]:
    """0.5.0's expansion: every grid point resolved on its own, in file order."""
    rows, statics, hashes, group_of = [], {}, [], []
    axes = [[(a.key, v, a.where) for v in a.values] for a in sw.axes]
    for name, overrides in sw.cases:
        for point in itertools.product(*axes):
            settings, origin = dict(sw.base), dict(sw.origin)
            for key, (v, where) in overrides.items():
                settings[key], origin[key] = v, where
            for key, v, where in point:
                settings[key], origin[key] = v, where
            run = sweep.resolve.resolve(settings, origin, "x:")[0]
            for seed in sw.seeds:
                r = sweep.Run(name, seed, run.settings, run.origin, run.task)
                static = sweep.static_of(r)
                group_of.append(statics.setdefault(static, len(statics)))
                rows.append(sweep.run_row(len(rows), r))
                hashes.append(sweep.run_hash(r, static))
    df = pd.DataFrame(rows)
    df["group"], df["run_hash"] = group_of, hashes
    return df, list(statics)


@pytest.mark.parametrize("name", [*SHIPPED, "mixed"])
def test_lazy_expansion_equals_resolving_every_run(name):
    sw = (
        sweep.parse(tomllib.loads(MIXED), "mixed.toml", MIXED)
        if name == "mixed"
        else sweep.load(ROOT / "sweeps" / name)
    )
    if sw.n_runs > 3000:
        pytest.skip("the naive expansion takes too long here")
    table, statics = naive(sw)
    assert sweep.runs_table(sw).equals(table)
    assert sw.block_groups[0] == statics
    for i in (0, sw.n_runs // 2, sw.n_runs - 1):  # a run made alone from its index
        r = sw.runs[i]
        assert sweep.run_row(i, r) == sweep.run_row(i, sweep.Run(**{**r.__dict__}))
        assert sweep.run_hash(r, statics[table["group"][i]]) == table["run_hash"][i]
        assert sw.run_hashes([i]) == [table["run_hash"][i]]


def test_an_error_in_any_value_of_an_independent_axis_is_found_before_anything_runs():
    doc = tomllib.loads(MIXED.replace('n_data = [100, "online"]', "n_data = [100, 3_000_000_000]"))
    with pytest.raises(sweep.SweepError, match=r"\[grid\] n_data: expected at most 2,147,483,647"):
        sweep.parse(doc, "mixed.toml")
    doc = tomllib.loads(MIXED.replace("lr = [1e-3, 1e-2]", "lr = [1e-3, 1e39]"))
    with pytest.raises(sweep.SweepError, match=r"\[grid\] lr: not representable in float32"):
        sweep.parse(doc, "mixed.toml")
    doc = tomllib.loads(MIXED.replace("sigma1_d1 = [0.5, 2.0]", "sigma1_d3 = [0.5, 2.0]"))
    with pytest.raises(sweep.SweepError, match="sigma1_d3: no such entry"):
        sweep.parse(doc, "mixed.toml")  # case a is 1-D: the entry's address fits case b only


def in_memory(out: Path, runs: pd.DataFrame, name: str) -> pd.DataFrame | None:
    """The final table as 0.5.0 built it: every chunk read whole, concatenated, sorted."""
    owners = chunks.finished_chunks(out)
    parts = []
    for d, owned in owners.items():
        if (d / f"{name}.parquet").exists():
            df = pd.read_parquet(d / f"{name}.parquet")
            df = df[df["run_id"].isin(owned)]
            parts.append(df.assign(run_hash=df["run_id"].map(owned)))
    if not parts:
        return None
    df = pd.concat(parts, ignore_index=True)
    columns = list(df.columns.drop("run_hash"))
    df = df.drop(columns="run_id").merge(runs[["run_hash", "run_id"]], on="run_hash")[columns]
    return df.sort_values(list(tables.TABLES[name].keys), kind="stable").reset_index(drop=True)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name,chunk",
    [
        ("blog.toml", 5),
        ("estimators.toml", 5),
        pytest.param("capacity.toml", 7, marks=SLOW),
        pytest.param("losses.toml", 16, marks=SLOW),
        pytest.param("multiclass2d.toml", 3, marks=SLOW),
        pytest.param("mixed", 100, marks=SLOW),
    ],
)
def test_streamed_tables_and_vectorised_summaries_equal_the_in_memory_ones(tmp_path, name, chunk):
    """Synthetic results for every run of a shipped sweep, in small chunks (capacity's 48 groups
    interleave, so chunks overlap in run_id), with rows small enough that row groups split them."""
    sw = (
        sweep.parse(tomllib.loads(MIXED), "mixed.toml", MIXED)
        if name == "mixed"
        else sweep.load(ROOT / "sweeps" / name)
    )
    layout = planning.default_layout(chunk_size=chunk, inner_batch=1)
    out = tmp_path / "r"
    synthetic.new_results(sw, out, layout)
    synthetic.write_chunks(sw, out, layout, diverged=0.2)
    runs = sweep.runs_table(sw)
    missing = results.finalize(out, runs, layout.identity)
    assert missing == []
    for table in tables.TABLES:
        if table != "status":
            expected = in_memory(out, runs, table)
            assert (expected is None) == (not (out / f"{table}.parquet").exists())
            if expected is not None:
                assert reader.read_table(out, table).equals(expected), table
    t = reader.load_results(out)
    got = summaries.summarize(t["metrics"], t["runs"], recalibrated=t.get("recalibrated"))
    want = reference.summarize(t["metrics"], t["runs"], recalibrated=t.get("recalibrated"))
    assert got.equals(want)
    assert summaries.aggregate(got).equals(reference.aggregate(want))
    assert (got["status"] == "diverged").any() and np.isfinite(got["steps_to_kl_0.01"]).any()


def test_row_groups_split_a_table_and_filters_read_only_what_they_ask(tmp_path):
    sw = sweep.load(ROOT / "sweeps" / "blog.toml")
    layout = planning.default_layout(chunk_size=4, inner_batch=1)
    out = tmp_path / "r"
    synthetic.new_results(sw, out, layout)
    synthetic.write_chunks(sw, out, layout)
    runs = sweep.runs_table(sw)
    parts = [(d, (np.fromiter(o, np.int64), np.fromiter(o, np.int64))) for d, o in chunks.finished_chunks(out).items()]
    path = out / "density.parquet"
    assert chunks.write_merged(path, parts, list(tables.TABLES["density"].keys), rows_per_group=100)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups > 5
    assert reader.read_table(out, "density").equals(in_memory(out, runs, "density"))
    last = reader.read_table(out, "density", columns=["run_id", "step", "max_err"], filters=[("step", "==", 20000)])
    full = in_memory(out, runs, "density")
    assert last.equals(full.loc[full["step"] == 20000, ["run_id", "step", "max_err"]].reset_index(drop=True))


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_summaries_equal_the_loops_on_random_tables(seed):
    """Ragged checkpoint counts, nan and inf, ties, runs without status, constant stretches."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in range(300):
        n = int(rng.integers(1, 9))
        steps = np.sort(rng.choice(np.arange(0, 5000), n, replace=False)) + (0 if rng.random() < 0.3 else 1)
        kl = np.round(10 ** rng.uniform(-4, 0, n), int(rng.integers(1, 4)))  # rounding gives ties
        if rng.random() < 0.1:
            kl[rng.integers(n)] = np.nan
        if rng.random() < 0.1:
            kl[:] = kl[0]
        for s, v in zip(steps, kl, strict=True):
            rows.append(
                {
                    "run_id": run,
                    "step": int(s),
                    "kl": v,
                    "kl_rel": v * 3,
                    "accuracy": rng.random(),
                    "bayes_accuracy": 0.9,
                    "tv": v,
                    "max_err": v,
                    "err_dense": rng.random(),
                    "err_sparse": np.inf if rng.random() < 0.05 else rng.random(),
                }
            )
    metrics = pd.DataFrame(rows)
    runs = pd.DataFrame(
        {
            "run_id": np.arange(290),
            "case": rng.choice(["a", "b"], 290),
            "mu2": rng.choice([1.0, 2.0, np.nan], 290),
            "seed": 0,
            "status": rng.choice(["ok", "diverged"], 290, p=[0.9, 0.1]),
        }
    )
    got = summaries.summarize(metrics, runs, eps=(0.01, 1e-3, 0.5), rel_eps=(0.1,))
    want = reference.summarize(metrics, runs, eps=(0.01, 1e-3, 0.5), rel_eps=(0.1,))
    assert got.equals(want) and len(got) > 200
    assert summaries.aggregate(got).equals(reference.aggregate(want))
    assert summaries.aggregate(got, by=["case"]).equals(reference.aggregate(want, by=["case"]))
    assert math.isinf(summaries.steps_to_reach(np.array([1.0, 2.0]), np.array([1.0, 1.0]), 0.5))


def test_a_chunks_inputs_are_its_runs_own_made_once_per_grid_point():
    import jax

    from calibjax.core import train

    sw = sweep.parse(tomllib.loads(MIXED), "mixed.toml", MIXED)
    ids = np.arange(5, 400, 7)
    got = sweep.chunk_dynamic(sw, ids)
    want = train.stack_dynamic([sweep.dynamic_of(sw.runs[int(i)]) for i in ids])
    same = jax.tree.map(
        lambda a, b: a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), got, want
    )
    assert all(jax.tree.leaves(same))
    assert len(set(got.seed.tolist())) == 3 and len(np.unique(got.lr)) == 2


def test_a_large_table_written_in_row_groups_reads_back_equal(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "run_id": np.arange(1000),
            "case": rng.choice(["a", "bb"], 1000),
            "x": rng.random(1000),
            "never": np.where(rng.random(1000) < 0.3, np.inf, 1.0),
            "ok": rng.random(1000) < 0.5,
            "n": rng.integers(0, 5, 1000),
        }
    )
    df.loc[:600, "x"] = np.nan  # a first row group without a single value
    files.write_parquet(tmp_path / "runs.parquet", df, rows_per_group=256)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "runs.parquet").num_row_groups == 4
    assert reader.read_table(tmp_path, "runs").equals(df)
    files.write_parquet(tmp_path / "metrics.parquet", df)  # one piece
    assert reader.read_table(tmp_path, "metrics").equals(df)
