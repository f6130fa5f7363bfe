"""Complex parameters as pairs of real values, the way PyTorch's ``view_as_real`` sees them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _state


class _RealImaginary(NamedTuple):
    """A complex leaf split into two real leaves."""

    real: jax.Array
    imaginary: jax.Array


def split_real_and_imaginary(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.contrib.split_real_and_imaginary``, merging the parts with ``jax.lax.complex``.

    optax merges them back as ``real + imaginary * 1j``, a float-to-complex
    promotion that ``jax_numpy_dtype_promotion="strict"`` refuses. The state is
    optax's ``SplitRealAndImaginaryState``.
    """

    def split(tree: optax.Params) -> optax.Params:
        def leaf(x: jax.Array) -> jax.Array | _RealImaginary:
            return _RealImaginary(x.real, x.imag) if jnp.iscomplexobj(x) else x

        return jax.tree.map(leaf, tree)

    def merge(tree: optax.Updates) -> optax.Updates:
        def leaf(x: jax.Array | _RealImaginary) -> jax.Array:
            return jax.lax.complex(x.real, x.imaginary) if isinstance(x, _RealImaginary) else x

        return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, _RealImaginary))

    def init_fn(params: optax.Params) -> optax.contrib.SplitRealAndImaginaryState:
        return optax.contrib.SplitRealAndImaginaryState(inner.init(split(params)))

    def update_fn(
        updates: optax.Updates,
        state: optax.contrib.SplitRealAndImaginaryState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, optax.contrib.SplitRealAndImaginaryState]:
        inner_params = None if params is None else split(params)
        updates, inner_state = inner.update(split(updates), state.inner_state, inner_params)
        return merge(updates), optax.contrib.SplitRealAndImaginaryState(inner_state)

    return _state.transformation(init_fn, update_fn)
