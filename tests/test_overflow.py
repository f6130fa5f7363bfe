"""Finite in, finite out beyond the square's range, and the lines a wrong edit would break.

The saturation rule (docs' numerics page, ``rmsprop_jax._numerics``): every value leaves a
transform through a saturating cast, so a gradient whose square overflows leaves ``nu`` at
the largest finite value ``F`` of its dtype and gets the update ``g / sqrt(F + eps)``.
Expected values are closed forms evaluated in float64 NumPy (or Python floats), never the
library's own output; each test says which.

The last section holds one test per one-line change that the rest of the suite did not
notice (issue "Finite in, finite out, for every finite input", point 3); each was checked
by making the change, seeing the test fail, and restoring the line.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _numerics, presets

F32 = float(np.finfo(np.float32).max)
F64 = float(np.finfo(np.float64).max)

QUANTIZED = rmsprop_jax.quantized(min_size=0, block_size=4)

# Every variant of the transforms and every preset, built with decay 0.9 where it has one.
VARIANTS = {
    "rms-in": lambda: rmsprop_jax.scale_by_rms(0.9, 1e-8),
    "rms-out": lambda: rmsprop_jax.scale_by_rms(0.9, 1e-8, eps_in_sqrt=False),
    "rms-bc": lambda: rmsprop_jax.scale_by_rms(0.9, 1e-8, bias_correction=True),
    "rms-chain-bc": lambda: optax.chain(
        rmsprop_jax.scale_by_rms(0.9, 1e-8), rmsprop_jax.bias_correction(0.9)
    ),
    "centered-in": lambda: rmsprop_jax.scale_by_centered_rms(0.9, 1e-8),
    "centered-out-bc": lambda: rmsprop_jax.scale_by_centered_rms(
        0.9, 1e-8, eps_in_sqrt=False, bias_correction=True
    ),
    "rmsprop-momentum": lambda: rmsprop_jax.rmsprop(0.1, momentum=0.9),
    "rmsprop-full": lambda: rmsprop_jax.rmsprop(
        0.1, centered=True, momentum=0.9, nesterov=True, bias_correction=True
    ),
    "rmsprop-lr-out": lambda: rmsprop_jax.rmsprop(
        0.1, centered=True, momentum=0.9, learning_rate_in_momentum=False
    ),
    "pytorch": lambda: presets.pytorch(momentum=0.9, weight_decay=0.01),
    "pytorch-centered": lambda: presets.pytorch(centered=True, momentum=0.9),
    "keras-centered": lambda: presets.keras(centered=True, momentum=0.9),
    "tf1": lambda: presets.tf1(0.1, momentum=0.9),
    "sonnet2": lambda: presets.sonnet2(0.1, centered=True),
    "graves2013": lambda: presets.graves2013(),
    "dqn2015": lambda: presets.dqn2015(),
    "lasagne": lambda: presets.lasagne(),
    "caffe": lambda: presets.caffe(0.1),
    # 8-bit state, one block holding 3e38 and 1 (QUANTIZED: every leaf, blocks of 4).
    "rms-quantized": lambda: rmsprop_jax.scale_by_rms(0.9, 1e-8, nu_dtype=QUANTIZED),
    "rmsprop-full-quantized": lambda: rmsprop_jax.rmsprop(
        0.1,
        centered=True,
        momentum=0.9,
        nesterov=True,
        bias_correction=True,
        nu_dtype=QUANTIZED,
        mu_dtype=QUANTIZED,
        momentum_dtype=QUANTIZED,
    ),
}

# The issue's gradient: three elements whose square overflows float32, one that does not.
ISSUE_GRADIENT = [3e38, -1e30, 2e19, 1.0]


def _inexact_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _run(tx, grads, jit):
    """Applies ``tx`` to a list of gradients from zero parameters; returns updates, states."""
    params = jnp.zeros_like(grads[0])
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    updates, states = [], []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
        states.append(state)
    return updates, states


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "complex64"])
def test_overflowing_squares_give_finite_nonzero_updates_and_state(name, dtype, jit):
    # Three steps of the issue's gradient, then two steps of a unit gradient: updates and
    # state stay finite, keep the gradient dtype, and no element with a nonzero gradient
    # gets a zero update (before the fix: nu = inf froze them at 0, or NaN).
    values = np.asarray(ISSUE_GRADIENT)
    if dtype == "complex64":
        values = values * np.exp(1j * np.array([0.3, 1.2, 2.5, 4.0]))
    big = jnp.asarray(values.astype(jnp.dtype(dtype)))
    grads = [big, big, big, jnp.ones_like(big), jnp.ones_like(big)]
    updates, states = _run(VARIANTS[name](), grads, jit)
    chex.assert_trees_all_equal_dtypes(updates, grads)
    for t, (u, state) in enumerate(zip(updates, states)):
        chex.assert_tree_all_finite(_inexact_leaves(state))
        chex.assert_tree_all_finite(u)
        assert np.all(np.asarray(jnp.abs(u)) > 0), f"step {t + 1}: a zero update {u}"


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_saturated_nu_gives_g_over_root_of_the_maximum(eps_in_sqrt):
    # Closed form with decay 0.9, eps 1e-8 from nu_0 = 0: nu_1 = min(0.1 g^2, F), and the
    # update is g / sqrt(nu_1 + eps) (or g / (sqrt(nu_1) + eps)). |g| = 3e38 and 1e30
    # square beyond F (nu_1 = F); 1e18 does not (nu_1 = 1e35).
    g = np.array([3e38, -1e30, 1e18, 1.0])
    tx = rmsprop_jax.scale_by_rms(0.9, 1e-8, eps_in_sqrt=eps_in_sqrt)
    u, state = jax.jit(tx.update)(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(4)))
    nu = np.minimum(0.1 * g**2, F32)
    denom = np.sqrt(nu + 1e-8) if eps_in_sqrt else np.sqrt(nu) + 1e-8
    np.testing.assert_allclose(np.asarray(state.nu, np.float64), nu, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u, np.float64), g / denom, rtol=1e-6)
    # nu decays back into range: after k unit gradients it is 0.9^k F + (1 - 0.9^k).
    for _ in range(3):
        u, state = jax.jit(tx.update)(jnp.ones(4), state)
    np.testing.assert_allclose(float(state.nu[0]), 0.9**3 * F32 + (1 - 0.9**3), rtol=1e-6)
    np.testing.assert_allclose(float(u[0]), 1 / math.sqrt(0.9**3 * F32), rtol=1e-6)


def test_saturated_nu_in_float64_at_its_own_limit():
    # The same closed form for float64 with x64: g = 1e300 squares beyond float64's max.
    with jax.enable_x64(True):
        g = np.array([1e300, -1e200, 1.0])
        tx = rmsprop_jax.rmsprop(1.0, 0.9, 1e-8, centered=True, momentum=0.5)
        u, state = jax.jit(tx.update)(jnp.asarray(g), tx.init(jnp.zeros(3)))
        assert u.dtype == jnp.float64
        chex.assert_tree_all_finite((u, _inexact_leaves(state)))
        # Saturated nu: the centered step divides by nu = F64 (an upper bound of the
        # variance); the learning rate is 1 and the momentum buffer starts at 0.
        np.testing.assert_allclose(np.asarray(u[:2]), -g[:2] / math.sqrt(F64), rtol=1e-12)


def test_centered_mean_is_brought_within_the_bound_after_saturation():
    # After a saturating step, |mu| <= sqrt(w nu) (w = 1 - 0.9 = 0.1), so the next
    # variance, 0.9 F + 0.1 - (0.9 sqrt(0.1 F) + 0.1)^2 ~ 0.819 F, is positive and the
    # update 1 / sqrt(variance) is tiny; without the bound, mu = 3e37 gives |mu|^2 = inf,
    # a variance clamped to 0, and an update 1 / sqrt(eps) = 1e4 for ~800 steps.
    tx = rmsprop_jax.scale_by_centered_rms(0.9, 1e-8)
    _, state = tx.update(jnp.asarray([3e38], jnp.float32), tx.init(jnp.zeros(1)))
    np.testing.assert_allclose(float(state.mu[0]), math.sqrt(0.1 * F32), rtol=1e-6)
    u, _ = tx.update(jnp.ones(1), state)
    variance = 0.9 * F32 + 0.1 - (0.9 * math.sqrt(0.1 * F32) + 0.1) ** 2
    np.testing.assert_allclose(float(u[0]), 1 / math.sqrt(variance), rtol=1e-5)


def test_huge_eps_saturates_the_denominator():
    # eps = 3e38 inside the root: with g = 3e19, 0.1 g^2 + eps = 9e37 + 3e38 overflows
    # float32 and saturates, so the update is g / sqrt(F) (closed form), never g / inf = 0.
    # (Outside the root sqrt(nu) <= sqrt(F) ~ 1.8e19 is far below half an ulp of F, so
    # sqrt(nu) + eps cannot overflow for any finite eps.)
    g = jnp.asarray([3e19, 1.0], jnp.float32)
    tx = rmsprop_jax.scale_by_rms(0.9, 3e38)
    u, _ = tx.update(g, tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(float(u[0]), 3e19 / math.sqrt(F32), rtol=1e-6)
    np.testing.assert_allclose(float(u[1]), 1 / math.sqrt(3e38 + 0.1), rtol=1e-6)


@pytest.mark.parametrize("centered", [False, True])
def test_bias_corrected_moment_beyond_the_range_saturates(centered):
    # nu_0 = 3e38 (initial_scale), decay 0.99, unit gradients: nu_2 ~ 0.98 * 3e38 and
    # w_2 = 1 - 0.99^2 = 0.0199, so nu_2 / w_2 ~ 1.5e40 is beyond float32 and the debiased
    # nu saturates at F: the update is 1 / sqrt(F) (closed form), not 1 / inf = 0.
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(0.99, 1e-8, initial_scale=3e38, bias_correction=True)
    updates, _ = _run(tx, [jnp.ones(1), jnp.ones(1)], jit=True)
    np.testing.assert_allclose(float(updates[1][0]), 1 / math.sqrt(F32), rtol=1e-6)


def test_non_finite_gradients_nan_poisons_its_element_infinity_saturates():
    # Documented in the numerics page (closed forms, F = float32's largest finite value):
    # * NaN enters nu (and mu) and stays there: that element's updates are NaN forever;
    # * +-inf is beyond the range like any finite overflow: nu = min(0.1 inf, F) = F, the
    #   update inf / sqrt(F) saturates at +-F; the next unit gradient gets 1 / sqrt(0.9 F);
    # * centered: mu saturates, then is brought within |mu| <= sqrt(w nu) = sqrt(0.1 F),
    #   so the next variance is 0.9 F + 0.1 - (0.9 sqrt(0.1 F) + 0.1)^2 ~ 0.819 F > 0;
    # * other elements, the count and the decay product are untouched.
    big = float(np.finfo(np.float32).max)
    g = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])
    ones = jnp.ones(4)
    plain = rmsprop_jax.scale_by_rms(0.9, 1e-8)
    u1, s1 = plain.update(g, plain.init(jnp.zeros(4)))
    u2, s2 = plain.update(ones, s1)
    np.testing.assert_allclose(np.asarray(u1[0]), 1 / math.sqrt(0.1 + 1e-8), rtol=1e-6)
    assert np.isnan(float(u1[1]))
    np.testing.assert_array_equal(np.asarray(u1[2:]), [big, -big])
    np.testing.assert_allclose(float(s1.nu[0]), 0.1, rtol=1e-6)
    assert np.isnan(float(s1.nu[1]))
    np.testing.assert_array_equal(np.asarray(s1.nu[2:]), [big, big])
    assert np.isnan(float(u2[1]))
    np.testing.assert_allclose(np.asarray(u2[2:]), 1 / math.sqrt(0.9 * big), rtol=1e-6)
    assert np.isfinite(float(u2[0])) and int(s2.count) == 2
    np.testing.assert_allclose(float(s2.total_weight), 1 - 0.81, rtol=1e-6)

    centered = rmsprop_jax.scale_by_centered_rms(0.9, 1e-8)
    v1, c1 = centered.update(g, centered.init(jnp.zeros(4)))
    v2, _ = centered.update(ones, c1)
    np.testing.assert_array_equal(np.asarray(v1[2:]), [big, -big])
    np.testing.assert_allclose(
        np.asarray(c1.mu)[2:], [math.sqrt(0.1 * big), -math.sqrt(0.1 * big)], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(c1.nu)[2:], [big, big])
    variance = 0.9 * big + 0.1 - (0.9 * math.sqrt(0.1 * big) + 0.1) ** 2
    np.testing.assert_allclose(np.asarray(v2[2:]), 1 / math.sqrt(variance), rtol=1e-5)
    assert np.isnan(float(v2[1])) and np.isfinite(float(v2[0]))

    # A float16 nu saturates at its own maximum.
    narrow = rmsprop_jax.scale_by_rms(0.9, 1e-8, nu_dtype="float16")
    _, n1 = narrow.update(g, narrow.init(jnp.zeros(4)))
    np.testing.assert_array_equal(np.asarray(n1.nu, np.float32)[2:], [65504.0, 65504.0])
    assert np.isnan(float(n1.nu[1]))


# --- one test per one-line change the suite missed ------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
def test_decay_one_with_bias_correction_divides_by_one(centered):
    # decay 1: no sample is ever absorbed, w = 1 - 1^t = 0 at every step, and debias must
    # divide by 1: nu stays at initial_scale = 4 and (mu = 0) the update is
    # g / sqrt(4 + eps) (closed form). A divisor other than 1 (e.g. 1e-3) changes it.
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(1.0, 1e-8, initial_scale=4.0, bias_correction=True)
    g = jnp.asarray([3.0, -1.0], jnp.float32)
    updates, _ = _run(tx, [g, g, g], jit=True)
    for u in updates:
        np.testing.assert_allclose(np.asarray(u), np.asarray(g) / math.sqrt(4 + 1e-8), rtol=1e-6)
    # The chained correction multiplies by sqrt(w) / ... = 1 while w = 0.
    chain = optax.chain(rmsprop_jax.scale_by_rms(1.0, 0.0, initial_scale=4.0))
    chain = optax.chain(chain, rmsprop_jax.bias_correction(1.0))
    u, _ = chain.update(g, chain.init(jnp.zeros(2)))
    np.testing.assert_allclose(np.asarray(u), np.asarray(g) / 2.0, rtol=1e-6)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_quotient_beyond_the_range_saturates(eps_in_sqrt):
    # decay 1 keeps nu = 0, so the update is g / sqrt(eps) or g / eps: with g = 1e10 and
    # eps = 1e-30 that is 1e25 (fits) or 1e40 (beyond float32: saturates at F, not inf).
    tx = rmsprop_jax.scale_by_rms(1.0, 1e-30, eps_in_sqrt=eps_in_sqrt)
    u, _ = jax.jit(tx.update)(jnp.asarray([1e10, -1e10], jnp.float32), tx.init(jnp.zeros(2)))
    expected = 1e10 / (math.sqrt(1e-30) if eps_in_sqrt else 1e-30)
    np.testing.assert_allclose(np.asarray(u, np.float64), [min(expected, F32), -min(expected, F32)])


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("centered", [False, True])
def test_subnormal_eps_with_zero_state_gives_zero_not_nan(centered, eps_in_sqrt):
    # eps = 1e-45 is subnormal in float32, and XLA:CPU flushes it to zero: with nu = 0 and
    # g = 0 the denominator is 0, and 0 / 0 must give the 0 of the zero-denominator rule.
    # (A concrete eps counts as keeping the denominator positive only from float32's
    # smallest normal number up: _numerics.root_quotient.)
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(0.9, 1e-45, eps_in_sqrt=eps_in_sqrt)
    u, _ = jax.jit(tx.update)(jnp.zeros(2, jnp.float32), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(np.asarray(u), [0.0, 0.0])


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_learning_rate_above_one_saturates_the_product(momentum):
    # The first update of scale_by_rms (decay 0.9, nu_0 = 0) is g / sqrt(0.1 g^2) = sqrt(10)
    # times sign(g), so a learning rate of 3e38 makes -9.5e38, beyond float32: it must
    # saturate at -F, not become -inf (the product's clip is left out only for a learning
    # rate of magnitude at most 1, _numerics.is_contraction).
    tx = rmsprop_jax.rmsprop(3e38, 0.9, 0.0, momentum=momentum)
    u, _ = jax.jit(tx.update)(jnp.ones(2, jnp.float32), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(np.asarray(u, np.float64), [-F32, -F32])


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_variance_is_clamped_not_reflected(dtype):
    # A state with nu < |mu|^2 (rounding makes it, or a hand-built state): the variance
    # is max(nu - |mu|^2, 0) = 0, not |nu - |mu|^2| = 3.
    nu = jnp.asarray([1.0, 5.0], jnp.float32)
    mu = jnp.asarray([2.0, 1.0], dtype)
    np.testing.assert_array_equal(np.asarray(_numerics.variance(nu, mu)), [0.0, 4.0])


def test_stored_bfloat16_is_unbiased_and_its_bits_spread():
    # x lies 1/4 of the way between two bfloat16 neighbours (1 and 1 + 2^-7): stored with
    # stochastic rounding, the mean over 65536 elements is x within 5 standard errors
    # (Bernoulli(1/4) on a gap of 2^-7), and both neighbours occur. Rounding with constant
    # bits would give one value for all elements (a bias of -x/4 ulp or +3/4 ulp).
    n = 1 << 16
    gap = 2.0**-7
    x = jnp.full((n,), 1 + gap / 4, jnp.float32)
    stored = np.asarray(_numerics.store(x, jnp.bfloat16, jnp.asarray(3, jnp.int32), 11))
    values = stored.astype(np.float64)
    assert set(np.unique(values)) == {1.0, 1.0 + gap}
    se = gap * math.sqrt(0.25 * 0.75 / n)
    assert abs(values.mean() - (1 + gap / 4)) < 5 * se
    # Different counts draw different bits: a step's rounding is not the previous one's.
    again = np.asarray(_numerics.store(x, jnp.bfloat16, jnp.asarray(4, jnp.int32), 11))
    assert np.mean(again != stored) > 0.2
