"""Calibration estimators against published reference implementations, known answers and the exact
truth; the benchmark table against an independent pandas computation."""

import math
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import integrate

from calibjax import pipeline, sweep
from calibjax.analysis import summaries
from calibjax.core import estimators, metrics, tasks
from calibjax.execution import engine, planning
from calibjax.storage import reader
from calibjax.storage import tables as tables_mod

from conftest import example, sweep_doc, to_toml

calibration = pytest.importorskip("calibration")  # Kumar et al.'s package (uncertainty-calibration)
relplot = pytest.importorskip("relplot")  # Blasiok & Nakkiran's package


def _estimate(log_q, y, bins=15, replicates=0, key=0):
    fn = jax.jit(estimators.sample_estimates, static_argnums=(2, 3))
    value, lo, hi = fn(
        jnp.asarray(log_q, jnp.float32), jnp.asarray(y, jnp.int32), bins, replicates, jax.random.key(key)
    )
    return {e: (float(value[i]), float(lo[i]), float(hi[i])) for i, e in enumerate(estimators.ESTIMATORS)}


def _wavy(f):
    """A miscalibration curve that crosses the diagonal twice: P(correct | conf = f)."""
    return np.clip(f + 0.08 * np.sin(4 * np.pi * (f - 0.5)), 0.0, 1.0)


def _binary_sample(n, curve, seed):
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.5, 1.0, n).astype(np.float32)
    correct = (rng.uniform(size=n) < curve(f)).astype(np.int32)
    # As a two-class problem: q = (1 - f, f); the prediction (class 1) is right when y = 1.
    return f, correct, np.log(np.stack([1 - f, f], axis=1))


def _sweep_reference(fx, y):
    """ECE_sweep as published (Roelofs et al.'s em_monotonic_sweep and _calc_ece_postbin), in float64
    loops: bins floor(i / n * b) of the sorted sample for b = 2, 3, ... until one is not monotone."""
    order = np.argsort(fx, kind="stable")
    fx, y = np.asarray(fx, np.float64)[order], np.asarray(y, np.float64)[order]
    n = len(fx)

    def ece(b):
        bins = np.minimum(b - 1, np.floor(np.arange(n) / n * b)).astype(int)
        total, monotone, last = 0.0, True, -1.0
        for i in range(b):
            cur = bins == i
            if cur.any():
                monotone &= y[cur].mean() >= last
                last = y[cur].mean()
                total += cur.sum() * abs(y[cur].mean() - fx[cur].mean())
        return total / n, monotone

    previous = ece(1)[0]
    for b in range(2, n):
        value, monotone = ece(b)
        if not monotone:
            return previous, b - 1
        previous = value
    return previous, n - 1


@pytest.mark.parametrize("n", [1500, 15000])
def test_estimators_match_the_published_reference_implementations(n):
    f, correct, log_q = _binary_sample(n, _wavy, seed=n)
    got = _estimate(log_q, correct)
    probs = np.exp(log_q.astype(np.float64))
    # Kumar, Liang & Ma's package: equal-width and equal-mass ECE, and the debiased L2 estimator.
    np.testing.assert_allclose(got["ece_width"][0], calibration.get_ece(probs, correct), rtol=2e-5)
    np.testing.assert_allclose(got["ece_mass"][0], calibration.get_ece_em(probs, correct), rtol=2e-5)
    np.testing.assert_allclose(
        got["ece_l2_debiased"][0], calibration.get_top_calibration_error(probs, correct, p=2, debias=True), rtol=2e-5
    )
    # Roelofs et al.'s sweep, value and the bin count it stops at.
    want, bins = _sweep_reference(f, correct)
    np.testing.assert_allclose(got["ece_sweep"][0], want, rtol=2e-5)
    order = np.argsort(f, kind="stable")
    _, b = estimators.ece_sweep(jnp.asarray(f[order]), jnp.asarray(correct[order], jnp.float32))
    assert int(b) == bins
    # relplot's smooth ECE (its grid and kernel discretisation differ from ours: agree to 1 %).
    np.testing.assert_allclose(
        got["smece"][0], relplot.smECE(f.astype(np.float64), correct.astype(np.float64)), rtol=0.01
    )


