"""The fused counter-based hash and the training-data streams built on it."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from calibjax.core import rng, tasks, train


def test_threefry_is_bit_identical_to_jax():
    gen = np.random.default_rng(0)
    for _ in range(5):
        key = jnp.asarray(gen.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32))
        x = jnp.asarray(gen.integers(0, 2**32, 2 * 1000, dtype=np.uint64).astype(np.uint32))
        ref = jax.extend.random.threefry_2x32(key, x)
        y0, y1 = jax.jit(rng.threefry2x32)(key, x[:1000], x[1000:])
        np.testing.assert_array_equal(np.concatenate([y0, y1]), ref)


def test_words_layout():
    key = jax.random.key(3)
    w = rng.words(key, jnp.arange(4), 5)
    assert w.shape == (4, 5) and w.dtype == jnp.uint32
    y0, y1 = rng.threefry2x32(jax.random.key_data(key), jnp.full((3,), 2, jnp.uint32), jnp.arange(3, dtype=jnp.uint32))
    np.testing.assert_array_equal(w[2], np.stack([y0, y1], -1).reshape(-1)[:5])
    assert len(np.unique(np.asarray(w))) == w.size  # no repeats across counters and words


def test_below_is_floor_of_scaled_bits():
    gen = np.random.default_rng(1)
    bits = gen.integers(0, 2**32, 20_000, dtype=np.uint64)
    bits[:4] = [0, 1, 2**32 - 1, 2**31]
    for n in (1, 2, 3, 100_000, 2**31 - 1):
        got = np.asarray(rng.below(jnp.asarray(bits.astype(np.uint32)), n))
        np.testing.assert_array_equal(got, (bits * np.uint64(n)) >> np.uint64(32))
        assert got.min() >= 0 and got.max() < n


def test_open_uniform_is_strictly_inside():
    bits = np.array([0, 511, 512, 2**31, 2**32 - 512, 2**32 - 1], np.uint32)
    u = np.asarray(rng.open_uniform(jnp.asarray(bits)))
    assert (u > 0).all() and (u < 1).all()
    # exactly the bin midpoints (2k + 1) / 2^24, k = bits >> 9, up to the top bin
    np.testing.assert_array_equal(u.astype(np.float64), (2.0 * (bits >> 9) + 1) * 2.0**-24)
    assert np.isfinite(np.asarray(jax.scipy.special.ndtri(jnp.asarray(u)))).all()


def _batches(n_data, steps, batch_size=64):
    task = tasks.make_task([0.5, 0.5], [[[0.0]], [[3.0]]], [[[1.0]], [[1.0]]])
    static = train.Static(steps=steps, checkpoints=(steps,), batch_size=batch_size)
    dyn = jax.tree.map(jnp.asarray, train.make_dynamic(task, n_data=n_data, seed=0))
    data_key, batch_key = jax.random.split(jax.random.key(7))
    draw = jax.jit(jax.vmap(lambda t: train.draw_batch(static, dyn, data_key, batch_key, t)))
    x, c, weight = draw(jnp.arange(steps, dtype=jnp.int32))
    assert weight is None  # no proposal compiled in: unweighted
    return task, data_key, np.asarray(x).reshape(-1), np.asarray(c).reshape(-1)


@pytest.mark.slow
def test_finite_data_uses_exactly_its_n_examples_uniformly():
    n = 50
    task, data_key, x, c = _batches(n, steps=400)
    ex_x, ex_c = tasks.draw(task, data_key, jnp.arange(n))
    ex_x = np.asarray(ex_x)[:, 0]
    index = np.argmin(np.abs(x[:, None] - ex_x[None, :]), axis=1)
    np.testing.assert_allclose(x, ex_x[index], rtol=1e-6)  # every example is one of the N (to 1 ulp)
    np.testing.assert_array_equal(c, np.asarray(ex_c)[index])
    counts = np.bincount(index, minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-3  # drawn uniformly, with replacement


def test_online_data_never_repeats_and_follows_the_task():
    task, data_key, x, c = _batches(train.ONLINE, steps=200)
    ex_x, ex_c = tasks.draw(task, data_key, jnp.arange(x.size))  # step t: examples tB .. tB + B - 1
    np.testing.assert_allclose(x, np.asarray(ex_x)[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(c, ex_c)
    z = x - 3.0 * c  # class-conditional noise: standard normal for this task
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(c.mean() - 0.5) < 4 * 0.5 / np.sqrt(c.size)
