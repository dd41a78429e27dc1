"""The classifier: a plain MLP written for one example, batched with vmap by callers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
}
INITS = ("torch", "lecun")


def _torch_uniform(fan_in_axis: int = 0):
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.

    The study trained PyTorch models. With 1-D inputs this init matters: it
    spreads the first layer's ReLU kinks over x = -b/w, whereas flax's default
    zero biases put every kink at x = 0 and slow down learning the crossings.
    """

    def init(key, shape, dtype=jnp.float32, fan_in=None):
        bound = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[fan_in_axis])
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = _torch_uniform()
        kernel = self.param("kernel", lambda k, s: init(k, s, fan_in=fan_in), (fan_in, self.features))
        bias = self.param("bias", lambda k, s: init(k, s, fan_in=fan_in), (self.features,))
        return x @ kernel + jnp.reshape(bias, (1,) * (x.ndim - 1) + (-1,))


class MLP(nn.Module):
    """x (..., D) -> logits (..., num_classes)."""

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"
    init_scheme: str = "torch"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        dense = TorchDense if self.init_scheme == "torch" else nn.Dense
        for width in self.hidden:
            x = act(dense(width)(x))
        return dense(self.num_classes)(x)
