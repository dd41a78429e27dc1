"""The classifier: a plain MLP written for one example, batched with vmap by callers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from calibjax.core import kernel as cpu_kernel

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


class Dense(nn.Module):
    """y = x @ kernel + bias, kernel (fan_in, features).

    init "torch": PyTorch's nn.Linear (``_torch_uniform``); "lecun": flax's nn.Dense (LeCun normal
    weights, zero biases). product "kernel": the product by calibjax's CPU kernel (``calibjax.core.kernel``),
    else XLA's dot.
    """

    features: int
    init_scheme: str = "torch"
    product: str = "xla"

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        if self.init_scheme == "torch":
            uniform = _torch_uniform()
            kernel_init = bias_init = lambda k, s: uniform(k, s, fan_in=fan_in)  # noqa: E731
        else:
            kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
        kernel = self.param("kernel", kernel_init, (fan_in, self.features))
        bias = self.param("bias", bias_init, (self.features,))
        y = cpu_kernel.dense(x, kernel) if self.product == "kernel" else x @ kernel
        return y + jnp.reshape(bias, (1,) * (x.ndim - 1) + (-1,))


class MLP(nn.Module):
    """x (..., D) -> logits (..., num_classes). dense: "xla" or "kernel" (``Dense.product``)."""

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"
    init_scheme: str = "torch"
    dense: str = "xla"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        # The layer names of 0.7.0 (TorchDense_i, flax's Dense_i) name the parameters and seed their
        # initialisation, so they are kept: a run's initial weights do not change.
        prefix = "TorchDense" if self.init_scheme == "torch" else "Dense"
        widths = (*self.hidden, self.num_classes)
        for i, width in enumerate(widths):
            x = Dense(width, self.init_scheme, self.dense, name=f"{prefix}_{i}")(x)
            if i < len(self.hidden):
                x = act(x)
        return x
