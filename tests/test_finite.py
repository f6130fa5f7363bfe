"""Finite in, finite out: edge-case gradients over thousands of steps, and random settings.

For every transform and flag combination (``helpers.CONFIGS``: ``scale_by_rms``,
``scale_by_centered_rms``, ``bias_correction`` in a chain, the ``rmsprop`` alias with
momentum and Nesterov):

* a grid of decays, eps (0 included), initial scales and momenta, run for thousands of
  steps on edge-case gradients (zeros, subnormals, the largest squarable gradient and
  beyond, bursts, cancellation), in every floating dtype, gives finite updates and state
  in the gradient's dtype, and a zero gradient always gets an exactly zero update;
* a hypothesis property over random hyperparameters, shapes, dtypes, state dtypes and
  gradient magnitudes anywhere in the dtype's range says the same.

Runs are kept fast by tracing hyperparameters (one compilation serves a whole grid
through ``jax.vmap``) and by running long sequences with ``jax.lax.scan``. Closed-form
cases beyond the square's range are in ``test_overflow.py``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    CONFIGS,
    Config,
    log_uniform,
    scan_updates,
)
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax


def real_dtype(dtype: Any) -> np.dtype:
    """The real dtype of the same precision (float32 for complex64)."""
    return jnp.dtype(jnp.finfo(dtype).dtype)


def default_state_dtype(param_dtype: Any) -> np.dtype:
    """The real state dtype the documented policy gives a parameter dtype (``*_dtype=None``)."""
    real = real_dtype(param_dtype)
    return jnp.dtype(jnp.float32) if real.itemsize == 2 else real


def largest_squarable(param_dtype: Any, state_dtype: Any = None) -> float:
    """The largest gradient the state can square: min(max of g, 0.5 sqrt(max of the state))."""
    state_dtype = default_state_dtype(param_dtype) if state_dtype is None else state_dtype
    return min(
        float(jnp.finfo(param_dtype).max), 0.5 * math.sqrt(float(jnp.finfo(state_dtype).max))
    )


def as_dtype(values: np.ndarray, dtype: Any) -> np.ndarray:
    """float64 (or complex128) NumPy values rounded to ``dtype`` (bfloat16 via ml_dtypes)."""
    return np.asarray(values).astype(jnp.dtype(dtype))


def inexact_leaves_finite(tree: Any) -> jax.Array:
    """One boolean: every floating leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# --- finite in, finite out on edge cases ------------------------------------------------

EDGE_STEPS = 2000
EDGE_WIDTH = 6  # elements per edge-case class
EDGE_CLASSES = (
    "zeros",
    "subnormal",
    "smallest-normal",
    "large",
    "large-constant",
    "cancellation",
    "log-uniform",
    "burst",
    "mixed",
    "beyond-square",
)
# Hyperparameter grid, traced through one vmap: every flag combination is compiled once.
# The smallest nonzero eps, 1e-12, keeps |g| / eps representable for the largest
# squarable gradient. (With eps outside the root and 0 < eps < |g| / finfo.max, the exact
# update g / eps is beyond the dtype's range: float32 and float64 updates are inf there,
# 16-bit ones saturate.) Exact-zero gradients are also run with EXTREME_EPSILONS.
GRID_DECAYS = (0.0, 0.5, 0.9, 0.999, 1.0)
GRID_EPSILONS = (0.0, 1e-12, 1e-8, 1.0)
GRID_INITIAL_SCALES = (0.0, 1.0)
GRID_MOMENTA = (0.0, 0.5, 0.99)
EXTREME_EPSILONS = (1e-45, 1e-38, 1e-30, 1e30)  # for exact-zero gradients only


