"""Textbook properties of the moving averages, checked on the library.

Scale invariance with ``eps=0`` (exact for powers of two), the steady state for a
constant gradient, the bias of the moving average and its correction, the centered
estimate of the variance, and the effective memory length ``1 / (1 - rho)``. Expected
values are closed forms (statistical ones within 5 standard errors of the sample mean),
or the float64 reference loop of ``helpers`` for a condition number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    CONFIGS,
    Config,
    log_uniform,
    reference,
    scan_updates,
    small_gradients,
)
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax


@functools.cache
def scale_invariance_runner(config: Config) -> Callable:
    def run(grads, c, momentum):
        tx = config.build(0.9, 0.0, 0.0, momentum)
        params = jnp.zeros(grads.shape[1:])
        return scan_updates(tx, params, grads)[0], scan_updates(tx, params, c * grads)[0]

    return jax.jit(run)


@given(
    config=st.sampled_from(CONFIGS),
    log_c=st.floats(-6.0, 6.0),
    momentum=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_scale_invariance_with_zero_eps(config, log_c, momentum, seed):
    # With eps = 0 and initial_scale = 0, u(c g) = u(g) for c > 0 (the update is
    # homogeneous of degree 0). Rounding of c g perturbs the centered variance by its
    # condition number (float64 reference) times an ulp, and a momentum sum that
    # cancels keeps the absolute rounding of its largest terms.
    steps = 6
    g = small_gradients(steps, seed=seed)
    c = np.float32(10.0**log_c)
    u, uc = scale_invariance_runner(config)(
        jnp.asarray(g), jnp.asarray(c), jnp.asarray(momentum, jnp.float32)
    )
    ref = reference(
        list(g),
        decay=0.9,
        eps=0.0,
        centered=config.is_centered,
        bias_correction=config.bias_correction,
    )
    kappa = max(np.max(k) for k in ref["condition"])
    u, uc = np.asarray(u), np.asarray(uc)
    np.testing.assert_allclose(uc, u, rtol=1e-5 + 1e-6 * kappa, atol=1e-6 * np.max(np.abs(u)))


def test_scale_invariance_is_exact_for_powers_of_two():
    # Multiplying by 2^k is exact, and so is every operation on the scaled values.
    g = jnp.asarray(small_gradients(6, seed=7))
    for config in CONFIGS:
        for c in (2.0**-20, 2.0**30):
            u, uc = scale_invariance_runner(config)(
                g, jnp.asarray(c, jnp.float32), jnp.asarray(0.9, jnp.float32)
            )
            chex.assert_trees_all_equal(uc, u, custom_message=f"{config.id}, c={c}")


@pytest.mark.parametrize("initial_scale", [0.0, 1.0])
def test_steady_state_for_a_constant_gradient(initial_scale):
    # Closed form: nu_t = g^2 (1 - rho^t) + initial_scale rho^t -> g^2, and the update
    # g / sqrt(nu_t + eps) -> g / sqrt(g^2 + eps).
    rho, steps = float(np.float32(0.9)), 400  # the float32 decay the library applies
    g = np.float32(log_uniform(np.random.default_rng(8), 1e-3, 1e3, 6))
    tx = rmsprop_jax.scale_by_rms(rho, 1e-8, initial_scale=initial_scale)
    grads = np.broadcast_to(g, (steps, 6))
    updates, states = jax.jit(scan_updates, static_argnums=0)(tx, jnp.zeros(6), grads)
    t = np.arange(1, steps + 1)[:, None]
    g64 = g.astype(np.float64)
    nu = g64**2 * (1 - rho**t) + initial_scale * rho**t
    np.testing.assert_allclose(np.asarray(states.nu), nu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(states.nu[-1]), g64**2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates[-1]), g64 / np.sqrt(g64**2 + 1e-8), rtol=1e-6)


def mean_and_standard_error(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the last axis and its standard error, both from the samples."""
    samples = np.asarray(samples, np.float64)
    return samples.mean(-1), samples.std(-1) / math.sqrt(samples.shape[-1])


N_SAMPLES = 40_000
IID_STEPS = 200  # rho^200 = 7e-10 for rho = 0.9: the end of the run is the steady state


@functools.cache
def iid_moments_runner(steps: int) -> Callable:
    """Per step: nu, mu, the gradient and the bias-corrected update, on i.i.d. gradients."""

    def run(rho, mean, std):
        plain = rmsprop_jax.scale_by_centered_rms(rho, 0.0)
        corrected = rmsprop_jax.scale_by_rms(rho, 0.0, bias_correction=True)

        def step(carry, t):
            s1, s2 = carry
            g = mean + std * jax.random.normal(
                jax.random.fold_in(jax.random.key(0), t), (N_SAMPLES,)
            )
            _, s1 = plain.update(g, s1)
            u, s2 = corrected.update(g, s2)
            return (s1, s2), (s1.nu, s1.mu, g, u)

        params = jnp.zeros(N_SAMPLES)
        carry = (plain.init(params), corrected.init(params))
        return jax.lax.scan(step, carry, jnp.arange(steps))[1]

    return jax.jit(run)


