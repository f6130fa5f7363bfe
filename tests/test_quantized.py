"""8-bit block-wise quantized state (``rmsprop_jax.quantized``).

The storage format on its own: the round trip against a float64 NumPy reference written
from the docstring's maps (``float``: unsigned, the values in [2^-8, 1] with four bits after
the leading one and the largest below 2^-8 with three, 255 in all; signed, the 127 largest
values in (0, 1] with three bits; and zero; ``linear``: k/255 or k/127), unbiased stochastic
rounding, no zero for a positive nu, the block layout, validation, and the leaf as a
pytree. Then the transforms with quantized state: the update bound, small increments,
the non-stationary recovery, and training.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import log_uniform

import rmsprop_jax
from rmsprop_jax import _numerics, _quantized

# --- the float64 reference of the maps -------------------------------------------------------


def reference_map(code_map: str, signed: bool) -> np.ndarray:
    """The values of code magnitudes 0 .. top, ascending, in float64 (from the docstring)."""
    top = 127 if signed else 255
    if code_map == "linear":
        return np.arange(top + 1) / top
    # (1 + k/8) 2^e for e <= -1 and 1.0; unsigned, (1 + k/16) 2^e for -8 <= e <= -1
    # instead of (1 + k/8) 2^e there. The largest `top` of them, and zero.
    values = [(1 + k / 8) * 2.0**e for e in range(-70, 0) for k in range(8)] + [1.0]
    if not signed:
        values = [v for v in values if v < 2.0**-8]
        values += [(1 + k / 16) * 2.0**e for e in range(-8, 0) for k in range(16)] + [1.0]
    values = np.sort(np.asarray(values))[-top:]
    return np.concatenate([[0.0], values])


def reference_neighbours(x: np.ndarray, scale: np.ndarray, table: np.ndarray):
    """For |x| / scale, the table's values just below and above it (times the scale)."""
    y = np.where(scale > 0, np.abs(x) / np.where(scale > 0, scale, 1), 0.0)
    hi_index = np.clip(np.searchsorted(table, y, side="left"), 0, len(table) - 1)
    lo_index = np.where(table[hi_index] == y, hi_index, np.maximum(hi_index - 1, 0))
    return table[lo_index] * scale, table[hi_index] * scale