@pytest.mark.parametrize("edge", [0.0, 1.0, 1e-4, 1.0 - 1e-4])
@pytest.mark.parametrize("miscalibrated", ["inside", "at the edge"])
def test_smooth_ece_counts_scores_at_0_and_1_in_full(edge, miscalibrated):
    """Two points of mass 1/2, one at (or within a grid cell of) 0 or 1 and one at 0.5; one of them
    has residual 0.2, the other none. Smoothing a residual of one sign keeps its integral, and the
    reflected kernel keeps all mass in [0, 1], so smECE_sigma = 0.5 x 0.2 / 1 = 0.1 for every sigma
    and the smooth ECE is exactly 0.1. (Counting the edge point at half weight, as relplot does and
    calibjax did before 0.11.0, gives 0.1 / 0.75 = 0.133 or 0.05 / 0.75 = 0.067.)"""
    residual = [0.2, 0.0] if miscalibrated == "inside" else [0.0, 0.2]
    value, sigma = estimators.smooth_ece(
        jnp.array([0.5, edge], jnp.float32), jnp.array(residual, jnp.float32), jnp.array([0.5, 0.5], jnp.float32)
    )
    np.testing.assert_allclose(float(value), 0.1, rtol=1e-4)
    np.testing.assert_allclose(float(sigma), 0.1, rtol=1e-4)


@pytest.mark.parametrize("example_n,power", [(3, 2.0)])
def test_the_smooth_ece_target_stays_below_the_mean_absolute_residual(example_n, power):
    """Smoothing cannot increase the integral of |residual|: the population smooth ECE is at most
    E |P_top - conf| for any bandwidth. The audit's case (example 3, q = softmax(2 log P), confident
    scores near 1) broke it before 0.11.0 (0.0895 against the bound 0.0796)."""
    spec = metrics.EvalSpec()
    ev = metrics.make_eval_set(example(example_n), spec)
    log_q = jax.nn.log_softmax(power * ev.log_post, axis=-1)
    _, got = _targets(ev, log_q, spec)
    conf, pred = metrics.top_label(log_q)
    p_top = jnp.take_along_axis(jnp.exp(ev.log_post), pred[:, None], axis=-1)[:, 0]
    bound = float(jnp.sum(ev.weight * jnp.abs(p_top - conf)))
    assert 0.005 < got["true_smece"] <= bound * (1 + 1e-4), (got["true_smece"], bound)


def test_classwise_ece_matches_the_reference_marginal_ece_for_three_classes():
    rng = np.random.default_rng(3)
    n = 6000
    logits = rng.normal(size=(n, 3)) * 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    true = np.exp(1.5 * logits) / np.exp(1.5 * logits).sum(1, keepdims=True)  # the model is underconfident
    y = np.array([rng.choice(3, p=p) for p in true])
    got = _estimate(np.log(probs), y)["ece_classwise"][0]
    # Kumar et al.'s marginal (class-wise) L1 error with 15 equal-width bins is the class-wise ECE.
    want = calibration.utils._get_ce(
        probs, y, p=1, debias=False, num_bins=15, binning_scheme=calibration.utils.get_equal_prob_bins, mode="marginal"
    )
    np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.slow
