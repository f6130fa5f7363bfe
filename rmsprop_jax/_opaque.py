"""Constants that XLA keeps out of the kernels that use them.

XLA:CPU compiles one kernel per distinct fused computation and reuses it for every
fusion with the same body, so a thousand leaves of six shapes cost about six kernels.
A constant that differs per leaf (a slice offset, a random-bits salt) sits inside the
fused body and makes every leaf's kernel distinct: on two cores, slicing 1,000
leaves of 64 elements out of one buffer compiled in 14.4 s with constant offsets and
in 1.2 s with the offsets passed through :func:`runtime_values`
(``benchmarks/packing.py`` has the table).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def runtime_values(values: Sequence[jax.typing.ArrayLike]) -> tuple[jax.Array, ...]:
    """``values`` (scalars) as arrays that XLA computes at run time instead of folding them.

    The values come out of a ``lax.cond`` whose predicate is hidden behind an
    optimization barrier, with the same values in both branches: the result is
    ``values`` whatever the predicate (so a compiler that sees through this stays
    correct and only compiles slower), and each value is a separate buffer that a
    kernel takes as an argument, so kernels that differ only in these values are one.

    Pass scalars: XLA folds an array value back into the kernels that slice it.
    """
    if not values:
        return ()

    def make() -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(value) for value in values)

    return lax.cond(lax.optimization_barrier(jnp.bool_(True)), make, make)
