"""The exact posterior against closed forms and an independent scipy computation; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp as np_logsumexp

from calibjax.core import tasks

from conftest import example


def test_example1_matches_the_study_closed_form():
    task = example(1)
    x = np.linspace(-5, 8, 101, dtype=np.float32)
    post = np.exp(np.array([tasks.log_posterior(task, jnp.array([xi])) for xi in x]))
    closed = 1.0 / (1.0 + np.exp((6 * x.astype(np.float64) - 9) / 2))  # P(c1 | x) from the study
    np.testing.assert_allclose(post[:, 0], closed, atol=2e-6)
    np.testing.assert_allclose(post.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("x", [-50.0, 50.0])
def test_posterior_is_finite_and_correct_50_sigma_out(x):
    log_post = np.asarray(tasks.log_posterior(example(1), jnp.array([x])))
    assert np.isfinite(log_post).all()
    a = (6 * x - 9) / 2  # log P(c1|x) = -log(1 + e^a), log P(c2|x) = -log(1 + e^-a)
    expected = np.array([-np.logaddexp(0, a), -np.logaddexp(0, -a)])
    np.testing.assert_allclose(log_post, expected, rtol=1e-5, atol=1e-5)


def three_class_task():
    # M = 3, D = 2; class 2 is a two-component mixture; unequal priors and diagonal sigmas.
    prior = [0.2, 0.3, 0.5]
    mean = [[[0.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [-2.0, 3.0]], [[1.0, -2.0], [1.0, -2.0]]]
    sigma = [[[1.0, 0.5], [1.0, 1.0]], [[0.7, 1.2], [1.5, 0.4]], [[2.0, 1.0], [1.0, 1.0]]]
    weight = [[1.0, 0.0], [0.35, 0.65], [1.0, 0.0]]
    return tasks.make_task(prior, mean, sigma, weight), (prior, mean, sigma, weight)


def scipy_log_posterior(params, x):
    prior, mean, sigma, weight = (np.asarray(a, np.float64) for a in params)
    log_joint = []
    for c in range(3):
        comps = [
            np.log(weight[c, k]) + stats.multivariate_normal(mean[c, k], np.diag(sigma[c, k] ** 2)).logpdf(x)
            for k in range(2)
            if weight[c, k] > 0
        ]
        log_joint.append(np.log(prior[c]) + np_logsumexp(comps))
    log_joint = np.array(log_joint)
    return log_joint - np_logsumexp(log_joint)


@pytest.mark.slow
def test_three_class_2d_mixture_matches_scipy_bayes():
    task, params = three_class_task()
    rng = np.random.default_rng(0)
    points = rng.normal(0, 3, size=(200, 2)).astype(np.float32)
    ours = np.array(jax.vmap(tasks.log_posterior, (None, 0))(task, jnp.asarray(points)))
    ref = np.array([scipy_log_posterior(params, p.astype(np.float64)) for p in points])
    np.testing.assert_allclose(np.exp(ours), np.exp(ref), atol=2e-6)
    far = np.array([[40.0, -45.0], [-60.0, 30.0]], np.float32)
    far_post = np.array(jax.vmap(tasks.log_posterior, (None, 0))(task, jnp.asarray(far)))
    assert np.isfinite(far_post).all()
    np.testing.assert_allclose(far_post, [scipy_log_posterior(params, p) for p in far.astype(np.float64)], rtol=1e-4)


def draw(task, n, seed=0):
    x, c = tasks.draw(task, jax.random.key(seed), jnp.arange(n))
    return np.asarray(x), np.asarray(c)


def test_class_frequencies_follow_priors():
    task, (prior, *_) = three_class_task()
    n = 40_000
    _, c = draw(task, n)
    freq = np.bincount(c, minlength=3) / n
    sd = np.sqrt(np.asarray(prior) * (1 - np.asarray(prior)) / n)
    assert np.all(np.abs(freq - prior) < 5 * sd), (freq, prior)


@pytest.mark.slow
def test_class_conditionals_pass_ks_and_a_wrong_distribution_fails():
    task = tasks.make_task(
        [0.4, 0.6], [[[0.0], [0.0]], [[-2.0], [2.0]]], [[[2.0], [2.0]], [[0.5], [1.0]]], [[1.0, 0.0], [0.3, 0.7]]
    )
    x, c = draw(task, 20_000, seed=1)
    x = x[:, 0]
    cdf1 = stats.norm(0.0, 2.0).cdf
    cdf2 = lambda v: 0.3 * stats.norm(-2.0, 0.5).cdf(v) + 0.7 * stats.norm(2.0, 1.0).cdf(v)
    assert stats.kstest(x[c == 0], cdf1).pvalue > 1e-3
    assert stats.kstest(x[c == 1], cdf2).pvalue > 1e-3
    # The same test has the power to reject a slightly wrong distribution at this sample size.
    assert stats.kstest(x[c == 0], stats.norm(0.1, 2.0).cdf).pvalue < 1e-3
    assert stats.kstest(x[c == 1], lambda v: cdf2(v - 0.1)).pvalue < 1e-3


def test_a_zero_weight_padding_component_is_never_drawn():
    """Weights whose float32 cumulative sum ends below the largest uniform: that uniform's leftover
    belongs to the last real component, not the zero-weight padding after it."""
    top = 1.0 - 2.0**-24  # the largest uniform open_uniform gives
    gen = np.random.default_rng(0)
    for _ in range(2000):  # about one random vector of 8 weights in 60 has such a sum
        w = np.append(gen.dirichlet(np.ones(8)), 0.0)
        log_w = tasks.make_task([0.5, 0.5], np.zeros((2, 9, 1)), np.ones((2, 9, 1)), [w, w]).log_weight
        if float(jnp.cumsum(jnp.exp(jnp.asarray(log_w[0])))[7]) < top:
            break
    else:
        pytest.fail("no float32 weight vector with a short cumulative sum found")
    mean = np.arange(18, dtype=np.float32).reshape(2, 9, 1)
    mean[:, 8] = 1e3  # the padding's mean: an example drawn from it would stand out
    task = tasks.make_task([0.5, 0.5], mean, np.ones_like(mean), [w, w])
    for c_u in (0.25, 0.75):
        x, c = tasks.sample(task, jnp.asarray([c_u, top, 0.5], jnp.float32))
        assert float(x[0]) == float(mean[int(c), 7, 0]), (float(x[0]), int(c))