def test_calibrated_scores_give_estimates_near_zero_and_a_known_curve_gives_its_value():
    n = 200_000
    _, correct, log_q = _binary_sample(n, lambda f: f, seed=1)
    calibrated = _estimate(log_q, correct)
    assert calibrated["ece_l2_debiased"][0] < 3e-3  # debiased: about 0 (clipped at 0)
    for e in ("ece_width", "ece_mass", "ece_sweep", "smece", "ece_classwise"):
        assert calibrated[e][0] < 0.01, (e, calibrated[e])
    # The wavy curve: true ECE = E|g(f) - f| and L2 = sqrt(E (g(f) - f)^2) with f ~ U(0.5, 1).
    _, correct, log_q = _binary_sample(n, _wavy, seed=2)
    wavy = _estimate(log_q, correct)
    l1 = 2 * integrate.quad(lambda f: abs(_wavy(f) - f), 0.5, 1.0, limit=200)[0]
    l2 = math.sqrt(2 * integrate.quad(lambda f: (_wavy(f) - f) ** 2, 0.5, 1.0, limit=200)[0])
    for e in ("ece_width", "ece_mass", "ece_sweep"):
        np.testing.assert_allclose(wavy[e][0], l1, rtol=0.05, err_msg=e)
    np.testing.assert_allclose(wavy["ece_l2_debiased"][0], l2, rtol=0.05)
    # The smooth ECE's population value on the same curve (its own definition, by quadrature): the
    # estimate from 200,000 examples converges to it, and it lies below the ECE (smoothing averages).
    grid = np.linspace(0.5, 1.0, 200_001, dtype=np.float32)
    population, _ = estimators.smooth_ece(
        jnp.asarray(grid), jnp.asarray(_wavy(grid) - grid), jnp.full(grid.shape, 1.0 / grid.size, jnp.float32)
    )
    np.testing.assert_allclose(wavy["smece"][0], float(population), rtol=0.05)
    assert float(population) < l1


@pytest.mark.slow
def test_bootstrap_intervals_cover_a_known_value_at_their_nominal_rate():
    """conf = f, P(correct | f) = f - 0.15: every bin's accuracy is below its confidence (by 4 standard
    errors), so the ECE of any binning is exactly 0.15 and the estimate is a plain mean. Over 400
    independent samples of 2000, the 90 % intervals of ece_width and ece_mass hold 0.15 about 90 % of
    the time; intervals narrow like 1/sqrt(n). (Where bins straddle the diagonal the binned ECE is
    biased upwards and its intervals undercover: that is what the benchmark measures.)"""
    n, samples = 2000, 400
    rng = np.random.default_rng(4)
    f = rng.uniform(0.6, 1.0, (samples, n)).astype(np.float32)
    correct = (rng.uniform(size=(samples, n)) < f - 0.15).astype(np.int32)
    log_q = np.log(np.stack([1 - f, f], axis=-1))
    fn = jax.jit(jax.vmap(lambda lq, y, k: estimators.sample_estimates(lq, y, 15, 200, k)))
    value, lo, hi = (np.asarray(v) for v in fn(log_q, correct, jax.random.split(jax.random.key(0), samples)))
    for e in ("ece_width", "ece_mass"):
        i = estimators.ESTIMATORS.index(e)
        coverage = np.mean((lo[:, i] <= 0.15) & (0.15 <= hi[:, i]))
        assert 0.84 <= coverage <= 0.96, (e, coverage)
        assert np.all(lo[:, i] <= value[:, i]) and np.all(value[:, i] <= hi[:, i])
    for e in ("ece_sweep", "smece", "ece_classwise"):
        assert np.isnan(lo[:, estimators.ESTIMATORS.index(e)]).all()
    big = _estimate(log_q[0].repeat(4, axis=0)[:, :], np.tile(correct[0], 4), replicates=200)
    small = _estimate(log_q[0], correct[0], replicates=200)
    ratio = (small["ece_width"][2] - small["ece_width"][1]) / (big["ece_width"][2] - big["ece_width"][1])
    assert 1.5 < ratio < 2.7, ratio  # sqrt(4) = 2


# ---------------------------------------------------------------- exact targets


def _tilted(ev, a, b):
    q1 = jax.nn.sigmoid(a * (ev.log_post[:, 0] - ev.log_post[:, 1]) + b)
    return jnp.log(jnp.stack([q1, 1 - q1], -1))


def _targets(ev, log_q, spec):
    scalars = metrics.evaluate(ev, log_q, jnp.full((ev.cal_x.shape[0], 2), -np.log(2.0)), spec).scalars
    t = estimators.targets(ev, log_q, scalars)
    return scalars, {estimators.TARGETS[e]: float(t[i]) for i, e in enumerate(estimators.ESTIMATORS)}


