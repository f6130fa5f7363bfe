"""Decay schedules: bias correction by the product of the decays actually applied.

A decay given as a schedule changes every step; the bias correction then divides by one
minus the product of the decays applied (not a power of the current decay), in the
``bias_correction`` flag and in the chained ``bias_correction`` transform; the schedule
``count / (count + 1)`` makes ``nu`` the running mean of ``g^2`` (AdaGrad's accumulator
over t). Expected values come from the float64 reference loop of ``helpers``, with the
per-step decays, or from closed forms. An injected decay changed between steps is in
``test_composition.py`` (``optax.inject_hyperparams``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    reference,
    scan_updates,
    small_gradients,
)

import rmsprop_jax


def varying_decay(count):
    """A decay that changes every update: 0.5, 0.8, 0.99, 0.5, ..."""
    return jnp.asarray([0.5, 0.8, 0.99])[count % 3]


def varying_decay64(t: int) -> float:
    return [0.5, 0.8, 0.99][t % 3]


@pytest.mark.parametrize("centered", [False, True])
def test_bias_correction_uses_the_product_of_scheduled_decays(centered):
    steps = 12
    g = small_gradients(steps)
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(varying_decay, 1e-8, bias_correction=True)
    updates, states = jax.jit(scan_updates, static_argnums=0)(tx, jnp.zeros(6), g)
    ref = reference(
        list(g), decay=varying_decay64, eps=1e-8, centered=centered, bias_correction=True
    )
    np.testing.assert_allclose(
        np.asarray(states.total_weight), 1 - np.asarray(ref["product"]), rtol=1e-6
    )
    kappa = np.max(ref["condition"])
    np.testing.assert_allclose(np.asarray(updates), ref["updates"], rtol=1e-5 + 1e-6 * kappa)
    np.testing.assert_allclose(np.asarray(states.nu), ref["nu"], rtol=1e-5)
    # Discrimination: a correction by rho_t ** t (the current decay) is far off.
    t = np.arange(1, steps + 1)
    wrong = np.array([varying_decay64(i - 1) ** i for i in t])
    assert np.max(np.abs(wrong - np.asarray(ref["product"]))) > 0.1


def test_bias_correction_chain_uses_the_product_of_scheduled_decays():
    # sqrt(1 - prod rho) times the uncorrected update (float64 reference).
    steps = 12
    g = small_gradients(steps, seed=1)
    tx = optax.chain(
        rmsprop_jax.scale_by_rms(varying_decay, 0.0),
        rmsprop_jax.bias_correction(varying_decay),
    )
    updates, _ = jax.jit(scan_updates, static_argnums=0)(tx, jnp.zeros(6), g)
    ref = reference(list(g), decay=varying_decay64, eps=0.0, bias_correction=True)
    np.testing.assert_allclose(np.asarray(updates), ref["updates"], rtol=2e-5)


def test_running_mean_schedule_is_adagrad_over_t():
    # rho(count) = count / (count + 1), i.e. 1 - 1/t at update t, makes nu_t the running
    # mean of g^2 (float64 NumPy: cumulative sum / t), AdaGrad's accumulator over t: the
    # update is sqrt(t) times optax.scale_by_rss's (eps = 0, accumulator starting at 0).
    steps = 50
    g = small_gradients(steps, seed=3)
    tx = rmsprop_jax.scale_by_rms(lambda count: count / (count + 1), 0.0, initial_scale=7.0)
    adagrad = optax.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
    run = jax.jit(scan_updates, static_argnums=0)
    updates, states = run(tx, jnp.zeros(6), g)
    ada_updates, _ = run(adagrad, jnp.zeros(6), g)
    t = np.arange(1, steps + 1)[:, None]
    running_mean = np.cumsum(g.astype(np.float64) ** 2, axis=0) / t
    np.testing.assert_allclose(np.asarray(states.nu), running_mean, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(updates), np.sqrt(t) * np.asarray(ada_updates), rtol=2e-5)
