"""Each transform against a float64 NumPy loop of its docstring's update rule.

The reference loop (``helpers.reference``) is written from the math in the docstrings
of ``scale_by_rms``, ``scale_by_centered_rms``, ``bias_correction`` and ``rmsprop``,
in float64 NumPy, independently of the library's code. The library runs in
float32, so comparisons allow float32 rounding accumulated over the run.
"""

from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPTAX_CONFIGS_SAME_FROM_STEP_0, reference

import rmsprop_jax

STEPS = 30
SHAPES = {"w": (3, 4), "b": (5,)}


def make_gradients(seed: int, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """Gradients spanning 1e-3 .. 1e2 in magnitude, random signs, some exact zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        step = {}
        for name, shape in SHAPES.items():
            g = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-3, 2, size=shape)
            g[rng.random(shape) < 0.15] = 0.0
            step[name] = g.astype(np.float32)
        out.append(step)
    return out


def run(tx, grads, step_fn=None, params=None):
    """Applies ``tx`` to a gradient sequence; returns the per-step updates and the state."""
    if params is None:
        params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    state = tx.init(params)
    step_fn = step_fn or tx.update
    out = []
    for g in grads:
        u, state = step_fn({k: jnp.asarray(v) for k, v in g.items()}, state)
        out.append(u)
    return out, state


def assert_updates_close(actual, expected, conditions=None, rtol=2e-5, atol=1e-6):
    """float32 against float64: ``rtol`` plus 1e-6 per unit of the variance's condition number.

    (float32 rounds at 6e-8; the variance loses a factor ``nu_hat / v`` of that to
    cancellation and the update inherits half of it through the root.)
    """
    for t, (a, e) in enumerate(zip(actual, expected)):
        for k in e:
            kappa = 1.0 if conditions is None else conditions[t][k]
            error = np.abs(np.asarray(a[k], np.float64) - e[k])
            allowed = atol + np.abs(e[k]) * (rtol + 1e-6 * kappa)
            worst = np.unravel_index(np.argmax(error - allowed), error.shape)
            assert np.all(error <= allowed), (
                f"step {t}, {k}{list(worst)}: got {a[k][worst]}, want {e[k][worst]} "
                f"(condition {np.asarray(kappa)[worst] if np.ndim(kappa) else kappa:.3g})"
            )


FLAGS = list(
    itertools.product(
        [False, True],  # centered
        [True, False],  # eps_in_sqrt
        [False, True],  # bias_correction
        [0.0, 1.0],  # initial_scale
        [1e-8, 0.0],  # eps
    )
)


@pytest.mark.parametrize(
    "centered,eps_in_sqrt,bias_correction,initial_scale,eps",
    FLAGS,
    ids=[
        f"{'centered' if c else 'plain'}-{'in' if i else 'out'}-bc{int(b)}-s{s:g}-eps{e:g}"
        for c, i, b, s, e in FLAGS
    ],
)
def test_scaling_matches_float64_reference(
    maybe_jit, centered, eps_in_sqrt, bias_correction, initial_scale, eps
):
    decay = 0.9
    grads = make_gradients(seed=1)
    kwargs = dict(
        eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale, bias_correction=bias_correction
    )
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(decay, eps, **kwargs)
    actual, state = run(tx, grads, maybe_jit(tx.update))
    ref = reference(grads, decay=decay, eps=eps, centered=centered, **kwargs)
    assert_updates_close(actual, ref["updates"], ref["condition"])
    nu, mu = ref["nu"][-1], ref["mu"][-1]
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(state.nu[k]), nu[k], rtol=2e-5)
        if centered:
            np.testing.assert_allclose(np.asarray(state.mu[k]), mu[k], rtol=2e-5, atol=1e-7)
    assert int(state.count) == STEPS
    np.testing.assert_allclose(float(state.total_weight), 1 - ref["product"][-1], rtol=1e-5)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_decay_schedule_matches_float64_reference(maybe_jit, centered, bias_correction):
    # A decay that changes every step: the bias correction must use the product of
    # the decays actually applied, which the reference loop tracks in float64.
    def decay(count):
        return 0.5 + 0.45 * jnp.cos(0.3 * count.astype(jnp.float32)) ** 2

    def decay64(t):
        return 0.5 + 0.45 * math.cos(0.3 * t) ** 2

    grads = make_gradients(seed=2)
    factory = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
    tx = factory(decay, 1e-8, bias_correction=bias_correction)
    actual, _ = run(tx, grads, maybe_jit(tx.update))
    ref = reference(
        grads,
        decay=decay64,
        eps=1e-8,
        centered=centered,
        eps_in_sqrt=True,
        initial_scale=0.0,
        bias_correction=bias_correction,
    )
    assert_updates_close(actual, ref["updates"], ref["condition"], rtol=5e-5)


def test_unit_gradient_first_step_closed_form():
    # Closed form: nu_1 = (1 - rho) g^2, so u_1 = 1 / sqrt(1 - rho + eps) for g = 1.
    tx = rmsprop_jax.scale_by_rms(0.99, 1e-3)
    u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))
    chex.assert_trees_all_close(u, jnp.full(3, 1 / math.sqrt(0.01 + 1e-3)), rtol=1e-6)


ALIAS_CASES = [
    dict(momentum=None, nesterov=False, learning_rate_in_momentum=True),
    dict(momentum=0.9, nesterov=False, learning_rate_in_momentum=True),
    dict(momentum=0.9, nesterov=True, learning_rate_in_momentum=True),
    dict(momentum=0.9, nesterov=False, learning_rate_in_momentum=False),
    dict(momentum=0.5, nesterov=True, learning_rate_in_momentum=False),
]


@pytest.mark.parametrize("case", ALIAS_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("centered", [False, True])
def test_alias_matches_float64_reference_with_schedule(case, centered):
    # A learning-rate schedule separates "lr inside the buffer" from "lr outside".
    def lr(count):
        return 0.1 / (1.0 + count.astype(jnp.float32))

    grads = make_gradients(seed=3)
    scaling = dict(
        decay=0.95,
        eps=1e-6,
        centered=centered,
        eps_in_sqrt=False,
        initial_scale=0.0,
        bias_correction=True,
    )
    tx = rmsprop_jax.rmsprop(
        lr, 0.95, 1e-6, centered=centered, eps_in_sqrt=False, bias_correction=True, **case
    )
    actual, _ = run(tx, grads, jax.jit(tx.update))
    ref = reference(grads, learning_rate=lambda t: 0.1 / (1.0 + t), **case, **scaling)
    expected, conditions = ref["updates"], ref["condition"]
    # The momentum buffer sums past updates, each with its own condition number.
    running = [
        {k: max(float(np.max(c[k])) for c in conditions[: t + 1]) for k in SHAPES}
        for t in range(len(conditions))
    ]
    assert_updates_close(actual, expected, running, rtol=5e-5, atol=1e-7)


def test_learning_rate_placement_differs_under_a_schedule():
    # The two placements agree for a constant learning rate and differ for a schedule.
    grads = make_gradients(seed=4, steps=5)
    for lr, same in [(0.1, True), (optax.linear_schedule(0.1, 0.0, 5), False)]:
        a, _ = run(rmsprop_jax.rmsprop(lr, momentum=0.9), grads)
        b, _ = run(rmsprop_jax.rmsprop(lr, momentum=0.9, learning_rate_in_momentum=False), grads)
        close = all(np.allclose(x["w"], y["w"], rtol=1e-5) for x, y in zip(a, b))
        assert close == same


# --- rmsprop against optax.rmsprop on every configuration optax has -------------------


def quadratic_loss(params, batch):
    x, y = batch
    pred = x @ params["w"] + params["b"][None, :]
    return jnp.mean((pred - y) ** 2) + 0.01 * jnp.sum(params["w"] ** 2)


def train(tx, steps=40):
    """A real trajectory: linear regression on fixed synthetic data."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
    params = {"w": jnp.ones((4, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(quadratic_loss)(params, (x, y))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trajectory = []
    for _ in range(steps):
        params, state = step(params, state)
        trajectory.append(params)
    return trajectory


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    OPTAX_CONFIGS_SAME_FROM_STEP_0,
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("schedule", [False, True], ids=["const", "schedule"])
def test_rmsprop_matches_optax(config, schedule):
    lr = optax.exponential_decay(0.03, 5, 0.7) if schedule else 0.03
    ours = train(rmsprop_jax.rmsprop(lr, 0.9, 1e-8, **config))
    with jax.numpy_dtype_promotion("standard"):  # optax computes decay**count int/float
        theirs = train(optax.rmsprop(lr, 0.9, 1e-8, **config))
    for t, (a, b) in enumerate(zip(ours, theirs)):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6, custom_message=f"step {t}")


# --- the standalone bias_correction and the flag --------------------------------------


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_bias_correction_chain_equals_flag_when_eps_is_zero(maybe_jit, eps_in_sqrt):
    grads = make_gradients(seed=5)
    chain = optax.chain(
        rmsprop_jax.scale_by_rms(0.9, 0.0, eps_in_sqrt=eps_in_sqrt),
        rmsprop_jax.bias_correction(0.9),
    )
    flag = rmsprop_jax.scale_by_rms(0.9, 0.0, eps_in_sqrt=eps_in_sqrt, bias_correction=True)
    a, _ = run(chain, grads, maybe_jit(chain.update))
    b, _ = run(flag, grads, maybe_jit(flag.update))
    for t in range(STEPS):
        chex.assert_trees_all_close(a[t], b[t], rtol=2e-5, atol=1e-6, custom_message=f"t={t}")


def test_bias_correction_after_centered_debiases_the_variance_as_a_whole():
    # float64 closed form of the docstring: g / sqrt((nu - mu^2) / (1 - rho^t)).
    grads = make_gradients(seed=5, steps=6)
    chain = optax.chain(
        rmsprop_jax.scale_by_centered_rms(0.9, 0.0), rmsprop_jax.bias_correction(0.9)
    )
    actual, _ = run(chain, grads)
    ref = reference(
        grads,
        decay=0.9,
        eps=0.0,
        centered=True,
        eps_in_sqrt=True,
        initial_scale=0.0,
        bias_correction=False,
    )
    expected = [
        {k: u[k] * math.sqrt(1 - 0.9 ** (t + 1)) for k in u} for t, u in enumerate(ref["updates"])
    ]
    assert_updates_close(actual, expected, ref["condition"])


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_bias_correction_chain_equals_flag_with_epsilon_hat(eps_in_sqrt):
    # Kingma & Ba's epsilon hat: the chain with eps equals the flag with
    # eps / sqrt(1 - rho^t) (outside the root) or eps / (1 - rho^t) (inside).
    decay, eps = 0.9, 1e-2
    grads = make_gradients(seed=6)
    chain = optax.chain(
        rmsprop_jax.scale_by_rms(decay, eps, eps_in_sqrt=eps_in_sqrt),
        rmsprop_jax.bias_correction(decay),
    )
    a, _ = run(chain, grads)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = rmsprop_jax.scale_by_rms(decay).init(params)
    for t, g in enumerate(grads):
        correction = 1 - decay ** (t + 1)
        eps_hat = eps / (correction if eps_in_sqrt else math.sqrt(correction))
        flag = rmsprop_jax.scale_by_rms(
            decay, eps_hat, eps_in_sqrt=eps_in_sqrt, bias_correction=True
        )
        b, state = flag.update({k: jnp.asarray(v) for k, v in g.items()}, state)
        chex.assert_trees_all_close(a[t], b, rtol=2e-5, atol=1e-7, custom_message=f"t={t}")


def test_bias_correction_factor_closed_form():
    # sqrt(1 - 0.8^t) for t = 1..4, computed in float64.
    tx = rmsprop_jax.bias_correction(0.8)
    state = tx.init(jnp.zeros(2))
    for t in range(1, 5):
        u, state = tx.update(jnp.ones(2), state)
        np.testing.assert_allclose(np.asarray(u), math.sqrt(1 - 0.8**t), rtol=1e-6)


# --- structure, types and the public surface -------------------------------------------


@pytest.mark.parametrize(
    "tx",
    [
        rmsprop_jax.scale_by_rms(),
        rmsprop_jax.scale_by_rms(bias_correction=True),
        rmsprop_jax.scale_by_centered_rms(),
        rmsprop_jax.scale_by_centered_rms(bias_correction=True, eps_in_sqrt=False),
    ],
)
def test_state_layout_is_fixed_and_nothing_retraces(tx):
    params = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jnp.zeros(())]}
    state = tx.init(params)
    assert state._fields[:2] == ("count", "total_weight")
    chex.assert_trees_all_equal_shapes_and_dtypes(state.nu, params)
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, new_state = update(grads, state)
        chex.assert_trees_all_equal_structs(new_state, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
    found = optax.tree_utils.tree_get(state, "nu")
    chex.assert_trees_all_equal_shapes(found, params)


def test_public_surface_is_importable_and_documented():
    for name in rmsprop_jax.__all__:
        obj = getattr(rmsprop_jax, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        assert obj.__doc__, f"{name} has no docstring"
    for name in ["scale_by_rms", "scale_by_centered_rms", "bias_correction", "rmsprop"]:
        doc = getattr(rmsprop_jax, name).__doc__
        for section in (".. math::", "References:", "Example:", "Args:", "Returns:"):
            assert section in doc, f"{name} lacks {section}"
    for name in rmsprop_jax.presets.__all__:
        doc = getattr(rmsprop_jax.presets, name).__doc__
        for section in ("References:", "Example:", "First step for a unit gradient"):
            assert section in doc, f"presets.{name} lacks {section}"


def test_bias_correction_keeps_relative_precision_when_decay_is_close_to_one():
    # With rho = 1 - 2**-10 (exact in float32), 1 - rho^t is tiny for small t; the
    # float64 closed form g / sqrt(nu_t / (1 - rho^t)) must hold to a few float32
    # ulps, which 1 - (product in float32) would miss by ~1e-5.
    rho = 1 - 2.0**-10
    grads = [np.array([0.5, -2.0, 3.0], np.float32), np.array([1.5, 0.25, -1.0], np.float32)]
    tx = rmsprop_jax.scale_by_rms(rho, 0.0, bias_correction=True)
    state = tx.init(jnp.zeros(3))
    nu = np.zeros(3)
    for t, g in enumerate(grads, start=1):
        u, state = tx.update(jnp.asarray(g), state)
        nu = rho * nu + (1 - rho) * g.astype(np.float64) ** 2
        np.testing.assert_allclose(np.asarray(u), g / np.sqrt(nu / (1 - rho**t)), rtol=1e-6)
    np.testing.assert_allclose(float(state.total_weight), 1 - rho**2, rtol=1e-7)