@pytest.mark.slow
@pytest.mark.parametrize("a,b", [(1.6, 0.0), (0.7, 0.4), (1.0, -0.8)])
def test_classwise_target_is_the_mean_absolute_error_where_the_score_is_monotone(a, b):
    """Example 1 (equal sigmas): the log-odds are linear in x, so q_1 = sigmoid(a z + b) is monotone
    and its level sets are single points: E[P_1 | q_1] = P_1 there, and the class-wise calibration
    error is E|P_1 - q_1| exactly (a direct quadrature, no level sets)."""
    spec = metrics.EvalSpec()
    ev = metrics.make_eval_set(example(1), spec)
    log_q = _tilted(ev, a, b)
    scalars, got = _targets(ev, log_q, spec)
    want = float(jnp.sum(ev.weight * jnp.abs(jnp.exp(ev.log_post[:, 0]) - jnp.exp(log_q[:, 0]))))
    np.testing.assert_allclose(got["true_ece_classwise"], want, rtol=0.01, atol=2e-5)
    assert got["true_ece"] == float(scalars.true_ece)
    np.testing.assert_allclose(got["true_ece_l2"], math.sqrt(float(scalars.cal_term)), rtol=1e-6)


@pytest.mark.slow
def test_population_smooth_ece_is_the_large_sample_limit_of_the_estimate():
    """The exact target of smece (the kernel smoothing applied to p(x) and P_top - conf) against
    the estimator on 400,000 labelled examples of the same model (example 3, overconfident)."""
    spec = metrics.EvalSpec()
    task = example(3)
    ev = metrics.make_eval_set(task, spec)
    _, got = _targets(ev, _tilted(ev, 1.6, 0.3), spec)
    x, y = tasks.draw(task, jax.random.key(5), jnp.arange(400_000, dtype=jnp.uint32))
    post = jax.vmap(tasks.log_posterior, (None, 0))(task, x)
    q1 = jax.nn.sigmoid(1.6 * (post[:, 0] - post[:, 1]) + 0.3)
    est = _estimate(jnp.log(jnp.stack([q1, 1 - q1], -1)), y)
    assert got["true_smece"] > 0.01
    np.testing.assert_allclose(est["smece"][0], got["true_smece"], rtol=0.05)
    np.testing.assert_allclose(est["ece_classwise"][0], got["true_ece_classwise"], rtol=0.05)


# ---------------------------------------------------------------- the benchmark table


def test_benchmark_table_matches_a_direct_computation():
    rng = np.random.default_rng(6)
    rows = []
    for run in range(3):
        for step in (10, 100):
            target = rng.uniform(0.01, 0.05)
            for n in (100, 1000):
                for draw in range(5):
                    v = target + rng.normal(0.01, 0.02 / math.sqrt(n / 100))
                    for e, lo, hi in (("ece_width", v - 0.01, v + 0.01), ("smece", np.nan, np.nan)):
                        rows.append((run, step, e, n, draw, v, lo, hi, target))
    rows.append((3, 10, "ece_width", 100, 0, np.nan, np.nan, np.nan, np.nan))  # a diverged run
    df = pd.DataFrame(rows, columns=["run_id", "step", "estimator", "n", "draw", "value", "lo", "hi", "target"])
    bench = summaries.estimator_benchmark(df).set_index(["estimator", "n", "step"])
    for (e, n, step), row in bench.iterrows():
        d = df[(df.estimator == e) & (df.n == n) & (df.step == step) & df.value.notna()]
        err = d.value - d.target
        assert row["samples"] == len(d) == 15
        np.testing.assert_allclose(row["bias"], err.mean())
        np.testing.assert_allclose(row["rmse"], np.sqrt((err**2).mean()))
        np.testing.assert_allclose(row["rel_rmse"], np.sqrt(((err / d.target) ** 2).mean()))
        np.testing.assert_allclose(row["sd"], np.sqrt(np.mean([g.value.var(ddof=1) for _, g in d.groupby("run_id")])))
        if e == "smece":
            assert np.isnan(row["coverage"])
        else:
            np.testing.assert_allclose(row["coverage"], ((d.lo <= d.target) & (d.target <= d.hi)).mean())


