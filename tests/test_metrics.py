"""Metrics against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, stats

from calibjax import metrics, tasks
from conftest import example


def test_kl_is_zero_for_the_exact_posterior_and_bins_add_up():
    for n in (1, 2, 3):
        ev = metrics.make_eval_set(example(n), metrics.EvalSpec())
        m = metrics.evaluate(ev, ev.log_post)
        assert abs(float(m["kl"])) < 1e-7 and float(m["tv"]) < 1e-7 and float(m["max_err"]) < 1e-6
        assert float(m["accuracy"]) == float(m["bayes_accuracy"])
        np.testing.assert_allclose(float(jnp.sum(m["bin_mass"])), 1.0, atol=1e-5)
        np.testing.assert_allclose(float(jnp.sum(m["bin_kl"])), float(m["kl"]), atol=1e-7)


def test_kl_tv_and_accuracy_of_a_wrong_posterior_match_direct_integration():
    task = example(2)
    ev = metrics.make_eval_set(task, metrics.EvalSpec())
    # A known wrong model: logistic q(c1|x) = sigmoid(1 - x).
    x = np.asarray(ev.x)
    log_q = np.stack([-np.logaddexp(0, -(1 - x[:, 0])), -np.logaddexp(0, 1 - x[:, 0])], -1)
    m = metrics.evaluate(ev, jnp.asarray(log_q, jnp.float32))

    p1 = lambda v: 0.5 * stats.norm(0, 2).pdf(v)
    p2 = lambda v: 0.5 * stats.norm(1, 1).pdf(v)

    def integrand(v, what):
        px = p1(v) + p2(v)
        P = np.array([p1(v), p2(v)]) / px
        q1 = 1 / (1 + np.exp(-(1 - v)))
        q = np.array([q1, 1 - q1])
        if what == "kl":
            return px * np.sum(P * np.log(P / q))
        if what == "tv":
            return px * 0.5 * np.abs(P - q).sum()
        return px * P[int(np.argmax(q))]

    for what, key in (("kl", "kl"), ("tv", "tv"), ("acc", "accuracy")):
        ref, _ = integrate.quad(integrand, -20, 20, args=(what,), limit=200, points=[1.0])
        np.testing.assert_allclose(float(m[key]), ref, rtol=2e-3)
    assert float(m["accuracy"]) < float(m["bayes_accuracy"])


def test_bayes_accuracy_and_entropy_match_closed_forms():
    ev = metrics.make_eval_set(example(1), metrics.EvalSpec())
    m = metrics.evaluate(ev, ev.log_post)
    np.testing.assert_allclose(float(m["bayes_accuracy"]), stats.norm.cdf(1.5), rtol=1e-4)
    ref, _ = integrate.quad(lambda v: -sum(
        pc * np.log(pc) for pc in [1 / (1 + np.exp((6 * v - 9) / 2)), 1 / (1 + np.exp(-(6 * v - 9) / 2))] if pc > 0)
        * 0.5 * (stats.norm(0, 1).pdf(v) + stats.norm(3, 1).pdf(v)), -12, 15, limit=200)
    np.testing.assert_allclose(float(metrics.conditional_entropy(ev)), ref, rtol=1e-3)


def test_max_err_ignores_the_sparsest_mass_only():
    ev = metrics.make_eval_set(example(1), metrics.EvalSpec())
    hdr_mass = float(jnp.sum(ev.weight * ev.in_hdr))
    assert 0.999 <= hdr_mass < 0.9995
    # An error placed outside the 99.9 % region does not count; inside it does.
    log_q = np.array(ev.log_post)
    outside = int(np.argmin(np.where(ev.in_hdr, np.inf, -np.asarray(ev.log10_density))))
    inside = int(np.argmax(np.asarray(ev.log10_density)))
    wrong = np.log([0.5, 0.5], dtype=np.float32)
    log_q[outside] = wrong
    assert float(metrics.evaluate(ev, jnp.asarray(log_q))["max_err"]) < 1e-5
    log_q[inside] = wrong
    expected = abs(float(np.exp(ev.log_post[inside, 0])) - 0.5)
    np.testing.assert_allclose(float(metrics.evaluate(ev, jnp.asarray(log_q))["max_err"]), expected, rtol=1e-5)


def test_density_bins_follow_log10_density():
    spec = metrics.EvalSpec()
    ev = metrics.make_eval_set(example(3), spec)
    lo, hi = spec.bin_bounds()
    b = np.argmax(np.asarray(ev.bins), 1)
    d = np.asarray(ev.log10_density)
    assert np.all(d > np.asarray(lo)[b]) and np.all(d <= np.asarray(hi)[b])


def test_monte_carlo_eval_for_2d_is_fixed_and_weights_sum_to_one():
    task = tasks.make_task([0.5, 0.5], [[[0.0, 0.0]], [[2.0, 0.0]]], [[[1.0, 1.0]], [[1.0, 1.0]]])
    spec = metrics.EvalSpec(points=4000)
    a, b = metrics.make_eval_set(task, spec), metrics.make_eval_set(task, spec)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    np.testing.assert_allclose(float(jnp.sum(a.weight)), 1.0, atol=1e-5)
    # Bayes accuracy of two unit Gaussians 2 apart along one axis: Phi(1).
    m = metrics.evaluate(a, a.log_post)
    np.testing.assert_allclose(float(m["bayes_accuracy"]), stats.norm.cdf(1.0), atol=0.015)
