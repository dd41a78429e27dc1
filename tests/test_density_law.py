"""The density law: per-bin learning times and the fitted exponent k (steps ∝ p^-k), on density
tables made with a known exponent."""

import math

import numpy as np
import pandas as pd
import pytest

from calibjax.analysis import density_law, summaries

EDGES = [-math.inf, -6.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, math.inf]
STEPS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]
MIDDLES = np.array([(a + b) / 2 for a, b in zip(EDGES[1:-2], EDGES[2:-1], strict=True)])  # finite bins


def density_table(k: dict, seeds: int, noise: float = 0.0, scale: float = 2e3, seed: int = 0) -> tuple:
    """Density and runs tables of one case per (case -> exponent): a bin's error falls as a power of
    steps and crosses eps = 0.01 (kl_mean) or 0.1 (max_err) at scale * p^-k * exp(noise * N(0, 1))."""
    rng = np.random.default_rng(seed)
    rows, runs = [], []
    for case, exponent in k.items():
        for s in range(seeds):
            run_id = len(runs)
            runs.append({"run_id": run_id, "case": case, "seed": s})
            for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
                mid = (lo + hi) / 2 if math.isfinite(lo + hi) else 0.0
                cross = scale * 10 ** (-exponent * mid) * math.exp(noise * rng.normal())
                for t in STEPS:
                    rows.append(
                        {
                            "run_id": run_id,
                            "step": t,
                            "log10_density_lo": lo,
                            "log10_density_hi": hi,
                            "kl_mean": 0.01 * (cross / t),  # = 0.01 at t = cross, falling as 1 / t
                            "max_err": 0.1 * (cross / t) ** 0.5,
                        }
                    )
    return pd.DataFrame(rows), pd.DataFrame(runs)


def law(k: dict, seeds: int = 5, **kw) -> pd.DataFrame:
    density, runs = density_table(k, seeds, **kw)
    return density_law.fit_law(density_law.bin_times(density), runs)


def test_the_crossing_steps_per_bin_are_the_summaries_steps_to():
    density, _ = density_table({"a": 1.0}, seeds=2, noise=0.5)
    times = density_law.bin_times(density)
    assert len(times) == 2 * 8 * 4  # runs x finite bins x (2 metrics x 2 thresholds)
    row = times[(times["metric"] == "kl_mean") & (times["eps"] == 0.001)].iloc[3]
    one = density[(density["run_id"] == row["run_id"]) & (density["log10_density_lo"] == row["log10_density_lo"])]
    values = one.sort_values("step")["kl_mean"].to_numpy()
    assert row["steps_to"] == summaries.steps_to_reach(STEPS, values, 0.001)
    assert row["sustained"] == summaries.steps_to_stay(STEPS, values, 0.001)
    assert row["log10_density"] == (row["log10_density_lo"] + row["log10_density_hi"]) / 2
    assert row["at_first"] == (values[0] <= 0.001)


@pytest.mark.parametrize("k,scale", [(1.0, 2e3), (0.5, 2e3), (1.7, 20.0)])
def test_a_known_exponent_is_recovered_exactly_without_noise(k, scale):
    got = law({"a": k}, scale=scale).set_index(["metric", "eps", "kind"])
    kl = got.loc[("kl_mean", 0.01, "steps_to")]
    # crossings inside the checkpoints: bins whose step lies in (10, 50000)
    inside = [m for m in MIDDLES if 10 < scale * 10 ** (-k * m) < 50000]
    assert kl["n_bins"] == len(inside) >= 3 and kl["bins"] == " ".join(f"{m:g}" for m in inside)
    assert kl["k"] == pytest.approx(k, abs=1e-9) and kl["r2"] == pytest.approx(1.0, abs=1e-12)
    assert kl["k_lo"] == pytest.approx(k, abs=1e-9) and kl["k_hi"] == pytest.approx(k, abs=1e-9)
    # max_err, falling as 1/sqrt(t), crosses 0.1 where kl_mean crosses 0.01 (and stays): the same k
    assert got.loc[("max_err", 0.1, "sustained"), "k"] == pytest.approx(k, abs=1e-9)


def test_bins_never_reached_or_already_reached_are_left_out_and_few_bins_give_nan():
    got = law({"a": 1.0}, scale=2e6).set_index(["metric", "eps", "kind"])  # most bins never reach 0.001
    few = got.loc[("kl_mean", 0.001, "steps_to")]
    assert few["n_bins"] < density_law.MIN_BINS and math.isnan(few["k"]) and math.isnan(few["k_lo"])
    early = law({"a": 1.0}, scale=1e-6).set_index(["metric", "eps", "kind"])  # every bin already there
    assert early.loc[("kl_mean", 0.01, "steps_to"), "n_bins"] == 0