# ---------------------------------------------------------------- inside a sweep

BENCH_DOC = sweep_doc(
    name="bench",
    seeds=2,
    train={"steps": 1000, "checkpoints": [10, 1000], "n_data": 300},
    eval={
        "points": 256,
        "calibration_samples": 200,
        "estimator_sizes": [50, 400],
        "estimator_draws": 3,
        "estimator_bootstrap": 20,
        "temperature_scaling": True,
    },
    cases={"a": {}, "b": {"mu2": 1.0, "sigma1": 2.0}, "wild": {"lr": 1e30}},
)


@pytest.mark.slow
def test_a_sweep_benchmarks_the_estimators_with_the_same_bits_under_any_layout(tmp_path):
    """estimators.parquet has a row per run x checkpoint x estimator x size x draw, its targets are
    the exact metrics of the same run and checkpoint, diverged runs are nan, and every table (with
    temperature scaling on) is bit-identical
    whether 6 runs trained as one chunk on 4 devices or one run per chunk on one."""
    text = to_toml(BENCH_DOC)
    sw = sweep.parse(tomllib.loads(text), "bench.toml", text)
    tables = []
    for out, (chunk, devices) in ((tmp_path / "a", (None, 4)), (tmp_path / "b", (1, 1))):
        lay = planning.default_layout(chunk_size=chunk, inner_batch=2, devices=jax.devices()[:devices])
        assert engine.run_sweep(sw, out, layout=lay, quiet=True).complete
        pipeline.finish(out, figures=False)
        tables.append(reader.load_results(out))
    a, b = tables
    assert set(a) == set(b) and {"estimators", "estimator_benchmark", "recalibrated"} <= set(a)
    rec = a["recalibrated"].merge(a["runs"][["run_id", "case"]])
    trained = (rec["case"] != "wild") & (rec["step"] == 1000)
    assert len(rec) == 12 and rec.loc[trained, "temperature"].between(0.1, 10).all()
    assert rec.loc[rec["case"] == "wild", "kl"].isna().all()
    for name in a:
        assert a[name].equals(b[name]), name
    est, m, runs = a["estimators"], a["metrics"], a["runs"]
    assert len(est) == 6 * 2 * len(estimators.ESTIMATORS) * 2 * 3
    static = sweep.static_of(sw.runs[0])
    assert tables_mod.row_counts(static)["estimators"] == (len(est) // 6, len(est.columns))  # the memory model's
    assert list(est.columns) == ["run_id", "step", "estimator", "n", "draw", "value", "lo", "hi", "target"]
    wild = runs.loc[runs["case"] == "wild", "run_id"]
    dead = est["run_id"].isin(wild) & (est["step"] == 1000)
    assert est.loc[dead, ["value", "target"]].isna().all().all()
    ok = est[~est["run_id"].isin(wild)]
    assert np.isfinite(ok["value"]).all() and np.isfinite(ok["target"]).all()
    l1 = ok[ok["estimator"].isin(["ece_width", "ece_mass", "ece_sweep"])].merge(m, on=["run_id", "step"])
    np.testing.assert_array_equal(l1["target"], l1["true_ece"].astype(np.float32).astype(np.float64))
    l2 = ok[ok["estimator"] == "ece_l2_debiased"].merge(m, on=["run_id", "step"])
    np.testing.assert_allclose(l2["target"], np.sqrt(l2["cal_term"]), rtol=1e-6)
    # Independent samples: the draws of one size differ; the same draw is nested across sizes.
    one = ok[(ok["run_id"] == 0) & (ok["step"] == 1000) & (ok["estimator"] == "ece_width")]
    assert one.groupby("n")["value"].nunique().eq(3).all()
    bench = a["estimator_benchmark"]
    assert len(bench) == len(estimators.ESTIMATORS) * 2 * 2 and (bench["samples"] == 4 * 3).all()
