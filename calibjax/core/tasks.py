"""Tasks that know their truth: class-conditional Gaussian mixtures.

A task is the generative model P(x, C) with M classes, each a mixture of K
diagonal Gaussians in D dimensions:

    P(x, c) = P(c) * sum_k w_ck * prod_d N(x_d; mu_ckd, sigma_ckd^2)

Its parameters are a pytree of arrays, so a batch of different tasks is one
argument with a leading axis that ``jax.vmap`` maps over. M, K and D are the
array shapes (static); every value is dynamic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from calibjax.core import portable, rng

LOG_2PI = 1.8378770664093453  # log(2 pi) as 0.8.0 computed it with glibc: a literal, the same on every machine


@struct.dataclass
class GaussianTask:
    log_prior: jax.Array  # (M,) float32, log P(c)
    log_weight: jax.Array  # (M, K) float32, log w_ck; logsumexp over k is 0
    mean: jax.Array  # (M, K, D) float32
    sigma: jax.Array  # (M, K, D) float32, > 0

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]


def make_task(prior, mean, sigma, weight=None) -> GaussianTask:
    """Build a task from priors (M,), means and sigmas (M, K, D), weights (M, K).

    Host-side numpy (float32): building thousands of runs' tasks costs no device dispatches or
    copies; jitted functions take the arrays as they are.
    """
    mean = np.asarray(mean, np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), mean.shape)
    weight = np.ones(mean.shape[:2], np.float32) if weight is None else np.asarray(weight, np.float32)
    # Zero-weight (padding) components: log 0 = -inf, never drawn. Logarithms from calibjax.portable,
    # so that a task's numbers do not depend on the CPU that built it (numpy's float32 log does).
    log_weight = portable.log_float32(weight) - portable.log_float32(weight.sum(axis=-1, keepdims=True))
    log_prior = portable.log_float32(prior)
    return GaussianTask(log_prior, log_weight.astype(np.float32), mean, np.ascontiguousarray(sigma))


def component_log_density(task: GaussianTask, x: jax.Array) -> jax.Array:
    """log N(x; mu_ck, diag sigma_ck^2) for one point x (D,) -> (M, K)."""
    z = (x[None, None, :] - task.mean) / task.sigma
    return -0.5 * jnp.sum(z * z + LOG_2PI + 2.0 * jnp.log(task.sigma), axis=-1)


def log_joint(task: GaussianTask, x: jax.Array) -> jax.Array:
    """log P(x, c) for one point x (D,) -> (M,)."""
    comp = component_log_density(task, x) + task.log_weight
    return task.log_prior + jax.nn.logsumexp(comp, axis=-1)


def log_density(task: GaussianTask, x: jax.Array) -> jax.Array:
    """log p(x) = logsumexp_c log P(x, c), a scalar."""
    return jax.nn.logsumexp(log_joint(task, x))


def log_posterior(task: GaussianTask, x: jax.Array) -> jax.Array:
    """Exact log P(c | x) for one point (D,) -> (M,).

    Computed as log_softmax of the log-joint, never as a ratio of densities,
    so it stays finite and accurate where both densities underflow (|x| at
    50 sigma gives log-densities near -1250, far below float32's exp range).
    """
    return jax.nn.log_softmax(log_joint(task, x))


def sample(task: GaussianTask, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One (x, c) from 2 + D uniforms u in (0, 1): x (D,) float32, c int32 scalar.

    The class and the component by inverting their cumulative probabilities, the noise by the
    normal quantile function: 2 + D hashed words give all an example needs (a third of the
    hashing of separate categorical and normal draws), which matters because every training
    example is regenerated from its index at every step.
    """
    task = jax.tree.map(jnp.asarray, task)  # numpy leaves cannot be indexed by traced c, k
    c = jnp.sum(u[0] > jnp.cumsum(jnp.exp(task.log_prior))[:-1]).astype(jnp.int32)
    weight = jnp.exp(task.log_weight[c])
    k = jnp.sum(u[1] > jnp.cumsum(weight)[:-1])
    # float32 cumulative weights can end just below 1; the leftover goes to the last real
    # component, never to a zero-weight (padding) one.
    last = weight.shape[0] - 1 - jnp.argmax((weight > 0)[::-1])
    k = jnp.minimum(k, last)
    x = task.mean[c, k] + task.sigma[c, k] * jax.scipy.special.ndtri(u[2:])
    return x, c


def draw(task: GaussianTask, key: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Examples number ``index`` (int, shape (n,)) of the stream ``key``: x (n, D), c (n,).

    Example i is a pure function of (key, i) (see calibjax.core.rng), so a dataset of any size is
    regenerated on demand, and the first N examples are the same for every larger N.
    """
    u = rng.open_uniform(rng.words(key, index, 2 + task.dim))
    return jax.vmap(sample, (None, 0))(task, u)


def support_range(task: GaussianTask, num_sigmas: float) -> tuple[jax.Array, jax.Array]:
    """Per-dimension box [lo, hi] (D,) covering every component's mean +- num_sigmas sigma."""
    lo = jnp.min(task.mean - num_sigmas * task.sigma, axis=(0, 1))
    hi = jnp.max(task.mean + num_sigmas * task.sigma, axis=(0, 1))
    return lo, hi
