"""Training real Flax models (NNX and Linen) on scikit-learn's digits with ``rmsprop``.

Each test trains a small MLP on a fixed slice of ``sklearn.datasets.load_digits``
(shipped with scikit-learn, no download), checks that the loss falls, and
checks that the parameter trajectory equals the one ``optax.rmsprop`` gives for
the same hyperparameters, step by step, to float32 rounding.

optax's own RMSProp is not clean under strict dtype promotion for every flag (its
``bias_correction`` mixes a Python float with the int32 step count), so only the
optax side runs under ``jax.numpy_dtype_promotion("standard")``; rmsprop_jax
always runs strict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")
datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.slow  # training runs

STEPS = 25
BATCH = 64
HIDDEN = 16
N_CLASSES = 10

# Configurations that optax.rmsprop shares with rmsprop_jax.rmsprop (same names,
# same defaults, the learning rate inside the momentum buffer in both).
CONFIGS = {
    "plain": dict(learning_rate=1e-2),
    "centered_momentum": dict(
        learning_rate=3e-3, decay=0.95, eps=1e-4, centered=True, momentum=0.9
    ),
    "bias_nesterov_eps_outside": dict(
        learning_rate=1e-2,
        decay=0.99,
        eps=1e-6,
        eps_in_sqrt=False,
        bias_correction=True,
        momentum=0.5,
        nesterov=True,
    ),
}

# Parameters after tens of steps go through a nonlinear network whose outputs feed
# back into the gradients, so float32 rounding differences between the two
# implementations grow a little over the run.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first ``STEPS * BATCH`` digits, pixels scaled to [0, 1], as float32/int32."""
    x, y = datasets.load_digits(return_X_y=True)
    n = STEPS * BATCH
    return (x[:n] / 16.0).astype(np.float32), y[:n].astype(np.int32)


def batches(data: tuple[np.ndarray, np.ndarray]):
    x, y = data
    for i in range(STEPS):
        yield (
            jnp.asarray(x[i * BATCH : (i + 1) * BATCH]),
            jnp.asarray(y[i * BATCH : (i + 1) * BATCH]),
        )


def optax_side() -> contextlib.AbstractContextManager:
    return jax.numpy_dtype_promotion("standard")


def assert_trajectories_close(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        chex.assert_trees_all_close(
            a, b, rtol=RTOL, atol=ATOL, custom_message=f"parameters after step {step + 1}"
        )


def assert_loss_falls(losses: list[float]) -> None:
    chex.assert_tree_all_finite(jnp.asarray(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"


# ---------------------------------------------------------------- Flax NNX


class NnxMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, N_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def nnx_train_step(model: NnxMlp, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model: NnxMlp) -> jax.Array:
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train_nnx(
    tx: optax.GradientTransformation, data, context: Callable[[], contextlib.AbstractContextManager]
):
    model = NnxMlp(nnx.Rngs(0))  # the same initial parameters for every run
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params, losses = [], []
    with context():
        for x, y in batches(data):
            losses.append(float(nnx_train_step(model, optimizer, x, y)))
            params.append(jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return params, losses, optimizer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nnx_optimizer_trains_digits_like_optax(digits, name):
    config = CONFIGS[name]
    ours, losses, optimizer = train_nnx(
        rmsprop_jax.rmsprop(**config), digits, contextlib.nullcontext
    )
    theirs, _, _ = train_nnx(optax.rmsprop(**config), digits, optax_side)

    assert_loss_falls(losses)
    assert_trajectories_close(ours, theirs)
    # The optimizer holds rmsprop_jax's state, shaped like the parameters.
    opt_state = jax.tree.map(
        lambda v: v[...], optimizer.opt_state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    nu = optax.tree_utils.tree_get(opt_state, "nu")
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.tree.leaves(nu), jax.tree.leaves(ours[-1]))
    assert int(optax.tree_utils.tree_get(opt_state, "count")) == STEPS


# ---------------------------------------------------------------- Flax Linen


class LinenMlp(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = linen.relu(linen.Dense(HIDDEN)(x))
        return linen.Dense(N_CLASSES)(x)


@jax.jit
def linen_train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
    def loss_fn(params) -> jax.Array:
        logits = state.apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def train_linen(tx, data, context):
    model = LinenMlp()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.float32))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    trajectory, losses = [], []
    with context():
        for x, y in batches(data):
            state, loss = linen_train_step(state, x, y)
            trajectory.append(state.params)
            losses.append(float(loss))
    return trajectory, losses, state


@pytest.mark.parametrize("name", ["plain", "centered_momentum"])
def test_linen_train_state_trains_digits_like_optax(digits, name):
    config = CONFIGS[name]
    ours, losses, state = train_linen(rmsprop_jax.rmsprop(**config), digits, contextlib.nullcontext)
    theirs, _, _ = train_linen(optax.rmsprop(**config), digits, optax_side)

    assert_loss_falls(losses)
    assert_trajectories_close(ours, theirs)
    assert int(state.step) == STEPS
    chex.assert_trees_all_equal_shapes_and_dtypes(
        optax.tree_utils.tree_get(state.opt_state, "nu"), state.params
    )
