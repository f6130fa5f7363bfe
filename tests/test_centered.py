"""The centered variance: one-sample steps, agreement with optax after them, the clamp.

With one sample (the first step with bias correction, or ``decay=0``) the centered
transform uses the second moment instead of a variance of one sample, so the update is
bounded (optax divides by ``sqrt(eps)`` there); from the second step on it equals
``optax.scale_by_stddev``; a variance that float32 rounding makes negative is clamped at
zero (optax returns NaN). Expected values are closed forms in float64, or the float64
reference loop of ``helpers`` (for the condition number that sets a tolerance).
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
    log_uniform,
    reference,
    scan_updates,
)

import rmsprop_jax


def twenty_thousand_gradients(steps: int, seed: int = 0) -> np.ndarray:
    """20,000 gradients per step, log-uniform magnitudes in [0.01, 100], random signs."""
    rng = np.random.default_rng(seed)
    return log_uniform(rng, 0.01, 100.0, (steps, 20_000)).astype(np.float32)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_centered_bias_corrected_first_step_is_bounded(eps_in_sqrt, decay):
    # With one sample the variance is replaced by the second moment: u = g / sqrt(g^2 + eps)
    # (or g / (|g| + eps)), so |u| <= 1 (closed form, evaluated in float64 below).
    g = twenty_thousand_gradients(1)[0]
    tx = rmsprop_jax.scale_by_centered_rms(
        decay, 1e-8, eps_in_sqrt=eps_in_sqrt, bias_correction=True
    )
    u = np.asarray(jax.jit(tx.update)(jnp.asarray(g), tx.init(jnp.zeros_like(g)))[0])
    g64 = g.astype(np.float64)
    expected = g64 / (np.sqrt(g64**2 + 1e-8) if eps_in_sqrt else np.abs(g64) + 1e-8)
    # |u| <= 1 up to rounding: nu_hat = ((1 - rho) g^2) / (1 - rho) is g^2 to a few
    # roundings, which leave u at most 2 ulps above 1.
    assert np.max(np.abs(u)) <= 1 + 2 * np.finfo(np.float32).eps
    np.testing.assert_allclose(u, expected, rtol=1e-6)
    # What optax does at this step (the documented difference): g / sqrt(eps + r), with r
    # the rounding residue of nu_hat - mu_hat^2, or NaN where r < -eps: unbounded.
    with jax.numpy_dtype_promotion("standard"):  # optax computes decay**count int/float
        theirs = optax.scale_by_stddev(decay, 1e-8, eps_in_sqrt=eps_in_sqrt, bias_correction=True)
        v = np.asarray(theirs.update(jnp.asarray(g), theirs.init(jnp.zeros_like(g)))[0])
    assert np.mean(np.isnan(v) | (np.abs(v) > 100 * np.abs(g))) > 0.5


def test_centered_decay_zero_steps_are_bounded():
    # decay=0 makes every step a one-sample step: u = g / sqrt(g^2 + eps) at every step
    # (closed form, float64), with or without bias correction.
    g = twenty_thousand_gradients(3)
    for bias_correction in (False, True):
        tx = rmsprop_jax.scale_by_centered_rms(0.0, 1e-8, bias_correction=bias_correction)
        u = np.asarray(jax.jit(scan_updates, static_argnums=0)(tx, jnp.zeros(20_000), g)[0])
        g64 = g.astype(np.float64)
        assert np.max(np.abs(u)) <= 1 + 2 * np.finfo(np.float32).eps
        np.testing.assert_allclose(u, g64 / np.sqrt(g64**2 + 1e-8), rtol=1e-6)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_centered_bias_corrected_matches_optax_after_first_step(eps_in_sqrt, decay):
    # The state depends only on the gradients, so from step 2 on the updates equal
    # optax's scale_by_stddev(bias_correction=True) wherever optax is finite. Both round
    # the correction 1 - prod(rho) in float32 (absolute error ~ulp(1), ours by a running
    # product, optax by a power), and the centered variance amplifies a relative error
    # of the correction by its condition number nu_hat / variance (from the float64
    # reference): that sets the tolerance.
    steps = 8
    g = twenty_thousand_gradients(steps, seed=1)
    ours = rmsprop_jax.scale_by_centered_rms(
        decay, 1e-8, eps_in_sqrt=eps_in_sqrt, bias_correction=True
    )
    theirs = optax.scale_by_stddev(decay, 1e-8, eps_in_sqrt=eps_in_sqrt, bias_correction=True)
    params = jnp.zeros(20_000)
    run = jax.jit(scan_updates, static_argnums=0)
    u = np.asarray(run(ours, params, g)[0])
    with jax.numpy_dtype_promotion("standard"):  # optax computes decay**count int/float
        v = np.asarray(run(theirs, params, g)[0])
    conditions = reference(list(g), decay=decay, eps=1e-8, centered=True, bias_correction=True)[
        "condition"
    ]
    ulp = float(np.finfo(np.float32).eps)
    for t in range(1, steps):
        finite = np.isfinite(v[t])
        assert finite.mean() > 0.99
        relative_error_of_correction = 4 * ulp / (1 - decay ** (t + 1))
        allowed = np.abs(v[t]) * (1e-5 + relative_error_of_correction * conditions[t])
        error = np.abs(u[t] - v[t])
        bad = finite & (error > allowed)
        assert not bad.any(), (
            f"step {t + 1}: {bad.sum()} elements differ, e.g. ours {u[t][bad][:3]} "
            f"optax {v[t][bad][:3]}"
        )


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_centered_variance_is_clamped_on_nearly_constant_gradients(eps_in_sqrt):
    # Gradients c (1 + 1e-5 n): the true variance is ~1e-10 c^2, below float32's rounding
    # of nu - mu^2 (~1e-7 c^2), which often comes out negative (optax, which does not
    # clamp, returns NaN there: shown below). Clamped at zero, the variance gives
    # |u| <= |g| / sqrt(eps) (or |g| / eps); with eps = 0, 0/0 gives zero updates.
    steps, width = 500, 200
    rng = np.random.default_rng(9)
    level = log_uniform(rng, 1e-3, 1e3, width)
    g = (level * (1 + 1e-5 * rng.standard_normal((steps, width)))).astype(np.float32)
    run = jax.jit(scan_updates, static_argnums=0)
    bound = np.abs(g) / (math.sqrt(1e-8) if eps_in_sqrt else 1e-8)
    for eps in (1e-8, 0.0):
        tx = rmsprop_jax.scale_by_centered_rms(0.9, eps, eps_in_sqrt=eps_in_sqrt)
        u, states = run(tx, jnp.zeros(width), g)
        chex.assert_tree_all_finite((u, states))
        if eps:
            assert np.all(np.abs(np.asarray(u)) <= bound * (1 + 1e-6))
        else:
            assert np.any(np.asarray(u) == 0)  # where the clamp made the variance 0
    with jax.numpy_dtype_promotion("standard"):  # optax computes decay**count int/float
        v, _ = run(optax.scale_by_stddev(0.9, 1e-8, eps_in_sqrt=eps_in_sqrt), jnp.zeros(width), g)
    assert np.isnan(np.asarray(v)).any()
