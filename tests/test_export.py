"""Results as labelled arrays: ``Results.to_xarray`` and ``calibjax export`` (netCDF, zarr), each
round trip checked against the parquet tables."""

import shutil

import jax
import numpy as np
import pandas as pd
import pytest

import calibjax
from calibjax import sweep as sweep_mod
from calibjax.execution import planning, synthetic
from calibjax.storage import arrays, files, owned, reader, results, tables

from conftest import cli, sweep_text

xr = pytest.importorskip("xarray")

GRID = sweep_text(
    seeds=3,
    eval={"curves": True, "curve_points": 5},
    cases={"a": {}, "b": {"sigma1": 2.0}},
    grid={"mu2": [1.0, 2.0, 3.0], "hidden": [[8], [4, 4]]},
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 cases x 3 mu2 x 2 hidden x 3 seeds sweep with synthetic results (no training), one
    chunk left out so that some runs are missing."""
    out = tmp_path_factory.mktemp("export") / "grid"
    path = out.parent / "grid.toml"
    path.write_text(GRID)
    sw = sweep_mod.load(path)
    layout = planning.default_layout(chunk_size=4, devices=jax.devices()[:2])
    synthetic.new_results(sw, out, layout)
    synthetic.write_chunks(sw, out, layout)
    shutil.rmtree(sorted((out / "chunks").iterdir())[-1])  # its runs: missing
    missing = results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
    assert missing
    return out


def rows_of(ds, table: str) -> pd.DataFrame:
    """A Dataset back to the table's rows: (run_id, keys, values), the rows no run filled dropped."""
    keys = [k for k in tables.TABLES[table].keys if k != "run_id"]
    values = [v for v in ds.data_vars if v not in arrays.OUTCOMES]
    df = ds[values].reset_coords()[["run_id", *values]].to_dataframe().reset_index()
    df = df.dropna(subset=values, how="all").dropna(subset=["run_id"])
    return df.astype({"run_id": np.int64}).sort_values(["run_id", *keys]).reset_index(drop=True)


def same_rows(ds, out, table: str) -> None:
    want = reader.read_table(out, table)
    got = rows_of(ds, table)[list(want.columns)].astype(want.dtypes.to_dict())
    assert got.equals(want), table


@pytest.mark.parametrize("table", ["metrics", "density", "calibration", "curves"])
def test_a_table_is_an_array_over_the_grid_seed_and_its_keys(grid, table):
    ds = calibjax.load(grid).to_xarray(table)
    keys = [k for k in tables.TABLES[table].keys if k != "run_id"]
    assert list(ds.sizes)[:5] == ["case", "mu2", "hidden", "seed", "step"] and list(ds.sizes)[4:] == keys
    assert dict(ds.sizes)["case"] == 2 and dict(ds.sizes)["mu2"] == 3 and dict(ds.sizes)["seed"] == 3
    assert list(ds["hidden"].values) == ["4-4", "8"] and list(ds["case"].values) == ["a", "b"]
    same_rows(ds, grid, table)  # every row, bit for bit, and nothing else
    # settings as coordinates (sigma1 differs by case), outcomes as variables, constants as attributes
    runs = reader.read_table(grid, "runs")
    assert ds["sigma1"].dims == ("case", "mu2", "hidden", "seed") and set(np.unique(ds["sigma1"])) == {1.0, 2.0}
    assert ds.attrs["lr"] == runs["lr"].iloc[0] and ds.attrs["table"] == table and "sweep_text" in ds.attrs
    status = ds["status"].to_series().dropna()
    assert (status == "missing").sum() == (runs["status"] == "missing").sum() > 0
    one = runs[runs.status == "ok"].iloc[0]
    at = ds.sel(case=one["case"], mu2=one["mu2"], hidden=one["hidden"], seed=one["seed"])
    assert int(at["run_id"]) == one["run_id"] and str(at["run_hash"].values) == one["run_hash"]


@pytest.mark.parametrize("fmt", ["netcdf", "zarr"])
def test_export_round_trips_to_the_parquet_tables(grid, tmp_path, fmt):
    out = tmp_path / "grid"
    shutil.copytree(grid, out)
    r = cli("export", out, "--format", fmt)
    assert r.returncode == 0, r.stderr
    written = [out / "export" / f"{name}{arrays.FORMATS[fmt]}" for name in arrays.ARRAY_TABLES[:4]]
    assert r.stdout.split() == [str(p) for p in written]
    for path, table in zip(written, arrays.ARRAY_TABLES, strict=False):
        ds = xr.open_dataset(path, engine="h5netcdf") if fmt == "netcdf" else xr.open_zarr(path, consolidated=False)
        same_rows(ds.load(), out, table)
    assert set(owned.recorded(out / "export", owned.EXPORT_RECORD)) == {p.name for p in written}
    # --overwrite's removal takes exactly the exports calibjax recorded, never a file of yours
    (out / "export" / "notes.txt").write_text("mine")
    owned.remove_results(out)
    assert [p.name for p in (out / "export").iterdir()] == ["notes.txt"]


def test_export_refuses_what_it_did_not_write_and_a_table_that_is_not_there(grid, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(grid, out)
    (out / "export").mkdir()
    (out / "export" / "metrics.nc").write_text("a file of yours")
    r = cli("export", out, "--format", "netcdf", "--table", "metrics")
    assert r.returncode == 2 and "metrics.nc: exists and calibjax did not write it" in r.stderr
    assert (out / "export" / "metrics.nc").read_text() == "a file of yours"
    r = cli("export", out, "--format", "netcdf", "--table", "estimators", "--output", tmp_path / "elsewhere")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no estimators.parquet here" in lines[0], r.stderr


# ---------------------------------------------------------------- TensorBoard


def tensorboard_runs(logdir) -> dict:
    """What TensorBoard's own reader finds under logdir: run folder -> (scalars by tag, hparams)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    found = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(events.parent), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        try:
            data = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        except KeyError:  # (no HParams data in this run)
            data = {}
        parse = {
            metadata.EXPERIMENT_TAG: metadata.parse_experiment_plugin_data,
            metadata.SESSION_START_INFO_TAG: metadata.parse_session_start_info_plugin_data,
        }
        plugin = {tag: parse[tag](content) for tag, content in data.items()}
        found[events.parent] = (scalars, plugin)
    return found


def hparam_values(info) -> dict:
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def test_tensorboard_export_is_read_back_by_tensorboard_one_run_per_run(grid, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import metadata

    logdir = tmp_path / "tb"
    r = cli("export", grid, "--tensorboard", logdir)
    assert r.returncode == 0, r.stderr
    runs, metrics = reader.read_table(grid, "runs"), reader.read_table(grid, "metrics")
    found = tensorboard_runs(logdir)
    base = logdir / "tiny"
    experiment = found.pop(base)[1][metadata.EXPERIMENT_TAG]
    values = [c for c in metrics.columns if c not in ("run_id", "step")]
    assert sorted(m.name.tag for m in experiment.metric_infos) == sorted(f"metrics/{c}" for c in values)
    assert {"case", "mu2", "hidden", "seed", "sigma1"} <= {h.name for h in experiment.hparam_infos}
    finished = metrics["run_id"].unique()
    assert len(found) == len(finished) < len(runs)  # a missing run has no metrics, so no TensorBoard run
    where = arrays.run_index(files.read_manifest(grid), runs).set_index("run_id")
    for run_id in finished:
        w = where.loc[run_id]
        name = f"{w['case']},mu2={w['mu2']:g},hidden={w['hidden']},seed={w['seed']}"
        scalars, plugin = found[base / name]
        mine = metrics[metrics.run_id == run_id].sort_values("step")
        for column in ("kl", "true_ece", "max_err"):
            got = scalars[f"metrics/{column}"]
            assert [s for s, _ in got] == mine["step"].tolist()
            np.testing.assert_array_equal([v for _, v in got], mine[column].to_numpy(np.float32))
        hp = hparam_values(plugin[metadata.SESSION_START_INFO_TAG])
        row = runs[runs.run_id == run_id].iloc[0]
        assert hp["case"] == row["case"] and hp["hidden"] == row["hidden"] and hp["sigma1"] == row["sigma1"]
        assert hp["mu2"] == row["mu2"] and hp["seed"] == row["seed"]


def test_tensorboard_export_by_setting_holds_the_median_over_seeds_and_replaces_only_its_own(grid, tmp_path):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    assert cli("export", grid, "--tensorboard", logdir).returncode == 0
    mine = logdir / "tiny" / "mine.txt"
    mine.write_text("a user's note")
    r = cli("export", grid, "--tensorboard", logdir, "--by", "setting")
    assert r.returncode == 0, r.stderr
    found = tensorboard_runs(logdir)
    found.pop(logdir / "tiny")
    runs, metrics = reader.read_table(grid, "runs"), reader.read_table(grid, "metrics")
    assert len(found) == 12 and mine.read_text() == "a user's note"  # 2 cases x 3 mu2 x 2 hidden; per-run runs gone
    rows = metrics.merge(runs[["run_id", "case", "mu2", "hidden"]], on="run_id")
    median = rows.groupby(["case", "mu2", "hidden", "step"])["kl"].median()
    for (case, mu2, hidden), part in median.groupby(level=[0, 1, 2]):
        scalars, _ = found[logdir / "tiny" / f"{case},mu2={mu2:g},hidden={hidden}"]
        np.testing.assert_array_equal([v for _, v in scalars["metrics/kl"]], part.to_numpy(np.float32))
    # A folder of a run's name that calibjax did not write is refused, and nothing is replaced.
    foreign = logdir / "other"
    (foreign / "tiny" / "a,mu2=1,hidden=8").mkdir(parents=True)
    r = cli("export", grid, "--tensorboard", foreign, "--by", "setting")
    assert r.returncode == 2 and "calibjax did not write it" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list((foreign / "tiny").iterdir()) == [foreign / "tiny" / "a,mu2=1,hidden=8"]


@pytest.mark.parametrize(
    "args,said",
    [
        (["--format", "netcdf", "--by", "run"], "--by with --tensorboard"),
        (["--tensorboard", "{tmp}", "--table", "density"], "--table and --output go with --format"),
        (["--format", "netcdf", "--tensorboard", "{tmp}"], "not allowed with argument"),
    ],
)
def test_export_options_of_the_other_kind_are_one_line_errors(grid, tmp_path, args, said):
    r = cli("export", grid, *[a.format(tmp=tmp_path / "tb") for a in args])
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "tb").exists()