def test_bias_of_the_moving_average_and_its_correction():
    # Closed forms for i.i.d. gradients: E[nu_t] = E[g^2] (1 - rho^t) without bias
    # correction (nu_0 = 0); the corrected nu_t / (1 - rho^t) = g^2 / u^2 (eps = 0)
    # has mean E[g^2] at every step. Checked within 5 standard errors of the sample mean.
    rho, mean, std, steps = 0.9, 0.5, 2.0, IID_STEPS
    nu, _, g, u = jax.device_get(iid_moments_runner(steps)(rho, mean, std))
    t = np.arange(1, steps + 1)[:, None]
    second_moment = mean**2 + std**2
    m, se = mean_and_standard_error(nu / (1 - rho**t))  # rescaled to compare with E[g^2]
    assert np.all(np.abs(m - second_moment) <= 5 * se), (m, se)
    m, se = mean_and_standard_error(nu)
    np.testing.assert_array_less(np.abs(m - second_moment * (1 - rho ** t[:, 0])), 5 * se)
    corrected = g.astype(np.float64) ** 2 / np.asarray(u, np.float64) ** 2
    m, se = mean_and_standard_error(corrected)
    np.testing.assert_array_less(np.abs(m - second_moment), 5 * se)
    # Without the correction the first steps are badly biased (t = 1: by 1 - rho).
    assert abs(np.mean(nu[0]) / second_moment - (1 - rho)) < 0.01


def test_centered_estimate_of_the_variance():
    # Closed form for i.i.d. g with mean m, variance s^2, mu_0 = nu_0 = 0, weights
    # w_k = (1 - rho) rho^k: with S = sum w = 1 - rho^t and Q = sum w^2 =
    # (1 - rho)^2 (1 - rho^2t) / (1 - rho^2),
    # E[nu_t - mu_t^2] = s^2 (S - Q) + m^2 (S - S^2)  ->  s^2 * 2 rho / (1 + rho) = Var[g]
    # up to the factor 2 rho / (1 + rho) (0.995 at rho = 0.99).
    rho, mean, std, steps = 0.9, 3.0, 0.5, IID_STEPS
    nu, mu, _, _ = jax.device_get(iid_moments_runner(steps)(rho, mean, std))
    t = np.arange(1, steps + 1)
    total = 1 - rho**t
    squares = (1 - rho) ** 2 * (1 - rho ** (2 * t)) / (1 - rho**2)
    expected = std**2 * (total - squares) + mean**2 * (total - total**2)
    estimate = np.asarray(nu, np.float64) - np.asarray(mu, np.float64) ** 2
    m, se = mean_and_standard_error(estimate)
    np.testing.assert_array_less(np.abs(m - expected), 5 * se)
    np.testing.assert_allclose(expected[-1], std**2 * 2 * rho / (1 + rho), rtol=1e-3)


def test_effective_memory_length_from_the_impulse_response():
    # One unit gradient, then zeros: nu_t = (1 - rho) rho^(t-1), the weight the moving
    # average gives a sample of age t - 1 (closed form; rho rounded to float32 as the
    # library uses it). Over T steps the weights sum to 1 - rho^T, and their mean age is
    # rho/(1 - rho) - T rho^T/(1 - rho^T) -> rho/(1 - rho): memory length 1/(1 - rho).
    steps = 3000
    impulse = np.zeros((steps, 1), np.float32)
    impulse[0] = 1.0

    def responses(rho):
        tx = rmsprop_jax.scale_by_rms(rho, 0.0)
        return scan_updates(tx, jnp.zeros(1), jnp.asarray(impulse))[1].nu[:, 0]

    rhos = np.array([0.5, 0.9, 0.99], np.float32)
    weights = np.asarray(jax.jit(jax.vmap(responses))(jnp.asarray(rhos)), np.float64)
    age = np.arange(steps)
    for rho, w in zip(rhos.astype(np.float64), weights):
        closed = (1 - rho) * rho**age
        np.testing.assert_allclose(w, closed, rtol=steps * 2**-23, atol=1e-37)
        np.testing.assert_allclose(w.sum(), 1 - rho**steps, rtol=1e-5)
        mean_age = (age * w).sum() / w.sum()
        expected_age = rho / (1 - rho) - steps * rho**steps / (1 - rho**steps)
        np.testing.assert_allclose(mean_age, expected_age, rtol=1e-4)
        np.testing.assert_allclose(mean_age + 1, 1 / (1 - rho), rtol=1e-4)