def block_max(x: np.ndarray, block_size: int) -> np.ndarray:
    """Each element's block scale (the largest magnitude of its block), float64."""
    length = x.shape[-1]
    blocks = -(-length // block_size)
    padded = np.zeros((*x.shape[:-1], blocks * block_size))
    padded[..., :length] = np.abs(x)
    scales = padded.reshape(*x.shape[:-1], blocks, block_size).max(-1)
    return np.repeat(scales, block_size, axis=-1)[..., :length]


def random_values(signed: bool, shape=(3, 700), seed=0) -> np.ndarray:
    """float32 values with magnitudes log-uniform over 1e-6 .. 1e4, some exact zeros."""
    rng = np.random.default_rng(seed)
    x = log_uniform(rng, 1e-6, 1e4, shape)
    x[rng.random(shape) < 0.05] = 0.0
    return (x if signed else np.abs(x)).astype(np.float32)


def bits_for(shape, count: int, salt: int = 7) -> jax.Array:
    return jax.random.bits(jax.random.key(count * 1000 + salt), shape, jnp.uint32)


@pytest.mark.parametrize("code_map", ["float", "linear"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_round_trip_lands_on_a_neighbouring_code(code_map, signed, stochastic):
    # Each decoded value is one of the two map values (times its block's scale) around
    # |x| / scale: the nearer one when rounding to nearest. Per block this bounds the
    # error by one gap (half a gap to nearest): for the float map a relative 2^-4
    # (unsigned from 2^-8 of the scale up) or 2^-3, for the linear map scale / 255 (or
    # / 127), and for the unsigned map a positive x below the smallest code goes up to it.
    block_size = 256
    fmt = rmsprop_jax.quantized(block_size=block_size, code_map=code_map)
    x = random_values(signed)
    bits = bits_for(x.shape, 3) if stochastic else None
    leaf = _quantized.quantize(jnp.asarray(x), fmt, signed=signed, bits=bits)
    assert leaf.codes.dtype == (jnp.int8 if signed else jnp.uint8)
    assert leaf.codes.shape == x.shape and leaf.scales.shape == (3, 3)  # 700 = 256 + 256 + 188
    decoded = np.asarray(rmsprop_jax.dequantize(leaf, code_map), np.float64)
    x64 = x.astype(np.float64)
    scale = block_max(x64, block_size)
    np.testing.assert_array_equal(np.asarray(leaf.scales), scale[:, ::block_size])
    table = reference_map(code_map, signed)
    lo, hi = reference_neighbours(x64, scale, table)
    if not signed:
        lo = np.where(x64 > 0, np.maximum(lo, table[1] * scale), lo)  # never zero
        hi = np.maximum(hi, lo)
    magnitude = np.abs(decoded)
    tol = 1e-6 * scale
    on_lo = np.abs(magnitude - lo) <= tol
    on_hi = np.abs(magnitude - hi) <= tol
    assert np.all(on_lo | on_hi), np.argwhere(~(on_lo | on_hi))[:5]
    assert np.all((np.sign(decoded) == np.sign(x64)) | (decoded == 0))
    if not stochastic:
        nearer_hi = np.abs(hi - np.abs(x64)) < np.abs(np.abs(x64) - lo) - 2 * tol
        nearer_lo = np.abs(np.abs(x64) - lo) < np.abs(hi - np.abs(x64)) - 2 * tol
        if not signed:
            nearer_lo &= lo > 0
        assert not np.any(nearer_hi & on_lo & ~on_hi)
        assert not np.any(nearer_lo & on_hi & ~on_lo)
    # The bounds stated in the docstring, per element.
    error = np.abs(decoded - x64)
    if code_map == "float":
        covered = np.abs(x64) >= table[1] * scale
        fine = (not signed) & (np.abs(x64) >= 2.0**-8 * scale)
        gap = np.where(fine, 2.0**-4, 2.0**-3)
        bound = (gap if stochastic else gap / 2) * np.abs(x64)
        assert np.all(error[covered] <= bound[covered] * (1 + 1e-6))
    else:
        gap = scale / (127 if signed else 255)
        covered = np.abs(x64) >= (gap if not signed else 0)
        bound = gap if stochastic else gap / 2
        assert np.all(error[covered] <= bound[covered] * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("code_map", ["float", "linear"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_stochastic_rounding_is_unbiased(code_map, signed):
    # Values spread between codes (and, signed, below the smallest code): the mean of the
    # decoded values over 64 rounding draws of 4096 elements is the value, within 5
    # standard errors of the Bernoulli rounding (gap^2 / 4 per draw at most).
    rng = np.random.default_rng(1)
    base = rng.uniform(1e-6, 1.0, 64)
    base[0] = 1.0  # the block's scale: exact
    if signed:
        base[1:8] = rng.uniform(1e-7, 1.5e-5, 7)  # below the signed map's smallest code
    x = np.tile(base, (64, 1)).astype(np.float32)  # 64 rows: one block each
    fmt = rmsprop_jax.quantized(block_size=64, code_map=code_map)

    @jax.jit
    def mean_over_draws(x):
        def one(count):
            bits = _rounding_bits(x.shape, count)
            return rmsprop_jax.dequantize(
                _quantized.quantize(x, fmt, signed=signed, bits=bits), code_map
            )

        return jnp.mean(jax.vmap(one)(jnp.arange(64)), axis=(0, 1))

    mean = np.asarray(mean_over_draws(jnp.asarray(x)), np.float64)
    x64 = x[0].astype(np.float64)
    table = reference_map(code_map, signed)
    lo, hi = reference_neighbours(x64, np.ones_like(x64), table)
    n = 64 * 64
    se = (hi - lo) / 2 / math.sqrt(n)
    covered = x64 >= (table[1] if not signed else 0)  # unsigned below the range: rounds up
    assert np.all(np.abs(mean - x64)[covered] <= 5 * se[covered] + 1e-9)


def _rounding_bits(shape, count):
    from rmsprop_jax import _rounding

    return _rounding.random_bits(shape, count, 5)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_positive_nu_never_decodes_to_zero_in_a_mixed_block(stochastic):
    # A block mixing 1e-8 and 1e4 (a ratio of 1e12, beyond the map's 1.4e7) and the extremes
    # of float32: every positive value decodes to a positive value, exact zeros to 0.
    x = np.full((2, 256), 1e-8, np.float32)
    x[:, ::2] = 1e4
    x[1, 3] = 0.0
    x[1, 5] = 1.2e-38  # about the smallest normal, in a block whose scale is 1e4
    fmt = rmsprop_jax.quantized(block_size=256, stochastic_rounding=stochastic)
    how = _quantized.LeafStorage(fmt, signed=False)
    leaf = _numerics.store(jnp.asarray(x), how, jnp.asarray(2, jnp.int32), 3)
    decoded = np.asarray(rmsprop_jax.dequantize(leaf))
    assert np.all(decoded[x > 0] > 0)
    assert decoded[1, 3] == 0.0
    # A block whose scale times the smallest code underflows (XLA:CPU flushes subnormals).
    tiny = jnp.asarray([[2e-38] * 4 + [1e-20] * 4])
    leaf = _numerics.store(tiny, how, jnp.asarray(1, jnp.int32), 3)
    assert np.all(np.asarray(rmsprop_jax.dequantize(leaf)) > 0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=4), "`bits` must be one of (8,), got 4"),
        (dict(bits=True), "`bits`"),
        (dict(block_size=100), "`block_size` must be a positive power of two, got 100"),
        (dict(block_size=0), "`block_size`.*got 0"),
        (dict(block_size=256.0), "`block_size`.*256.0"),
        (dict(min_size=-1), "`min_size` must be a non-negative integer, got -1"),
        (dict(stochastic_rounding=1), "`stochastic_rounding` must be True or False, got 1"),
        (dict(code_map="log"), "`code_map` must be one of .*'log'"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rmsprop_jax.quantized(**kwargs)


def test_format_is_immutable_and_hashable():
    a, b = rmsprop_jax.quantized(), rmsprop_jax.quantized(block_size=256)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != rmsprop_jax.quantized(stochastic_rounding=False)
    with pytest.raises(AttributeError):
        a.block_size = 128  # type: ignore[misc]


def test_block_size_of_a_leaf_follows_from_its_shapes():
    # dequantize needs no format: the power-of-two block size is recovered from the codes'
    # last axis and the number of blocks.
    for length in (1, 5, 64, 255, 256, 257, 700, 1024):
        for block_size in (1, 2, 8, 64, 256, 512):
            blocks = -(-length // block_size)
            derived = _quantized._block_size_of(length, blocks)
            assert -(-length // derived) == blocks
            if blocks > 1:
                assert derived == block_size


def test_leaves_below_min_size_and_complex_ones_keep_the_policy_dtype():
    fmt = rmsprop_jax.quantized(min_size=64)
    tx = rmsprop_jax.rmsprop(
        0.1, centered=True, momentum=0.9, nu_dtype=fmt, mu_dtype=fmt, momentum_dtype=fmt
    )
    params = {
        "big": jnp.zeros((8, 8)),
        "small": jnp.zeros(63),
        "half": jnp.zeros((8, 8), jnp.bfloat16),
        "complex": jnp.zeros((8, 8), jnp.complex64),
        "scalar": jnp.zeros(()),
    }
    state = tx.init(params)
    nu, mu = optax.tree.get(state, "nu"), optax.tree.get(state, "mu")
    trace = optax.tree.get(state, "trace")
    for stat in (nu, mu, trace):
        assert isinstance(stat["big"], rmsprop_jax.QuantizedArray)
        assert isinstance(stat["half"], rmsprop_jax.QuantizedArray)
        assert stat["small"].dtype == jnp.float32 and stat["scalar"].dtype == jnp.float32
    assert isinstance(nu["complex"], rmsprop_jax.QuantizedArray)  # nu is real
    assert mu["complex"].dtype == jnp.complex64 and trace["complex"].dtype == jnp.complex64
    assert nu["big"].codes.dtype == jnp.uint8 and mu["big"].codes.dtype == jnp.int8
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, new_state = jax.jit(tx.update)(grads, state)
    chex.assert_trees_all_equal_dtypes(updates, grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    chex.assert_tree_all_finite(updates)


def test_quantized_leaf_is_a_pytree_and_serializes():
    serialization = pytest.importorskip("flax.serialization")
    fmt = rmsprop_jax.quantized(min_size=0, block_size=4)
    tx = rmsprop_jax.rmsprop(0.1, centered=True, nu_dtype=fmt, mu_dtype=fmt)
    params = {"w": jnp.zeros((3, 6))}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.arange(18.0).reshape(3, 6)}, state)
    nu = optax.tree.get(state, "nu")["w"]
    assert isinstance(nu, rmsprop_jax.QuantizedArray)
    assert nu.scales.shape == (3, 2) and nu.shape == (3, 6)
    # jax.tree sees two arrays per quantized leaf.
    leaves = jax.tree.leaves(state)
    assert sum(leaf.dtype == jnp.uint8 for leaf in leaves) == 1
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored, state)
    as_dict = serialization.to_state_dict(state)
    assert set(as_dict["0"]["nu"]["w"]) == {"codes", "scales"}
    # jit, vmap and device_get take the state as a tree.
    chex.assert_trees_all_equal(jax.jit(lambda s: s)(state), state)


def test_block_maxima_and_zeros_are_stored_exactly():
    # Decay 0.9 from 0: nu = 0.1 g^2. A block's largest value is its scale (code 1.0) and
    # zeros are code 0, so blocks of equal values and zeros come back exactly as float32.
    fmt = rmsprop_jax.quantized(min_size=0, block_size=8)
    g = jnp.asarray([[1.0] * 8, [2.0] * 4 + [0.0] * 4])
    exact = rmsprop_jax.scale_by_rms(0.9, 0.0)
    tx = rmsprop_jax.scale_by_rms(0.9, 0.0, nu_dtype=fmt)
    _, state = tx.update(g, tx.init(jnp.zeros((2, 8))))
    _, expected = exact.update(g, exact.init(jnp.zeros((2, 8))))
    np.testing.assert_array_equal(np.asarray(rmsprop_jax.dequantize(state.nu)), expected.nu)


@pytest.mark.parametrize("code_map", ["float", "linear"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_every_block_maximum_gets_the_top_code_at_any_scale(code_map, signed, stochastic):
    # The coding multiplies by a per-block reciprocal instead of dividing: the largest
    # element of every block must still decode to itself exactly, including blocks whose
    # scale is near float32's largest value (1 / scale is subnormal there, which XLA:CPU
    # flushes to zero) and small ones (all elements normal: XLA:CPU treats subnormal inputs
    # as zero); the other elements stay within the map's bounds.
    rng = np.random.default_rng(3)
    rows = 512
    exponents = np.concatenate([rng.uniform(-35.5, 38.5, rows - 3), [38.53, 38.5, -35.7]])
    scale = (10.0**exponents).astype(np.float32)
    scale[0] = np.finfo(np.float32).max
    x = scale[:, None] * rng.uniform(0.02, 1.0, (rows, 64)).astype(np.float32)
    column = rng.integers(0, 64, rows)
    x[np.arange(rows), column] = scale  # each block's maximum, at a random place
    if signed:
        x[:, ::2] *= -1
    fmt = rmsprop_jax.quantized(block_size=64, code_map=code_map)
    bits = bits_for(x.shape, 5) if stochastic else None
    leaf = _quantized.quantize(jnp.asarray(x), fmt, signed=signed, bits=bits)
    np.testing.assert_array_equal(np.asarray(leaf.scales)[:, 0], scale)
    decoded = np.asarray(rmsprop_jax.dequantize(leaf, code_map))
    np.testing.assert_array_equal(decoded[np.arange(rows), column], x[np.arange(rows), column])
    error = np.abs(decoded.astype(np.float64) - x) / np.abs(x.astype(np.float64))
    # The smallest element is 0.02 of its block's scale: a relative 2^-4 (float map,
    # unsigned: above 2^-8 of the scale), 2^-3 (signed) or (1/127) / 0.02 (linear, signed)
    # at most.
    assert np.all(np.isfinite(decoded))
    float_gap = 2.0**-3 if signed else 2.0**-4
    assert error.max() <= (float_gap if code_map == "float" else (1 / 127) / 0.02) * (1 + 1e-6)
    if stochastic:
        # All-zero random bits round every fraction up: a block maximum whose y = |x| * r is
        # an ulp above 1 (most scales: r is 1 / scale rounded up) must still get the top code.
        zeros = jnp.zeros(x.shape, jnp.uint32)
        leaf = _quantized.quantize(jnp.asarray(x), fmt, signed=signed, bits=zeros)
        decoded = np.asarray(rmsprop_jax.dequantize(leaf, code_map))
        np.testing.assert_array_equal(decoded[np.arange(rows), column], x[np.arange(rows), column])


# --- the transforms with quantized state ------------------------------------------------------

Q = rmsprop_jax.quantized(min_size=0)  # every leaf quantized, blocks of 256
Q_NEAREST = rmsprop_jax.quantized(min_size=0, stochastic_rounding=False)
# The stated bound: with stochastic rounding and a decay up to 0.999, no element's update
# exceeds its float32-state update by more than this factor (measured: 1.29 at decay 0.9,
# 1.62 at 0.999, over 4096 elements and 3000 steps of the drifting gradients below).
UPDATE_BOUND = 2.0


def scaled_updates(nu_dtype, decay: float, steps: int, gradient, size: int, **kwargs):
    """The scaled gradients of ``scale_by_rms`` over ``steps`` steps of ``gradient(t)``."""
    tx = rmsprop_jax.scale_by_rms(decay, 1e-8, nu_dtype=nu_dtype, **kwargs)

    def body(state, t):
        u, state = tx.update(gradient(t), state)
        return state, u

    return np.asarray(
        jax.jit(lambda: jax.lax.scan(body, tx.init(jnp.zeros(size)), jnp.arange(steps))[1])()
    )


def drifting_gradient(size: int, seed: int = 0):
    """Gaussian gradients whose scale per element is log-uniform over 1e-2 .. 1e2 (so a
    block spans 1e8 in nu) and whose overall scale drifts by 10x up and down."""
    scale = jnp.asarray(10.0 ** np.random.default_rng(seed).uniform(-2, 2, size), jnp.float32)
    key = jax.random.key(seed)

    def gradient(t):
        noise = jax.random.normal(jax.random.fold_in(key, t), (size,))
        return scale * noise * 10.0 ** jnp.sin(t.astype(jnp.float32) / 300.0)

    return gradient


@pytest.mark.parametrize("decay", [0.9, pytest.param(0.999, marks=pytest.mark.slow)])
def test_no_update_exceeds_the_float32_update_by_more_than_the_bound(decay):
    size, steps = 4096, 3000
    gradient = drifting_gradient(size)
    exact = np.abs(scaled_updates(None, decay, steps, gradient, size))
    quantized = np.abs(scaled_updates(Q, decay, steps, gradient, size))
    chex.assert_tree_all_finite(quantized)
    ratio = quantized / np.maximum(exact, 1e-30)
    assert ratio.max() <= UPDATE_BOUND, ratio.max()
    # And typically the two agree: the median element is within 3%.
    assert abs(np.median(ratio) - 1) < 0.03


def test_small_increments_survive_with_stochastic_rounding():
    # nu starts at 1 (initial_scale) and moves towards g^2 in 1 .. 4 with decay 0.999:
    # closed form nu_t = 0.999^t + (1 - 0.999^t) g^2. Each step moves nu by 0.1% of the
    # distance, far below a code's gap (up to 12.5%); the block's largest element is its
    # scale (stored exactly), the others move relative to it.
    size, steps = 4096, 1500
    level = np.linspace(1.0, 2.0, 256)[np.arange(size) % 256]
    g = jnp.asarray(level, jnp.float32)
    kwargs = dict(initial_scale=1.0)
    u_sr = scaled_updates(Q, 0.999, steps, lambda t: g, size, **kwargs)[-1]
    u_rn = scaled_updates(Q_NEAREST, 0.999, steps, lambda t: g, size, **kwargs)[-1]
    weight = 0.999**steps
    expected = level / np.sqrt(weight + (1 - weight) * level**2 + 1e-8)
    np.testing.assert_allclose(np.mean(u_sr / expected), 1.0, atol=0.01)
    assert np.median(np.abs(u_sr / expected - 1)) < 0.05
    # Rounding to nearest freezes the codes where the increment is below half a gap.
    assert np.median(np.abs(u_rn / expected - 1)) > 0.1


def recovery_step(updates: np.ndarray, level: np.ndarray, start: int) -> np.ndarray:
    """Per element, the first step from ``start`` at which |update| reaches half of ``level``."""
    reached = np.abs(updates[start:]) >= 0.5 * level
    return np.where(reached.any(0), reached.argmax(0), len(updates) - start)


@pytest.mark.parametrize(
    "decay,steps", [(0.9, 300), pytest.param(0.999, 7000, marks=pytest.mark.slow)]
)
def test_non_stationary_gradient_recovery_matches_float32(decay, steps):
    # The gradient drops 100-fold after 50 steps (bias correction makes nu_hat = g^2 at
    # once). Its update falls to ~0.01 and recovers towards 1 as nu forgets the large
    # gradients: the step at which it reaches half its final size must be within 10% of
    # float32's (for float32 the same for every element). The first element of each block
    # keeps its large gradient, so the block's scale stays put while the others decay:
    # rounded to nearest, their codes freeze (at decay 0.999) and never recover.
    size, drop = 1024, 50
    scale = 10.0 ** np.random.default_rng(2).uniform(-1, 1, size)
    anchor = np.arange(size) % 256 == 0
    scale[anchor] = 10.0
    scale_j, anchor_j = jnp.asarray(scale, jnp.float32), jnp.asarray(anchor)

    def gradient(t):
        return scale_j * jnp.where((t < drop) | anchor_j, 100.0, 1.0)

    def recovery(nu_dtype):
        updates = scaled_updates(nu_dtype, decay, steps, gradient, size, bias_correction=True)
        return recovery_step(updates, 1, drop)[~anchor]

    exact, sr = recovery(None), recovery(Q)
    assert exact.max() - exact.min() <= 1 and exact.max() < steps - drop
    reference = float(np.median(exact))
    assert abs(np.median(sr) - reference) <= 0.1 * reference, (np.median(sr), reference)
    if decay == 0.999:
        assert np.median(recovery(Q_NEAREST)) > 1.1 * reference


# Every variant of rmsprop with every statistic quantized (small blocks: the test problem is
# small), on a two-layer regression.
VARIANTS = {
    "plain": dict(),
    "centered": dict(centered=True, eps=1e-6),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "bias_correction": dict(bias_correction=True),
    "decay_schedule": dict(decay=optax.linear_schedule(0.9, 0.99, 100)),
    "centered_nesterov_bias": dict(
        centered=True, momentum=0.9, nesterov=True, bias_correction=True, eps=1e-6
    ),
}
SMALL = rmsprop_jax.quantized(min_size=0, block_size=32)


def digits_problem():
    """The digits MLP (64-64-10, tanh) on scikit-learn's bundled digits: the parameters,
    a mini-batch loss and the held-out accuracy."""
    from rmsprop_jax.demo import data as demo_data

    data = demo_data.load_digits(0)
    x = jnp.asarray(data.x_train.reshape(len(data.x_train), -1))
    y = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test.reshape(len(data.x_test), -1))
    y_test = np.asarray(data.y_test)
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32),
        "b1": jnp.zeros(64, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(64, 10)) / 8, jnp.float32),
        "b2": jnp.zeros(10, jnp.float32),
    }

    def logits(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]

    def loss(p, idx):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x[idx]), y[idx]).mean()

    def accuracy(p):
        return float(np.mean(np.asarray(jnp.argmax(logits(p, x_test), -1)) == y_test))

    return params, loss, accuracy, rng.integers(0, len(x), (300, 64))


def train_losses(tx, steps=300):
    """Training losses per step of the digits MLP, and the final held-out accuracy."""
    params, loss, accuracy, batches = digits_problem()

    @jax.jit
    def run(params):
        def step(carry, idx):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params, idx)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        return jax.lax.scan(step, (params, tx.init(params)), jnp.asarray(batches[:steps]))

    (params, _), losses = run(params)
    return np.asarray(losses), accuracy(params)


def all_quantized(**kwargs):
    fmts = dict(nu_dtype=SMALL, momentum_dtype=SMALL)
    if kwargs.get("centered"):
        fmts["mu_dtype"] = SMALL
    return fmts


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_like_float32(variant):
    # The digits MLP, 300 mini-batch steps, every leaf quantized in blocks of 32. Mini-batch
    # losses are noisy, so runs are compared by where they end: the mean loss over the last
    # 50 steps within 1.1x float32's (plus 0.002), after at least a 10-fold fall, and the
    # held-out accuracy within 1 point of float32's (measured: loss ratios 0.991 .. 1.011,
    # accuracies equal or within 0.4 points).
    kwargs = dict(VARIANTS[variant])
    decay = kwargs.pop("decay", 0.9)
    learning_rate = 1e-3 if "momentum" in kwargs else 3e-3
    exact, exact_accuracy = train_losses(rmsprop_jax.rmsprop(learning_rate, decay, **kwargs))
    quantized, quantized_accuracy = train_losses(
        rmsprop_jax.rmsprop(learning_rate, decay, **kwargs, **all_quantized(**kwargs))
    )
    chex.assert_tree_all_finite(quantized)
    tail, tail_exact = quantized[-50:].mean(), exact[-50:].mean()
    assert tail < quantized[0] / 10
    assert tail <= 1.1 * tail_exact + 0.002, (tail, tail_exact)
    assert quantized_accuracy >= exact_accuracy - 0.01, (quantized_accuracy, exact_accuracy)


@pytest.mark.slow
def test_inject_hyperparams_multi_steps_and_vmap_with_quantized_state():
    fmts = all_quantized(centered=True)
    direct = rmsprop_jax.rmsprop(3e-3, 0.9, centered=True, momentum=0.9, eps=1e-6, **fmts)
    injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=3e-3, decay=0.9, centered=True, momentum=0.9, eps=1e-6, **fmts
    )
    # The same arithmetic with traced hyperparameters, compiled into another program: a
    # concrete learning rate of at most 1 needs no clip (_numerics.is_contraction), so the
    # two may round an ulp apart, and the momentum trace draws its stochastic-rounding bits
    # from its own values, so an ulp changes later draws. The losses then agree to
    # rounding noise, not bit for bit (1.7% apart at most over 20 mini-batch steps of the
    # digits MLP, measured; the gap grows with the steps, as between two float32 runs).
    np.testing.assert_allclose(
        train_losses(injected, 20)[0], train_losses(direct, 20)[0], rtol=0.05
    )
    # MultiSteps: the state (with quantized leaves) goes through its accumulation.
    multi = optax.MultiSteps(direct, every_k_schedule=2)
    with jax.numpy_dtype_promotion("standard"):  # optax's (g - acc) / (n + 1), int32 n
        losses, _ = train_losses(multi, 30)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # vmap over two parameter sets equals two separate runs.
    params = digits_problem()[0]
    stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
    grads = jax.tree.map(lambda p: jnp.cos(p), stacked)
    updates, _ = jax.jit(jax.vmap(lambda g, p: direct.update(g, direct.init(p))))(grads, stacked)
    for i in range(2):
        row = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
        single, _ = jax.jit(direct.update)(row(grads), direct.init(row(stacked)))
        chex.assert_trees_all_close(row(updates), single, rtol=1e-6)