def edge_case_gradients(dtype: Any, seed: int) -> np.ndarray:
    """``EDGE_STEPS`` steps of gradients in ``dtype``; each class fills ``EDGE_WIDTH`` columns.

    Magnitudes are relative to the dtype: subnormals, the smallest normal, the largest
    gradient its default state can square (``largest_squarable``), and beyond it up to
    the dtype's largest finite value (the saturation rule).
    """
    rng = np.random.default_rng(seed)
    finfo = jnp.finfo(real_dtype(dtype))
    subnormal, tiny = float(finfo.smallest_subnormal), float(finfo.tiny)
    big = largest_squarable(dtype)
    shape = (EDGE_STEPS, EDGE_WIDTH)

    def sign():
        return rng.choice([-1.0, 1.0], size=shape)

    def one(name: str) -> np.ndarray:
        if name == "zeros":
            return np.zeros(shape)
        if name == "subnormal":
            return sign() * subnormal * rng.integers(1, 8, shape)
        if name == "smallest-normal":
            return sign() * tiny * rng.uniform(1, 4, shape)
        if name == "large":
            return sign() * big * rng.uniform(0.5, 1, shape)
        if name == "large-constant":
            return np.full(shape, big)
        if name == "cancellation":  # nearly constant: relative noise 1e-5
            level = log_uniform(rng, 1e-3, 1e3, EDGE_WIDTH)
            return level * (1 + 1e-5 * rng.standard_normal(shape))
        if name == "log-uniform":
            return log_uniform(rng, subnormal, big, shape)
        if name == "burst":  # huge, then zeros until nu decays away, then the smallest normal
            out = np.zeros(shape)
            out[:10] = big
            out[EDGE_STEPS // 2 :] = tiny
            return out
        if name == "mixed":  # zeros, subnormals and huge values interleaved
            return rng.choice([0.0, subnormal, -tiny, big, -big], size=shape)
        assert name == "beyond-square"  # |g| up to the dtype's max: g^2 overflows
        top = float(finfo.max)
        return np.clip(log_uniform(rng, math.sqrt(top), top, shape), -top, top)

    values = np.concatenate([one(name) for name in EDGE_CLASSES], axis=1)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        imag = np.concatenate([one(name) for name in EDGE_CLASSES], axis=1)
        values = values + 1j * imag
    return as_dtype(values, dtype)


def hyperparameter_grid(epsilons: Sequence[float]) -> tuple[list[tuple], dict[str, jax.Array]]:
    combos = list(itertools.product(GRID_DECAYS, epsilons, GRID_INITIAL_SCALES))
    dtype = jnp.result_type(float)  # float64 under x64, else float32
    columns = {
        "decay": [c[0] for c in combos],
        "eps": [c[1] for c in combos],
        "initial_scale": [c[2] for c in combos],
        "momentum": [GRID_MOMENTA[i % len(GRID_MOMENTA)] for i in range(len(combos))],
    }
    return combos, {k: jnp.asarray(v, dtype) for k, v in columns.items()}


@functools.cache
def edge_case_runner(config: Config, state_dtype: Any = None) -> Callable:
    """jit(vmap over hyperparameters) of a whole run; reports per element what held at all steps.

    Returns ``(finite, zero, state_finite)``: per leaf and hyperparameter row, whether
    each element's update was finite at every step and zero at every step, and per row
    whether every floating leaf of the state stayed finite.
    """

    def run(hp: dict[str, jax.Array], grads: dict[str, jax.Array]):
        tx = config.build(hp["decay"], hp["eps"], hp["initial_scale"], hp["momentum"], state_dtype)
        params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)

        def step(carry, g):
            state, finite, zero, state_finite = carry
            updates, state = tx.update(g, state)
            chex.assert_trees_all_equal_dtypes(updates, g)
            finite = jax.tree.map(lambda f, u: f & jnp.isfinite(u), finite, updates)
            zero = jax.tree.map(lambda z, u: z & (u == 0), zero, updates)
            return (state, finite, zero, state_finite & inexact_leaves_finite(state)), None

        true = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
        carry = (tx.init(params), true, true, jnp.array(True))
        _, finite, zero, state_finite = jax.lax.scan(step, carry, grads)[0]
        return finite, zero, state_finite

    return jax.jit(jax.vmap(run, in_axes=(0, None)))


