"""Summaries, seed aggregation and plots, from hand-built tables (no training here)."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from calibjax.analysis import figures, plots, summaries


def test_steps_to_reach_interpolates_on_log_axes_and_keeps_never_apart_from_nan():
    steps, kl = np.array([10, 100, 1000.0]), np.array([1.0, 0.1, 0.001])
    assert summaries.steps_to_reach(steps, kl, 0.01) == pytest.approx(math.sqrt(100 * 1000))
    assert summaries.steps_to_reach(steps, kl, 2.0) == 10
    assert summaries.steps_to_reach(steps, kl, 1e-4) == math.inf
    assert math.isnan(summaries.steps_to_reach(steps, np.array([1.0, np.nan, 0.001]), 0.01))


def synthetic_results(root):
    """A 3 x 2 grid (mu2 x sigma1) x 2 seeds; kl falls as 1 / (mu2 * step), one run diverged."""
    runs, metrics, density, calib = [], [], [], []
    steps = [10, 100, 1000]
    run_id = 0
    for mu2 in (1.0, 2.0, 4.0):
        for sigma1 in (0.5, 1.0):
            for seed in (0, 1):
                diverged = run_id == 5
                runs.append(
                    {
                        "run_id": run_id,
                        "case": "default",
                        "seed": seed,
                        "mu1": 0.0,
                        "mu2": mu2,
                        "sigma1": sigma1,
                        "sigma2": 1.0,
                        "lr": 1e-3,
                        "group": 0,
                        "status": "diverged" if diverged else "ok",
                        "bayes_loss": 0.2,
                    }
                )
                for s in steps:
                    kl = np.nan if diverged and s == 1000 else 1.0 / (mu2 * s) * (1 if sigma1 == 0.5 else 1e3)
                    metrics.append(
                        {
                            "run_id": run_id,
                            "step": s,
                            "kl": kl,
                            "kl_rel": kl / 0.5,
                            "tv": kl,
                            "max_err": kl,
                            "accuracy": 0.9,
                            "bayes_accuracy": 0.91,
                            "loss": 0.3,
                            "err_dense": kl,
                            "err_sparse": 2 * kl,
                            "ece": 0.02,
                            "ece_mass": 0.02,
                            "brier": 0.1,
                            "nll": 0.3,
                            "true_ece": 0.01,
                            "excess_brier": kl,
                            "cal_term": kl / 2,
                            "grouping_term": kl / 2,
                        }
                    )
                    for lo, hi, mass in ((-np.inf, -2.0, 0.05), (-2.0, 0.0, 0.95)):
                        density.append(
                            {
                                "run_id": run_id,
                                "step": s,
                                "log10_density_lo": lo,
                                "log10_density_hi": hi,
                                "mass": mass,
                                "kl_mean": kl,
                                "kl_contribution": kl * mass,
                                "max_err": kl * (10 if lo < -2 else 1),
                            }
                        )
                    for lo in np.linspace(0, 1, 5, endpoint=False):
                        calib.append(
                            {
                                "run_id": run_id,
                                "step": s,
                                "conf_lo": lo,
                                "conf_hi": lo + 0.2,
                                "est_count": 10.0 if lo >= 0.4 else 0.0,
                                "est_conf": lo + 0.1,
                                "est_acc": lo + 0.05,
                                "true_mass": 0.3 if lo >= 0.4 else 0.0,
                                "true_conf": lo + 0.1,
                                "true_acc": lo + 0.1,
                            }
                        )
                run_id += 1
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("runs", runs), ("metrics", metrics), ("density", density), ("calibration", calib)):
        pd.DataFrame(rows).to_parquet(root / f"{name}.parquet", index=False)
    return pd.DataFrame(runs), pd.DataFrame(metrics)


def test_summary_per_run_against_hand_computed_values(tmp_path):
    runs, metrics = synthetic_results(tmp_path)
    s = summaries.summarize(metrics, runs, eps=(1e-2, 1e-6)).set_index("run_id")
    # run 0: mu2 = 1, sigma1 = 0.5: kl = 1/step, so kl <= 0.01 at exactly step 100.
    assert s.loc[0, "steps_to_kl_0.01"] == pytest.approx(100.0)
    assert s.loc[0, "steps_to_kl_1e-06"] == math.inf and not s.loc[0, "reached_kl_1e-06"]
    # run 2: mu2 = 1, sigma1 = 1: kl = 1000/step never reaches 0.01.
    assert s.loc[2, "steps_to_kl_0.01"] == math.inf and s.loc[2, "final_kl"] == pytest.approx(1.0)
    # run 5 diverged: nan, not "never".
    assert math.isnan(s.loc[5, "steps_to_kl_0.01"]) and not s.loc[5, "reached_kl_0.01"]
    assert math.isnan(s.loc[5, "final_kl"])
    # kl_auc: trapezoid of kl over log10 steps (1, 2, 3), divided by 2.
    assert s.loc[0, "kl_auc"] == pytest.approx(((0.1 + 0.01) / 2 + (0.01 + 0.001) / 2) / 2)
    assert s.loc[0, "final_accuracy_gap"] == pytest.approx(0.01)
    # kl_rel = 2 kl here: run 0 reaches kl_rel <= 0.1 where kl = 0.05, at step 20.
    assert s.loc[0, "steps_to_kl_rel_0.1"] == pytest.approx(20.0)
    assert s.loc[0, "sustained_kl_0.01"] == pytest.approx(100.0) and s.loc[2, "sustained_kl_0.01"] == math.inf


def test_sustained_crossing_and_final_median_ride_out_noise():
    steps = np.array([10, 100, 200, 900, 950, 1000.0])
    kl = np.array([1.0, 0.005, 0.02, 0.004, 0.03, 0.002])  # dips below 0.01 twice before it stays
    assert summaries.steps_to_reach(steps, kl, 0.01) == pytest.approx(10 * 10 ** (math.log(100) / math.log(200)))
    # stays below only from the last checkpoint: crossing between 950 (0.03) and 1000 (0.002)
    t = (math.log(0.01) - math.log(0.03)) / (math.log(0.002) - math.log(0.03))
    assert summaries.steps_to_stay(steps, kl, 0.01) == pytest.approx(950 * (1000 / 950) ** t)
    assert summaries.steps_to_stay(steps, kl, 0.001) == math.inf
    assert summaries.steps_to_stay(steps, kl, 2.0) == 10
    assert math.isnan(summaries.steps_to_stay(steps, np.array([1, np.nan, 0, 0, 0, 0.0]), 0.01))
    metrics = pd.DataFrame(
        {"run_id": 0, "step": steps, "kl": kl, "kl_rel": kl, "accuracy": 0.9, "bayes_accuracy": 0.92}
    )
    runs = pd.DataFrame({"run_id": [0], "case": "c", "status": "ok"})
    s = summaries.summarize(metrics, runs).iloc[0]
    # the last 10 % of training holds 900, 950 and 1000: their median, not the last value
    assert s["final_kl"] == pytest.approx(0.004) and s["n_final_checkpoints"] == 3
    assert s["final_accuracy_gap"] == pytest.approx(0.02)


def test_aggregation_over_seeds_keeps_never_infinite_and_counts():
    df = pd.DataFrame(
        {
            "run_id": range(8),
            "case": "c",
            "seed": [0, 1, 2, 3] * 2,
            "mu2": [1.0] * 4 + [2.0] * 4,
            "status": ["ok"] * 7 + ["diverged"],
            "steps_to_kl_0.01": [100, 200, np.inf, np.inf, 100, 200, 300, np.nan],
            "final_kl": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, np.nan],
        }
    )
    agg = summaries.aggregate(df).set_index("mu2")
    assert agg.loc[1.0, "steps_to_kl_0.01"] == math.inf and agg.loc[1.0, "n_never_steps_to_kl_0.01"] == 2
    assert agg.loc[1.0, "steps_to_kl_0.01_q25"] == pytest.approx(175.0)
    assert agg.loc[2.0, "steps_to_kl_0.01"] == 200 and agg.loc[2.0, "n_diverged"] == 1
    assert agg.loc[1.0, "final_kl"] == 2.5 and agg.loc[1.0, "final_kl_q75"] == pytest.approx(3.25)
    assert list(summaries.aggregate(df).columns[:4]) == ["case", "mu2", "n_runs", "n_diverged"]


def test_plots_are_drawn_from_tables_alone(tmp_path):
    runs, metrics = synthetic_results(tmp_path)
    summary = summaries.summarize(metrics, runs)
    agg = summaries.aggregate(summary)
    assert set(summaries.swept_columns(runs)) == {"mu2", "sigma1"}
    paths = [
        plots.heatmap(agg, "mu2", "sigma1", "steps_to_kl_0.01", tmp_path / "h.png"),
        plots.heatmap(agg, "mu2", "sigma1", "final_kl", tmp_path / "h2.png"),
        plots.density_map(pd.read_parquet(tmp_path / "density.parquet"), [0, 1], tmp_path / "d.png"),
        plots.reliability(pd.read_parquet(tmp_path / "calibration.parquet"), [0, 1], 1000, tmp_path / "r.png"),
        plots.summary_lines(agg, "mu2", "final_kl", tmp_path / "l.png", hue="sigma1"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.slow
def test_bad_plot_arguments_are_clear_errors(tmp_path):
    runs, metrics = synthetic_results(tmp_path)
    agg = summaries.aggregate(summaries.summarize(metrics, runs))
    with pytest.raises(plots.PlotError, match="--x bogus: no such column"):
        plots.heatmap(agg, "bogus", "sigma1", "final_kl", tmp_path / "x.png")
    with pytest.raises(plots.PlotError, match="--y lr: this setting was not swept"):
        plots.heatmap(agg, "mu2", "lr", "final_kl", tmp_path / "x.png", runs=runs)
    with pytest.raises(plots.PlotError, match="no run matches"):
        figures.select_runs(runs, {"mu2": "7"})

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cli = lambda *a: subprocess.run(
        [sys.executable, "-m", "calibjax", *map(str, a)], capture_output=True, text=True, env=env
    )
    r = cli("plot", tmp_path, "heatmap", "--x", "mu2", "--y", "seed2", "--value", "final_kl")
    assert r.returncode == 2 and "--y seed2: no such column" in r.stderr and "Traceback" not in r.stderr
    r = cli("plot", tmp_path, "heatmap", "--x", "mu2", "--y", "sigma1", "--value", "steps_to_kl_0.01")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "figures" / "heatmap_steps_to_kl_0.01_mu2_sigma1.png").exists()
    r = cli("plot", tmp_path, "density", "--where", "mu2=2", "--where", "sigma1=0.5")
    assert r.returncode == 0 and (tmp_path / "figures" / "density_mu2-2_sigma1-0.5.png").exists(), r.stderr
    r = cli("plot", tmp_path / "nowhere")
    assert r.returncode == 2 and "run or merge a sweep first" in r.stderr


def test_selections_name_what_they_pool_and_list_what_exists(tmp_path):
    runs, _ = synthetic_results(tmp_path)
    calib = pd.read_parquet(tmp_path / "calibration.parquet")
    assert figures.pooled_axes(runs, figures.select_runs(runs, {"mu2": "2"})) == "pooled over sigma1 (2 values), seeds"
    assert figures.pooled_axes(runs, figures.select_runs(runs, {"mu2": "2", "sigma1": "1"})) == "pooled over seeds"
    assert figures.pooled_axes(runs, [3]) == ""
    with pytest.raises(
        plots.PlotError, match="--step 1500: not a checkpoint of the selected runs; checkpoints: 10, 100, 1000"
    ):
        plots.reliability(calib, [0, 1], 1500, tmp_path / "r.png")
    agg3 = summaries.aggregate(
        summaries.summarize(
            pd.read_parquet(tmp_path / "metrics.parquet"), runs.assign(lr=np.where(runs["seed"] == 0, 1e-3, 2e-3))
        )
    )
    assert plots.pooled_settings(agg3, "mu2", "sigma1", None) == "lr (2 values)"  # named in the title
    assert plots.pooled_settings(agg3, "mu2", "sigma1", "lr") == ""
    # The study's layout: mu2 set per case, no grid axis at all (the message used to say "not swept").
    cases = runs.assign(case=np.where(runs["mu2"] == 1.0, "example2", "example1"), sigma1=1.0)
    cases = cases[cases["mu2"] < 4]
    agg = summaries.aggregate(summaries.summarize(pd.read_parquet(tmp_path / "metrics.parquet"), cases))
    with pytest.raises(
        plots.PlotError,
        match="--x mu2: set per case .example2 1, example1 2., not a grid axis; "
        "a heatmap needs two grid axes; this sweep has no grid axes",
    ):
        plots.heatmap(agg, "mu2", "sigma1", "final_kl", tmp_path / "x.png", runs=cases)


def test_settings_named_like_summaries_stay_settings(tmp_path):
    """final_lr_ratio (a setting) must not be aggregated as a summary, and is a grid axis when swept."""
    runs, metrics = synthetic_results(tmp_path)
    runs["final_lr_ratio"] = np.where(runs["run_id"] % 4 < 2, 0.0, 0.1)
    summary = summaries.summarize(metrics, runs)
    assert "final_lr_ratio" not in summaries.value_columns(summary)
    assert "final_lr_ratio" in summaries.swept_columns(runs)
    agg = summaries.aggregate(summary)
    assert "final_lr_ratio_q25" not in agg.columns and set(agg["final_lr_ratio"]) == {0.0, 0.1}


def test_finals_after_temperature_scaling_and_the_loss_figure(tmp_path):
    """With a recalibrated table, summaries gain final_<m>_ts (medians over the final window, as
    final_<m>); the loss figure draws one row per loss variant and one panel per task."""
    runs, metrics = synthetic_results(tmp_path)
    runs = runs.assign(case=np.where(runs["run_id"] % 4 < 2, "cross_entropy", "focal_2"))
    metrics = metrics.assign(kl_optimum=np.where(metrics["run_id"] % 4 < 2, 0.0, 0.09))
    rec = metrics[["run_id", "step"]].assign(
        temperature=0.5, kl=metrics["kl"] / 10, err_sparse=0.1, true_ece=0.01, cal_term=1e-4, grouping_term=1e-3
    )
    summary = summaries.summarize(metrics, runs, recalibrated=rec).set_index("run_id")
    np.testing.assert_allclose(summary["final_kl_ts"], summary["final_kl"] / 10)
    assert (summary.loc[summary["status"] == "ok", "final_temperature_ts"] == 0.5).all()
    assert "final_kl_ts" not in summaries.summarize(metrics, runs)
    # the finals after scaling, and of the split of kl, are summaries over seeds, not grid axes
    with_split = metrics.assign(kl_cal=metrics["kl"] / 2, kl_group=metrics["kl"] / 2)
    rec = rec.assign(kl_cal=rec["kl"], kl_group=0.0)
    full = summaries.summarize(with_split, runs, recalibrated=rec)
    assert {"final_kl_cal", "final_kl_group", "final_kl_cal_ts", "final_kl_ts"} <= set(summaries.value_columns(full))
    settings = len(summaries.aggregate(summaries.summarize(metrics, runs)))
    agg = summaries.aggregate(full)
    assert len(agg) == settings and "final_kl_cal_q25" in agg and "final_kl_cal_ts_q75" in agg
    path = plots.loss_comparison(summary.reset_index(), tmp_path / "losses.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_standard_heatmaps_never_pool_cases_or_a_named_third_axis(tmp_path):
    """Two numeric axes (mu2 x sigma1), a named third (activation) and two cases: the maps put
    activation side by side, one file per case; with the cases alone, one file with a panel each."""
    runs, metrics = synthetic_results(tmp_path)
    runs = runs.assign(
        case=np.where(runs["seed"] == 0, "a", "b"), dim=1, activation=np.where(runs["run_id"] % 4 < 2, "relu", "tanh")
    )
    runs.to_parquet(tmp_path / "runs.parquet", index=False)
    summaries.write_summaries(tmp_path)
    names = {p.name for p in figures.standard_figures(tmp_path)}
    assert {"heatmap_final_kl_rel_a.png", "heatmap_final_kl_rel_b.png"} <= names  # mu2 is a task entry: kl_rel
    assert "heatmap_final_kl_rel.png" not in names
    two = tmp_path / "two"
    runs, metrics = synthetic_results(two)
    runs.assign(case=np.where(runs["seed"] == 0, "a", "b"), dim=1).to_parquet(two / "runs.parquet", index=False)
    summaries.write_summaries(two)
    names = {p.name for p in figures.standard_figures(two)}
    assert "heatmap_final_kl_rel.png" in names and not any(n.startswith("heatmap_final_kl_rel_") for n in names)


def test_each_planned_figure_is_drawn_to_its_own_path(tmp_path):
    """default_set says what standard_figures draws: one distinct file per figure, each drawn where
    it was planned (a drawing bound to the wrong path would overwrite another figure)."""
    runs, metrics = synthetic_results(tmp_path)
    runs.assign(case=np.where(runs["seed"] == 0, "a", "b"), dim=1).to_parquet(tmp_path / "runs.parquet", index=False)
    summaries.write_summaries(tmp_path)
    planned = [p.path for p in figures.default_set(tmp_path)]
    assert len(set(planned)) == len(planned)
    assert figures.standard_figures(tmp_path) == planned
    assert all(p.exists() for p in planned)


def test_where_picks_the_nearest_existing_value_and_lists_them_when_none_is_near():
    runs = pd.DataFrame(
        {
            "run_id": range(6),
            "case": ["a", "b"] * 3,
            "mu2": [0.5, 1.4375, 2.375] * 2,
            "n_data": [100.0, math.inf, 1000.0] * 2,
        }
    )
    assert list(figures.select_runs(runs, {"mu2": "1.4"})) == [1, 4]  # a tick label of 1.4375
    assert list(figures.select_runs(runs, {"mu2": "2.4"})) == [2, 5]
    assert list(figures.select_runs(runs, {"mu2": "1.9"})) == [1, 4]  # nearer 1.4375, within half the gap
    assert list(figures.select_runs(runs, {"n_data": "inf"})) == [1, 4]
    with pytest.raises(plots.PlotError, match=r"mu2=3.0: no run matches; mu2 takes 0.5, 1.4375, 2.375$"):
        figures.select_runs(runs, {"mu2": "3.0"})
    with pytest.raises(plots.PlotError, match=r"case=c: no run matches; case takes a, b$"):
        figures.select_runs(runs, {"case": "c"})
    with pytest.raises(plots.PlotError, match="expected a number; n_data takes 100, 1000, inf"):
        figures.select_runs(runs, {"n_data": "online"})
    with pytest.raises(plots.PlotError, match="no run matches all of these together"):
        figures.select_runs(runs, {"mu2": "0.5", "n_data": "inf"})