def test_the_interval_covers_the_exponent_at_about_its_level():
    """40 noisy data sets (per run and bin, the crossing step off by a factor e^N(0, 0.4)), 8 seeds:
    the 90 % interval holds the true k in most, and the estimates centre on it."""
    ks, covered = [], 0
    for seed in range(40):
        row = law({"a": 1.0}, seeds=8, noise=0.4, scale=200.0, seed=seed).set_index(["metric", "eps", "kind"])
        row = row.loc[("kl_mean", 0.01, "steps_to")]
        ks.append(row["k"])
        covered += row["k_lo"] <= 1.0 <= row["k_hi"]
        assert row["k_lo"] < row["k"] < row["k_hi"]
    assert abs(np.mean(ks) - 1.0) < 0.03
    assert 0.75 <= covered / 40 <= 1.0


def test_each_grid_point_gets_its_own_fit():
    got = law({"a": 1.0, "b": 0.5})
    kl = got[(got["metric"] == "kl_mean") & (got["eps"] == 0.01) & (got["kind"] == "steps_to")].set_index("case")
    assert kl.loc["a", "k"] == pytest.approx(1.0) and kl.loc["b", "k"] == pytest.approx(0.5)
    assert set(kl["n_runs"]) == {5}


def test_summarize_writes_the_tables_and_the_figure_of_a_sweep_with_density_bins(tmp_path, monkeypatch):
    from pathlib import Path

    import jax

    from calibjax import sweep as sweep_mod
    from calibjax.analysis import figures
    from calibjax.execution import planning, synthetic
    from calibjax.storage import results

    out = tmp_path / "blog"
    sw = sweep_mod.load(Path(__file__).resolve().parents[1] / "sweeps" / "blog.toml")
    layout = planning.default_layout(devices=jax.devices()[:2])
    synthetic.new_results(sw, out, layout)
    synthetic.write_chunks(sw, out, layout, diverged=0.0)
    results.finalize(out, sweep_mod.runs_table(sw), layout.identity)
    summaries.write_summaries(out)
    times, law = pd.read_parquet(out / "density_times.parquet"), pd.read_parquet(out / "density_law.parquet")
    finite = pd.read_parquet(out / "density.parquet").query("log10_density_lo > -inf and log10_density_hi < inf")
    assert len(times) == 24 * finite["log10_density_lo"].nunique() * 4
    assert len(law) == 3 * 4 * 2 and list(law["case"]) == [f"example{i}" for i in (1, 2, 3) for _ in range(8)]
    families = [(m, e) for m, eps in density_law.THRESHOLDS.items() for e in eps for _ in density_law.KINDS]
    assert list(zip(law["metric"], law["eps"], strict=True)) == families * 3  # point by point, as THRESHOLDS
    assert set(law["n_runs"]) == {8}
    assert "density_law.png" in {p.name for p in figures.standard_figures(out)}
    monkeypatch.setattr(density_law, "MAX_RUNS", 10)  # a sweep too large for it: the tables go
    summaries.write_summaries(out)
    assert not (out / "density_law.parquet").exists() and not (out / "density_times.parquet").exists()


def test_the_median_over_seeds_is_numpys_nanmedian_with_never_kept():
    v = np.random.default_rng(0).random((50, 7, 8)) * 1e4
    v[v < 2e3] = np.nan
    v[v > 9e3] = np.inf
    v[3, :, 2] = np.nan  # a bin with no value in any run
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # (numpy warns of the all-NaN one)
        m = np.nanmedian(np.where(np.isinf(v), 1e300, v), axis=-2)
    want = np.where(m < 1e299, density_law._log10(m), np.nan)
    assert np.array_equal(density_law._median_log_steps(v), want, equal_nan=True)
    assert np.isnan(want).any() and np.isfinite(want).any()


LAW_DIGEST = """
import hashlib, sys
sys.path.insert(0, "tests")
from test_density_law import density_table
from calibjax.analysis import density_law
density, runs = density_table({"a": 1.0, "b": 0.6}, seeds=7, noise=0.5, scale=300.0, seed=3)
law = density_law.fit_law(density_law.bin_times(density), runs)
print(hashlib.sha256(law.to_csv(float_format="%.17g").encode()).hexdigest())
"""


@pytest.mark.parametrize("isa", ["avx2", "sse4.2"])
def test_the_fits_bits_do_not_depend_on_numpys_cpu_dispatch(isa):
    """Summaries may be written on any CPU (a cluster's merge job): k, its interval and R² must have
    the same bits under numpy's AVX-512, AVX2 and baseline code (sums in order, portable logs)."""
    from conftest import lowered_isa_env, python_in

    native, lowered = python_in(LAW_DIGEST), python_in(LAW_DIGEST, env=lowered_isa_env(isa))
    assert native.returncode == lowered.returncode == 0, native.stderr + lowered.stderr
    assert native.stdout == lowered.stdout
