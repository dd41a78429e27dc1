"""The CPU kernel's operations inside a traced program, through ``jax.ffi``.

``dense(x, w)`` (a dense layer's product, with its gradients) and ``loss_and_grads`` (a ReLU MLP's
whole training step) call the C++ kernel that ``calibjax.execution.kernel_loader`` builds and
registers with XLA; a program that uses them is compiled only after ``kernel_loader.require()``
(the engine's layout does it when it chooses the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "calibjax_batched_matmul"
STEP_TARGET = "calibjax_mlp_step"
_registered: set[str] = set()  # the targets kernel_loader has registered with XLA (``registered``)


def registered(target: str) -> None:
    """Note that ``target`` is registered with XLA (kernel_loader calls this once it is)."""
    _registered.add(target)


def _require() -> None:
    if not _registered:
        raise RuntimeError(
            "the calibjax CPU kernel is not loaded: call calibjax.execution.kernel_loader.require() "
            'before tracing a program with dense = "kernel" (the engine does)'
        )


def batched_matmul(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) over matching leading (batch) dimensions, by the kernel (float32, CPU)."""
    _require()  # registered with XLA before any program that calls it is compiled
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(
        a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b)
    )


@jax.custom_vjp
def _product(x, w):
    return batched_matmul(x, w)


def _product_fwd(x, w):
    return batched_matmul(x, w), (x, w)


def _product_bwd(res, g):
    x, w = res
    return batched_matmul(g, w, trans_b=True), batched_matmul(x, g, trans_a=True)


_product.defvjp(_product_fwd, _product_bwd)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for x (..., K) and a weight w (K, N) by the kernel: forward, input and weight
    gradients, every width (thin ones too: XLA's dot orders its sums by the CPU model, the kernel
    the same way on every CPU). Other dtypes go to XLA's dot."""
    k, n = w.shape
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return x @ w
    lead = x.shape[:-1]
    return _product(x.reshape(-1, k), w).reshape(*lead, n)


def fuses(activation: str, loss: str) -> bool:
    """Whether ``loss_and_grads`` computes a training step of this model and loss (else the step is
    XLA's, with the kernel's products)."""
    return activation == "relu" and loss == "cross_entropy"


def loss_and_grads(params: dict, x: jax.Array, c: jax.Array, weight: jax.Array | None):
    """The mean (weighted) cross-entropy of a ReLU MLP's logits on a batch, and its gradients with
    respect to ``params`` (flax's tree of Dense layers), by one kernel call: what
    ``jax.value_and_grad`` of the model's loss gives, computed in C++ (``csrc/dense.cc``, MlpStep).

    x (B, D) float32, c (B,) integer labels, weight (B,) or None. Under vmap, one call for all runs.
    """
    _require()
    tree = params["params"]
    names = sorted(tree, key=lambda name: int(name.rsplit("_", 1)[1]))  # layer order: Dense_0, Dense_1, ...
    flat = [tree[name][leaf] for name in names for leaf in ("kernel", "bias")]
    w = jnp.ones(c.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
    shapes = [jax.ShapeDtypeStruct((), jnp.float32)] + [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in flat]
    loss, *grads = jax.ffi.ffi_call(STEP_TARGET, shapes, vmap_method="broadcast_all")(
        x.astype(jnp.float32), c.astype(jnp.int32), w, *flat
    )
    out = {name: {"kernel": grads[2 * i], "bias": grads[2 * i + 1]} for i, name in enumerate(names)}
    return loss, {"params": out}