def describe_failures(mask: np.ndarray, combos: list[tuple], leaf: str) -> list[str]:
    """Names the (class, decay, eps, initial_scale) rows where ``mask`` is False."""
    failures = []
    for row, column in zip(*np.nonzero(~mask)):
        name = EDGE_CLASSES[column // EDGE_WIDTH]
        failures.append(f"{leaf}/{name} at (decay, eps, initial_scale)={combos[row]}")
    return sorted(set(failures))


EDGE_GROUPS = {
    # x64 disabled: the decay product is float32.
    "x32": (False, ("float16", "bfloat16", "float32", "complex64"), None),
    # x64 enabled: float64 parameters, and float32 ones with a float64 decay product.
    "x64": (True, ("float64", "float32"), None),
    # 8-bit state for every statistic, blocks of 4 straddling the edge-case classes.
    "x32-quantized": (
        False,
        ("bfloat16", "float32", "complex64"),
        rmsprop_jax.quantized(min_size=0, block_size=4),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("group", list(EDGE_GROUPS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_finite_in_finite_out_on_edge_cases(config, group):
    # For every flag combination and a grid of decay, eps (0 included), initial_scale
    # and momentum, EDGE_STEPS steps of edge-case gradients (exact zeros, subnormals,
    # the smallest normal, the largest squarable gradient, nearly constant gradients,
    # log-uniform magnitudes over the whole range, bursts) never give a non-finite
    # update or state, updates keep the gradient dtype, and a zero gradient always
    # gets an exactly zero update (0/0 with eps=0 included).
    x64, dtypes, state_dtype = EDGE_GROUPS[group]
    with jax.enable_x64(x64):
        grads = {dt: jnp.asarray(edge_case_gradients(dt, seed=i)) for i, dt in enumerate(dtypes)}
        combos, hp = hyperparameter_grid(GRID_EPSILONS)
        runner = edge_case_runner(config, state_dtype)
        finite, zero, state_finite = jax.device_get(runner(hp, grads))
        # The same compiled run with extreme eps values, for the zero gradients only.
        extreme_combos, extreme_hp = hyperparameter_grid(EXTREME_EPSILONS)
        _, extreme_zero, _ = jax.device_get(runner(extreme_hp, grads))
    failures = []
    for dt in dtypes:
        failures += describe_failures(finite[dt], combos, f"{dt} non-finite update")
        zeros = slice(0, EDGE_WIDTH)  # the "zeros" class
        failures += describe_failures(zero[dt][:, zeros], combos, f"{dt} nonzero update")
        failures += describe_failures(
            extreme_zero[dt][:, zeros], extreme_combos, f"{dt} nonzero update"
        )
    failures += [f"non-finite state at {combos[row]}" for row in np.nonzero(~state_finite)[0]]
    assert not failures, "\n".join(failures[:40])


def test_zero_gradient_with_zero_eps_is_a_zero_update():
    # 0/0: eps=0, initial_scale=0 and a zero gradient at the first step. Closed form: 0.
    for config in CONFIGS:
        tx = config.build(0.9, 0.0, 0.0, 0.5)
        updates, state = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
        chex.assert_trees_all_equal(updates, jnp.zeros(3), custom_message=config.id)
        chex.assert_tree_all_finite(state)


# --- finite in, finite out: a property over random settings -----------------------------

HYPOTHESIS_STEPS = 12
# 8-bit state on every leaf with an axis, in blocks of 4 (the shapes here are tiny).
QUANTIZED = rmsprop_jax.quantized(min_size=0, block_size=4)
PROPERTY_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64")


@functools.cache
def property_runner(
    config: Config, dtype: str, shape: tuple[int, ...], state_dtype: Any
) -> Callable:
    def run(hp, grads):
        tx = config.build(hp["decay"], hp["eps"], hp["initial_scale"], hp["momentum"], state_dtype)
        updates, states = scan_updates(tx, jnp.zeros(shape, dtype), grads)
        return updates, states

    return jax.jit(run)


@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from(PROPERTY_DTYPES),
    state_dtype=st.sampled_from([None, None, "bfloat16", "float16", QUANTIZED]),
    shape=st.sampled_from([(), (5,), (2, 3)]),
    decay=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    log_eps=st.one_of(st.just(None), st.floats(-12.0, 0.0)),
    initial_scale=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1e3)),
    momentum=st.floats(0.0, 0.99),
    position=st.floats(0.0, 1.0),
    spread=st.floats(0.0, 12.0),
    zero_fraction=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_finite_in_finite_out_property(
    config,
    dtype,
    state_dtype,
    shape,
    decay,
    log_eps,
    initial_scale,
    momentum,
    position,
    spread,
    zero_fraction,
    seed,
):
    # Gradient magnitudes centred anywhere between the smallest subnormal and the largest
    # finite value of the gradient's dtype (whose square overflows any state dtype: the
    # saturation rule), spread over up to 12 decades, with exact zeros mixed in.
    with jax.enable_x64(dtype == "float64"):
        finfo = jnp.finfo(real_dtype(dtype))
        low = math.log10(float(finfo.smallest_subnormal))
        high = math.log10(float(finfo.max))
        centre = low + position * (high - low)
        rng = np.random.default_rng(seed)
        full = (HYPOTHESIS_STEPS, *shape)
        exponents = np.clip(centre + spread * (rng.random(full) - 0.5), low, high)
        values = rng.choice([-1.0, 1.0], size=full) * np.minimum(10.0**exponents, float(finfo.max))
        values[rng.random(full) < zero_fraction] = 0.0
        if dtype == "complex64":
            values = values * np.exp(2j * np.pi * rng.random(full))
        grads = jnp.asarray(as_dtype(values, dtype))
        float_dtype = jnp.result_type(float)
        hp = {
            "decay": decay,
            "eps": 0.0 if log_eps is None else 10.0**log_eps,
            "initial_scale": initial_scale,
            "momentum": momentum,
        }
        hp = {k: jnp.asarray(v, float_dtype) for k, v in hp.items()}
        updates, states = property_runner(config, dtype, shape, state_dtype)(hp, grads)
        chex.assert_trees_all_equal_dtypes(updates, grads)
        chex.assert_tree_all_finite(updates)
        chex.assert_tree_all_finite(states)
