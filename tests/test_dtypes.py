"""The dtype policy of ``rmsprop_jax._numerics``.

16-bit parameters keep float32 state; ``*_dtype`` arguments override every leaf (``nu``
stays real, complex moments stay complex); updates come back in the gradient's dtype;
narrowing casts saturate instead of overflowing; a bad dtype argument names itself.
Expected values are closed forms.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    CONFIGS,
    scan_updates,
)

import rmsprop_jax


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("centered", [False, True])
def test_half_precision_parameters_keep_float32_state(dtype, centered):
    tx = rmsprop_jax.rmsprop(0.1, centered=centered, momentum=0.9, nesterov=True)
    params = {"w": jnp.ones((2, 3), dtype), "b": jnp.ones(3, dtype)}
    state = tx.init(params)
    scaling, _, trace = state
    moments = [scaling.nu, trace.trace] + ([scaling.mu] if centered else [])
    for moment in moments:
        chex.assert_trees_all_equal_dtypes(moment, jax.tree.map(lambda p: p.astype("f4"), params))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    updates, new_state = jax.jit(tx.update)(grads, state)
    chex.assert_trees_all_equal_dtypes(updates, grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


@pytest.mark.parametrize("param_dtype", ["float16", "float32", "complex64"])
@pytest.mark.parametrize(
    "state_dtype",
    ["bfloat16", jnp.float16, jnp.dtype("float32")],
    ids=["str-bfloat16", "type-float16", "dtype-float32"],
)
def test_state_dtype_overrides(param_dtype, state_dtype):
    # *_dtype overrides every leaf; strings, scalar types and dtypes are accepted.
    # nu stays real; mu and the trace of a complex parameter stay complex.
    tx = rmsprop_jax.rmsprop(
        0.1,
        centered=True,
        momentum=0.9,
        nu_dtype=state_dtype,
        mu_dtype=state_dtype,
        momentum_dtype=state_dtype,
    )
    params = jnp.ones(4, param_dtype)
    scaling, _, trace = tx.init(params)
    requested = jnp.dtype(state_dtype)
    complex_state = jnp.dtype("complex64")  # at least the requested precision
    is_complex = param_dtype == "complex64"
    assert scaling.nu.dtype == requested
    assert scaling.mu.dtype == (complex_state if is_complex else requested)
    assert trace.trace.dtype == (complex_state if is_complex else requested)
    g = jnp.full(4, 0.5, param_dtype)
    updates, state = jax.jit(tx.update)(g, (scaling, optax.EmptyState(), trace))
    assert updates.dtype == g.dtype
    chex.assert_trees_all_equal_dtypes(state, (scaling, optax.EmptyState(), trace))
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize(
    "param_dtype,grad_dtype",
    [("float32", "bfloat16"), ("float16", "float32"), ("bfloat16", "float16")],
)
def test_updates_come_back_in_the_gradient_dtype(param_dtype, grad_dtype):
    for config in CONFIGS:
        if config.kind.endswith("bias_correction") or config.kind == "alias":
            continue  # scaling transforms here; the alias is covered above
        tx = config.build(0.9, 1e-8)
        state = tx.init(jnp.zeros(3, param_dtype))
        updates, new_state = tx.update(jnp.full(3, 3.0, grad_dtype), state)
        assert updates.dtype == jnp.dtype(grad_dtype), config.id
        chex.assert_trees_all_equal_dtypes(new_state, state)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "complex64"])
def test_array_learning_rate_keeps_update_dtype(dtype):
    # A learning rate given as a float32 array (as optax.inject_hyperparams passes it)
    # must not change the update dtype (updates come back in the gradient dtype).
    tx = rmsprop_jax.rmsprop(jnp.asarray(0.1, jnp.float32))
    g = jnp.ones(3, dtype)
    updates, _ = tx.update(g, tx.init(jnp.zeros(3, dtype)))
    assert updates.dtype == g.dtype


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_float16_update_saturates_instead_of_overflowing(eps_in_sqrt):
    # Closed form: with decay 0.5 a constant gradient 10 makes mu and nu exactly 10 and
    # 100 in float32 after ~30 steps, the variance exactly 0, and the update
    # 10 / sqrt(1e-8) = 1e5 (or 10 / 1e-8 = 1e9) > 65504: float16 saturates at its max.
    tx = rmsprop_jax.scale_by_centered_rms(0.5, 1e-8, eps_in_sqrt=eps_in_sqrt)
    g = jnp.full((40, 2), 10.0, jnp.float16)
    updates, states = jax.jit(scan_updates, static_argnums=0)(tx, jnp.zeros(2, jnp.float16), g)
    assert updates.dtype == jnp.float16
    chex.assert_tree_all_finite(updates)
    np.testing.assert_array_equal(np.asarray(updates[-1], np.float32), 65504.0)
    np.testing.assert_array_equal(np.asarray(states.nu[-1]), 100.0)  # float32 state
    # The same run with float32 parameters is the unclipped closed form.
    u32, _ = jax.jit(scan_updates, static_argnums=0)(
        tx, jnp.zeros(2, jnp.float32), g.astype(jnp.float32)
    )
    expected = 1e5 if eps_in_sqrt else 1e9
    np.testing.assert_allclose(np.asarray(u32[-1]), expected, rtol=1e-6)


def test_narrow_state_saturates_instead_of_overflowing():
    # A gradient of 300 squares to 9e4 > 65504: a float16 nu saturates at its max.
    # Closed form with decay 0: nu = g^2, stored as 65504; the update is computed from nu
    # as stored (dtype policy): 300 / sqrt(65504 + eps) = 1.17216, finite, not 300 / inf.
    tx = rmsprop_jax.scale_by_rms(0.0, 1e-8, nu_dtype="float16")
    updates, state = tx.update(jnp.full(2, 300.0), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(np.asarray(state.nu, np.float32), 65504.0)
    np.testing.assert_allclose(np.asarray(updates), 300 / math.sqrt(65504 + 1e-8), rtol=1e-6)


@pytest.mark.parametrize("argument", ["nu_dtype", "mu_dtype", "momentum_dtype"])
@pytest.mark.parametrize("value", ["bfloat17", "int32", "complex64"])
def test_bad_dtype_arguments_raise(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`.*{value}"):
        rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9, **{argument: value})
