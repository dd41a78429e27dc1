"""Counter-based random bits for training data: Threefry-2x32 written out in jnp.

Every training example is regenerated from its index at every step, so hashing is on the hot path
(B/2 + B * ceil((2 + D) / 2) hashes per step: 160 for the study's batch of 64). ``jax.random``
computes the same Threefry-2x32 hash, but its CPU lowering is a rolled loop of small kernels per
call, and drawing a batch took six such loops (fold_in, randint's split and two draws, a fold_in
and a draw per example): 15-20 % of a step. Written out here, one batch's hashing is a single
fused elementwise kernel.

``threefry2x32`` is bit-identical to ``jax.extend.random.threefry_2x32`` (tested); the streams
built on it are calibjax's own and documented, so datasets do not change with jax.random's
internals:

* word j of counter c under key k: output (j mod 2) of threefry2x32(k, (c, j // 2));
* the finite-data indices of step t: ``below(words(batch_key, t, B), N)``;
* the 2 + D uniforms of example i: ``open_uniform(words(data_key, i, 2 + D))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under key (2,) uint32; broadcasts."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotl(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def words(key: jax.Array, counter: jax.Array, n: int) -> jax.Array:
    """n uint32 words for each counter (uint32, any shape) -> (*counter.shape, n).

    key is a typed JAX key (threefry) or its raw (2,) uint32 data.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    shape = (*counter.shape, (n + 1) // 2)
    x0 = jnp.broadcast_to(counter.astype(jnp.uint32)[..., None], shape)
    x1 = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.uint32), shape)
    y0, y1 = threefry2x32(key, x0, x1)
    return jnp.stack([y0, y1], axis=-1).reshape(*counter.shape, -1)[..., :n]


def open_uniform(bits: jax.Array) -> jax.Array:
    """Uniforms strictly inside (0, 1): midpoints of 2^23 equal bins, from the top 23 bits.

    23, not 24: the midpoints (2k + 1) / 2^24 are then all exact in float32, the largest is
    1 - 2^-24. With 24 bits, midpoints above 1/2 need a 25th bit and round, the top one to 1.0,
    where the normal quantile is inf (a NaN training example once in 2^24 draws).
    """
    return ((bits >> np.uint32(9)).astype(jnp.float32) + 0.5) * (2.0**-23)


def below(bits: jax.Array, n: jax.Array) -> jax.Array:
    """Integers in [0, n) from uniform uint32 bits: floor(bits * n / 2^32), n >= 1 (Lemire).

    The high word of the 64-bit product, from 16-bit limbs (JAX runs without 64-bit integers);
    no division, and each value's probability is within n / 2^32 (relative) of 1/n.
    """
    n = jnp.asarray(n).astype(jnp.uint32)
    lo16 = np.uint32(0xFFFF)
    a_lo, a_hi = bits & lo16, bits >> np.uint32(16)
    b_lo, b_hi = n & lo16, n >> np.uint32(16)
    lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
    middle = (lo_lo >> np.uint32(16)) + (hi_lo & lo16) + lo_hi  # < 2^32: cannot overflow
    return (a_hi * b_hi + (hi_lo >> np.uint32(16)) + (middle >> np.uint32(16))).astype(jnp.int32)
