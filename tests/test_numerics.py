"""Numerical robustness, the dtype policy, hyperparameters and textbook properties.

What is checked here, for every transform (``scale_by_rms``, ``scale_by_centered_rms``,
``bias_correction`` in a chain, the ``rmsprop`` alias with momentum and Nesterov):

* finite in, finite out, on edge-case gradients over thousands of steps and on random
  hyperparameters, shapes, dtypes and magnitudes (hypothesis);
* the first centered bias-corrected step, where optax divides by ``sqrt(eps)``;
* the dtype policy of ``rmsprop_jax._numerics`` (16-bit parameters keep float32 state,
  updates in the gradient dtype, narrowing casts saturate);
* what a NaN or infinite gradient does, and ``optax.apply_if_finite`` around it;
* decay schedules (bias correction by the product of the decays applied) and
  ``optax.inject_hyperparams``;
* validation messages;
* textbook properties: scale invariance, steady state, the bias of the moving average
  and its correction, the centered variance estimate, the effective memory length.

Every golden value comes from a closed form or from a float64 NumPy loop written from
the docstrings' update rules (``reference`` below), never from the library; each test
says which. Runs are kept fast by tracing hyperparameters (one compilation serves a
whole grid through ``jax.vmap``) and by running long sequences with ``jax.lax.scan``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax

# --- configurations -------------------------------------------------------------------

ALIAS_LEARNING_RATE = 0.5  # a Python float: see test_array_learning_rate_keeps_update_dtype


class Config(NamedTuple):
    """One transform and its static flags; numeric hyperparameters are given at build time."""

    kind: str  # "rms", "centered", "rms+bias_correction", "centered+bias_correction", "alias"
    eps_in_sqrt: bool = True
    bias_correction: bool = False
    centered: bool = False  # alias only
    nesterov: bool = False  # alias only
    learning_rate_in_momentum: bool = True  # alias only

    @property
    def id(self) -> str:
        parts = [self.kind, "in" if self.eps_in_sqrt else "out"]
        if self.bias_correction:
            parts.append("bc")
        if self.kind == "alias":
            parts += ["centered" if self.centered else "plain"]
            parts += ["nesterov" if self.nesterov else "heavy-ball"]
            parts += ["lr-in" if self.learning_rate_in_momentum else "lr-out"]
        return "-".join(parts)

    @property
    def is_centered(self) -> bool:
        return self.centered or self.kind.startswith("centered")

    def build(
        self, decay, eps, initial_scale=0.0, momentum=0.5, state_dtype=None
    ) -> optax.GradientTransformation:
        """The transform; ``state_dtype`` is passed as every ``*_dtype`` argument it has."""
        scaling = dict(eps_in_sqrt=self.eps_in_sqrt, initial_scale=initial_scale)
        scaling["nu_dtype"] = state_dtype
        if self.is_centered:
            scaling["mu_dtype"] = state_dtype
        if self.kind == "rms":
            return rmsprop_jax.scale_by_rms(
                decay, eps, bias_correction=self.bias_correction, **scaling
            )
        if self.kind == "centered":
            return rmsprop_jax.scale_by_centered_rms(
                decay, eps, bias_correction=self.bias_correction, **scaling
            )
        if self.kind.endswith("+bias_correction"):
            factory = {
                "rms": rmsprop_jax.scale_by_rms,
                "centered": rmsprop_jax.scale_by_centered_rms,
            }[self.kind.split("+")[0]]
            return optax.chain(factory(decay, eps, **scaling), rmsprop_jax.bias_correction(decay))
        assert self.kind == "alias"
        return rmsprop_jax.rmsprop(
            ALIAS_LEARNING_RATE,
            decay,
            eps,
            centered=self.centered,
            momentum=momentum,
            nesterov=self.nesterov,
            bias_correction=self.bias_correction,
            learning_rate_in_momentum=self.learning_rate_in_momentum,
            momentum_dtype=state_dtype,
            **scaling,
        )


CONFIGS = [
    *(
        Config(kind, eps_in_sqrt=e, bias_correction=b)
        for kind, e, b in itertools.product(["rms", "centered"], [True, False], [False, True])
    ),
    Config("rms+bias_correction", eps_in_sqrt=False),
    Config("centered+bias_correction", eps_in_sqrt=True),
    Config("alias", eps_in_sqrt=True, bias_correction=False, centered=False, nesterov=False),
    Config("alias", eps_in_sqrt=False, bias_correction=True, centered=True, nesterov=True),
    Config(
        "alias",
        eps_in_sqrt=True,
        bias_correction=True,
        centered=False,
        nesterov=True,
        learning_rate_in_momentum=False,
    ),
    Config(
        "alias",
        eps_in_sqrt=False,
        bias_correction=False,
        centered=True,
        nesterov=False,
        learning_rate_in_momentum=False,
    ),
]


# --- helpers ----------------------------------------------------------------------------


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


def scan_updates(tx: optax.GradientTransformation, params: Any, grads: Any):
    """Applies ``tx`` to gradients stacked on a leading axis; returns stacked updates and states."""

    def step(state, g):
        updates, state = tx.update(g, state)
        return state, (updates, state)

    return jax.lax.scan(step, tx.init(params), grads)[1]


def per_step(value: Any, t: int) -> float:
    """A hyperparameter at (0-based) update ``t``: a constant, a sequence or a function of t."""
    if callable(value):
        return float(value(t))
    if isinstance(value, Sequence):
        return float(value[t])
    return float(value)


def reference(
    grads: Sequence[np.ndarray],
    *,
    decay: Any,
    eps: Any,
    initial_scale: float = 0.0,
    centered: bool = False,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    learning_rate: Any = None,
    momentum: Any = None,
    nesterov: bool = False,
) -> dict[str, list[np.ndarray]]:
    """float64 loop of the update rules in the docstrings of the scaling transforms and rmsprop.

    Hyperparameters may change per step (a sequence or a function of the update index,
    0 at the first update). Without ``learning_rate`` the scaled gradient ``v`` is
    returned (the scaling transform alone); with it, ``rmsprop``'s update (learning rate
    inside the momentum buffer). Returns per-step lists: ``updates``, ``nu``, ``mu``,
    ``product`` and ``condition`` (``nu_hat / variance``: how many ulps the centered
    variance loses to cancellation).
    """
    nu = np.full(np.shape(grads[0]), initial_scale, np.float64)
    mu = np.zeros(np.shape(grads[0]), np.complex128 if np.iscomplexobj(grads[0]) else np.float64)
    buffer = np.zeros_like(mu)
    product = 1.0
    out: dict[str, list[np.ndarray]] = {
        k: [] for k in ("updates", "nu", "mu", "product", "condition")
    }
    for t, g in enumerate(grads):
        g = np.asarray(g).astype(mu.dtype)
        rho, epsilon = per_step(decay, t), per_step(eps, t)
        previous, product = product, product * rho
        nu = rho * nu + (1 - rho) * np.abs(g) ** 2
        mu = rho * mu + (1 - rho) * g
        correction = 1 - product if bias_correction and product < 1 else 1.0
        nu_hat, mu_hat = nu / correction, mu / correction
        one_sample = rho == 0 or (bias_correction and previous == 1)
        if centered and not one_sample:
            second = np.maximum(nu_hat - np.abs(mu_hat) ** 2, 0.0)
        else:
            second = nu_hat
        denom = np.sqrt(second + epsilon) if eps_in_sqrt else np.sqrt(second) + epsilon
        v = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0)
        if learning_rate is not None:
            eta = per_step(learning_rate, t)
            if momentum is None:
                v = -eta * v
            else:
                beta = per_step(momentum, t)
                buffer = beta * buffer - eta * v
                v = -eta * v + beta * buffer if nesterov else buffer
        out["updates"].append(v)
        out["nu"].append(nu)
        out["mu"].append(mu)
        out["product"].append(product)
        out["condition"].append(nu_hat / np.maximum(second, 1e-300))
    return out


def log_uniform(rng: np.random.Generator, low: float, high: float, shape) -> np.ndarray:
    """Random signs times magnitudes log-uniform in [low, high] (float64)."""
    magnitude = 10.0 ** rng.uniform(math.log10(low), math.log10(high), shape)
    return rng.choice([-1.0, 1.0], size=shape) * magnitude


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
def edge_case_runner(config: Config) -> Callable:
    """jit(vmap over hyperparameters) of a whole run; reports per element what held at all steps.

    Returns ``(finite, zero, state_finite)``: per leaf and hyperparameter row, whether
    each element's update was finite at every step and zero at every step, and per row
    whether every floating leaf of the state stayed finite.
    """

    def run(hp: dict[str, jax.Array], grads: dict[str, jax.Array]):
        tx = config.build(hp["decay"], hp["eps"], hp["initial_scale"], hp["momentum"])
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
    "x32": (False, ("float16", "bfloat16", "float32", "complex64")),
    # x64 enabled: float64 parameters, and float32 ones with a float64 decay product.
    "x64": (True, ("float64", "float32")),
}


@pytest.mark.parametrize("group", list(EDGE_GROUPS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_finite_in_finite_out_on_edge_cases(config, group):
    # For every flag combination and a grid of decay, eps (0 included), initial_scale
    # and momentum, EDGE_STEPS steps of edge-case gradients (exact zeros, subnormals,
    # the smallest normal, the largest squarable gradient, nearly constant gradients,
    # log-uniform magnitudes over the whole range, bursts) never give a non-finite
    # update or state, updates keep the gradient dtype, and a zero gradient always
    # gets an exactly zero update (0/0 with eps=0 included).
    x64, dtypes = EDGE_GROUPS[group]
    with jax.enable_x64(x64):
        grads = {dt: jnp.asarray(edge_case_gradients(dt, seed=i)) for i, dt in enumerate(dtypes)}
        combos, hp = hyperparameter_grid(GRID_EPSILONS)
        finite, zero, state_finite = jax.device_get(edge_case_runner(config)(hp, grads))
        # The same compiled run with extreme eps values, for the zero gradients only.
        extreme_combos, extreme_hp = hyperparameter_grid(EXTREME_EPSILONS)
        _, extreme_zero, _ = jax.device_get(edge_case_runner(config)(extreme_hp, grads))
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
PROPERTY_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64")


@functools.cache
def property_runner(
    config: Config, dtype: str, shape: tuple[int, ...], state_dtype: str | None
) -> Callable:
    def run(hp, grads):
        tx = config.build(hp["decay"], hp["eps"], hp["initial_scale"], hp["momentum"], state_dtype)
        updates, states = scan_updates(tx, jnp.zeros(shape, dtype), grads)
        return updates, states

    return jax.jit(run)


@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from(PROPERTY_DTYPES),
    state_dtype=st.sampled_from([None, None, "bfloat16", "float16"]),
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


# --- centered + bias correction: the one-sample steps -----------------------------------


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


# --- the dtype policy ---------------------------------------------------------------------


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


# --- non-finite gradients -----------------------------------------------------------------


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


@pytest.mark.parametrize("centered", [False, True])
def test_apply_if_finite_skips_the_step_and_training_continues(centered):
    inner = rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=centered, bias_correction=True)
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    rng = np.random.default_rng(0)
    finite = [jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(4)]
    bad = finite[0].at[2].set(jnp.nan)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(5))
    seen = []
    for g in [finite[0], finite[1], bad, bad.at[0].set(jnp.inf), finite[2], finite[3]]:
        before = state.inner_state
        u, state = update(g, state)
        if not bool(jnp.all(jnp.isfinite(g))):
            chex.assert_trees_all_equal(state.inner_state, before)  # untouched
            chex.assert_trees_all_equal(u, jnp.zeros(5))
        seen.append(u)
    assert int(state.total_notfinite) == 2 and int(state.notfinite_count) == 0
    # The finite steps equal the inner optimizer run on the finite gradients alone.
    inner_state = inner.init(jnp.zeros(5))
    expected = []
    for g in finite:
        u, inner_state = jax.jit(inner.update)(g, inner_state)
        expected.append(u)
    chex.assert_trees_all_close([seen[i] for i in (0, 1, 4, 5)], expected, rtol=1e-6)
    chex.assert_tree_all_finite(state)


# --- decay schedules: bias correction by the product of the decays --------------------------


def varying_decay(count):
    """A decay that changes every update: 0.5, 0.8, 0.99, 0.5, ..."""
    return jnp.asarray([0.5, 0.8, 0.99])[count % 3]


def varying_decay64(t: int) -> float:
    return [0.5, 0.8, 0.99][t % 3]


def small_gradients(steps: int, shape=(6,), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return log_uniform(rng, 1e-2, 1e2, (steps, *shape)).astype(np.float32)


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


def test_injected_decay_changes_between_jitted_steps_use_the_product():
    decays = [0.9, 0.9, 0.5, 0.5, 0.99, 0.0, 0.7]
    g = small_gradients(len(decays), seed=2)
    tx = optax.inject_hyperparams(rmsprop_jax.scale_by_centered_rms)(
        decay=0.9, eps=1e-8, bias_correction=True
    )
    state = tx.init(jnp.zeros(6))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    got = []
    for t, rho in enumerate(decays):
        state.hyperparams["decay"] = jnp.asarray(rho, jnp.float32)
        u, state = step(jnp.asarray(g[t]), state)
        got.append(u)
    ref = reference(list(g), decay=decays, eps=1e-8, centered=True, bias_correction=True)
    np.testing.assert_allclose(
        float(state.inner_state.total_weight), 1 - ref["product"][-1], rtol=1e-6
    )
    kappa = np.max(ref["condition"])
    np.testing.assert_allclose(np.asarray(got), ref["updates"], rtol=1e-5 + 1e-6 * kappa)


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


# --- injectable hyperparameters -------------------------------------------------------------

INJECTED = dict(learning_rate=0.1, decay=0.9, eps=1e-3, momentum=0.5, initial_scale=0.5)
FLAGS = dict(bias_correction=True, nesterov=True)


def test_injected_hyperparameters_match_the_plain_optimizer():
    g = small_gradients(8, seed=4)
    plain = rmsprop_jax.rmsprop(**INJECTED, **FLAGS)
    injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    run = jax.jit(scan_updates, static_argnums=0)
    expected, _ = run(plain, jnp.zeros(6), g)
    got, states = run(injected, jnp.zeros(6), g)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-9)
    assert set(states.hyperparams) == set(INJECTED)


@pytest.mark.parametrize(
    "name,new_value",
    [("learning_rate", 0.02), ("decay", 0.5), ("eps", 1e-6), ("momentum", 0.9)],
)
def test_injected_hyperparameter_change_takes_effect(name, new_value):
    # Changed after 3 jitted steps; float64 reference with the per-step values.
    steps, change = 7, 3
    g = small_gradients(steps, seed=5)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    state = tx.init(jnp.zeros(6))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    got = []
    for t in range(steps):
        if t == change:
            state.hyperparams[name] = jnp.asarray(new_value, jnp.float32)
        u, state = step(jnp.asarray(g[t]), state)
        got.append(u)
    schedule = {k: [v] * steps for k, v in INJECTED.items() if k != "initial_scale"}
    schedule[name] = [INJECTED[name]] * change + [new_value] * (steps - change)
    ref = reference(list(g), initial_scale=INJECTED["initial_scale"], **schedule, **FLAGS)
    np.testing.assert_allclose(np.asarray(got), ref["updates"], rtol=2e-5, atol=1e-9)
    unchanged = reference(list(g), **INJECTED, **FLAGS)
    assert not np.allclose(np.asarray(got)[change:], np.asarray(unchanged["updates"])[change:])


def test_injected_initial_scale_is_read_at_init_only():
    # initial_scale sets nu_0 (reference: nu starts at it); changing it after init
    # changes nothing, since nu already holds it.
    g = small_gradients(4, seed=6)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    step = jax.jit(tx.update)
    state = tx.init(jnp.zeros(6))
    np.testing.assert_allclose(np.asarray(state.inner_state[0].nu), 0.5)
    other = tx.init(jnp.zeros(6))
    other.hyperparams["initial_scale"] = jnp.asarray(3.0, jnp.float32)
    for t in range(4):
        u, state = step(jnp.asarray(g[t]), state)
        v, other = step(jnp.asarray(g[t]), other)
        chex.assert_trees_all_equal(u, v)
    ref = reference(list(g), **INJECTED, **FLAGS)
    np.testing.assert_allclose(np.asarray(u), ref["updates"][-1], rtol=2e-5)


# --- validation ---------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("decay", -0.1, "[0, 1]"),
    ("decay", 1.5, "[0, 1]"),
    ("decay", float("nan"), "[0, 1]"),
    ("eps", -1e-8, "[0, inf]"),
    ("momentum", 1.0, "[0, 1)"),
    ("momentum", -0.5, "[0, 1)"),
    ("learning_rate", -0.1, "[0, inf]"),
    ("initial_scale", -1.0, "[0, inf]"),
]


@pytest.mark.parametrize("name,value,interval", BAD_ARGUMENTS)
def test_out_of_range_hyperparameters_fail_at_construction(name, value, interval):
    kwargs = dict(learning_rate=0.1) | {name: value}
    with pytest.raises(
        ValueError, match=re.escape(f"`{name}` must be in {interval}, got {value!r}")
    ):
        rmsprop_jax.rmsprop(**kwargs)
    if name in ("decay", "eps", "initial_scale"):
        for factory in (rmsprop_jax.scale_by_rms, rmsprop_jax.scale_by_centered_rms):
            with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
                factory(**{name: value})
    if name == "decay":
        with pytest.raises(
            ValueError, match=re.escape(f"`decay` must be in [0, 1], got {value!r}")
        ):
            rmsprop_jax.bias_correction(value)


@pytest.mark.parametrize("name", ["learning_rate", "decay", "eps", "momentum", "initial_scale"])
def test_non_scalar_hyperparameters_fail_at_construction(name):
    kwargs = dict(learning_rate=0.1) | {name: jnp.full((2,), 0.5)}
    with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a scalar") + r".*\(2,\)"):
        rmsprop_jax.rmsprop(**kwargs)


@pytest.mark.parametrize(
    "name", ["centered", "nesterov", "eps_in_sqrt", "bias_correction", "learning_rate_in_momentum"]
)
@pytest.mark.parametrize("value", [1, "yes", np.bool_(True), None])
def test_non_bool_flags_fail_at_construction(name, value):
    with pytest.raises(
        ValueError, match=re.escape(f"`{name}` must be True or False, got {value!r}")
    ):
        rmsprop_jax.rmsprop(0.1, momentum=0.9, **{name: value})


@pytest.mark.parametrize("momentum", [None, 0, 0.0])
def test_nesterov_without_momentum_fails(momentum):
    with pytest.raises(ValueError, match="`nesterov=True` needs a `momentum`"):
        rmsprop_jax.rmsprop(0.1, momentum=momentum, nesterov=True)


def test_valid_edge_values_are_accepted():
    for decay in (0.0, 1.0, 0, 1, np.float32(0.5), jnp.asarray(0.5)):
        rmsprop_jax.rmsprop(0.0, decay, 0.0, momentum=0.0, initial_scale=0.0)
    rmsprop_jax.rmsprop(0.1, momentum=np.nextafter(np.float32(1), np.float32(0)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_update_tree_mismatch_shows_both_structures(config):
    # (In the chains, the scaling transform ahead of bias_correction does the check.)
    tx = config.build(0.9, 1e-8)
    state = tx.init({"w": jnp.zeros(3), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="structure") as info:
        tx.update({"w": jnp.zeros(3), "c": jnp.zeros(2)}, state)
    message = str(info.value)
    assert "'c'" in message and "'b'" in message  # both structures are shown
    with pytest.raises(ValueError, match=r"\['b'\].*shape \(3,\).*\(2,\).*nothing is broadcast"):
        tx.update({"w": jnp.zeros(3), "b": jnp.zeros(3)}, state)
    with pytest.raises(ValueError, match="nothing is broadcast"):
        tx.update({"w": jnp.zeros(3), "b": jnp.zeros(())}, state)


# --- textbook properties --------------------------------------------------------------------


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
