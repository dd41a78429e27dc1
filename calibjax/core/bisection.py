"""One bisection for every monotone root the program solves (focal loss's optimum, the temperature
of temperature scaling, the smooth ECE's bandwidth): a fixed number of halvings in a ``fori_loop``,
elementwise over arrays, so it vmaps and compiles to one small loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bisect(below, lo: jax.Array, hi: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """The bracket (lo, hi) after ``steps`` halvings: where ``below(mid)`` holds, the root lies
    above mid (lo := mid), else below it (hi := mid). ``lo`` need not be the smaller end."""

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        up = below(mid)
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    return jax.lax.fori_loop(0, steps, step, (lo, hi))
