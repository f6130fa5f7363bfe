"""rmsprop_jax under JAX's transformations: jit, vmap, grad, pmap and shard_map.

``chex.variants`` is not used: it needs unittest-style classes, which do not mix
with pytest's parametrize (see the house style); jit and eager runs are compared
explicitly instead.

The multi-device tests (``pmap``, ``shard_map``) need several devices, which a JAX
process fixes when it starts; they run ``tests/_parallel_worker.py`` once, in a
subprocess with 4 virtual CPU devices, and check what it returns here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_worker

import rmsprop_jax

STEPS = 8
CONFIGS = {
    "plain": dict(),
    "centered_momentum_bias": dict(centered=True, momentum=0.9, bias_correction=True, eps=1e-2),
}
# jit fuses differently from eager, and vmap from a single run: float32 rounding.
RTOL, ATOL = 1e-5, 1e-6
# The same for the centered configuration trained in a loop, where a one-ulp difference
# is fed back through the model and the centered variance: measured 1.4e-5 between the
# vmapped and the single run (their fusions differ).
RTOL_CENTERED = 5e-5


def make_problem(seed: int = 0, dtype=np.float32):
    """A small noisy regression: a weight matrix, a bias, and one minibatch per step.

    The targets are far from the initial model (a bias of 2) so no gradient is near
    zero: RMSProp scales every gradient to a step of size ~``learning_rate``, so a
    gradient that is mostly rounding error would make runs that round differently
    (jit and eager, vmap and single) take visibly different steps.
    """
    rng = np.random.default_rng(seed)
    params = {"w": 0.3 * rng.normal(size=(5, 3)), "b": np.zeros(3)}
    x = rng.normal(size=(STEPS, 16, 5))
    y = x @ rng.normal(size=(5, 3)) + 2.0 + 0.3 * rng.normal(size=(STEPS, 16, 3))
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
    return cast(params), cast(x), cast(y)


def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)


def train(tx: optax.GradientTransformation, params, x, y):
    """One step per minibatch in a ``lax.fori_loop``; returns the final parameters."""

    def body(i, carry):
        params, state = carry
        grads = jax.grad(loss_fn)(params, x[i], y[i])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, x.shape[0], body, (params, tx.init(params)))[0]


# ----------------------------------------------------------------------- jit


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_matches_eager_and_traces_once(name):
    tx = rmsprop_jax.rmsprop(0.05, **CONFIGS[name])
    params, _, _ = make_problem()
    # A fixed gradient sequence, so that the comparison sees only the optimizer's
    # arithmetic and no rounding difference is fed back through the model.
    rng = np.random.default_rng(3)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(STEPS)
    ]

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(step, n=1))
    eager_carry = jit_carry = (params, tx.init(params))
    for g in grads:
        eager_carry = step(*eager_carry, g)
        jit_carry = jitted(*jit_carry, g)
    chex.assert_trees_all_close(jit_carry, eager_carry, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_equal_shapes_and_dtypes(jit_carry, eager_carry)
    assert int(optax.tree_utils.tree_get(jit_carry[1], "count")) == len(grads)


# ---------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vmap_sweeps_learning_rate_and_decay_in_one_compiled_call(name):
    params, x, y = make_problem()

    def run(learning_rate, decay):
        return train(rmsprop_jax.rmsprop(learning_rate, decay, **CONFIGS[name]), params, x, y)

    learning_rates = jnp.array([0.1, 0.05, 0.02, 0.01], jnp.float32)
    decays = jnp.array([0.9, 0.99, 0.5, 0.0], jnp.float32)
    chex.clear_trace_counter()
    sweep = jax.jit(jax.vmap(chex.assert_max_traces(run, n=1)))
    swept = sweep(learning_rates, decays)
    chex.assert_tree_shape_prefix(swept, (4,))

    single = jax.jit(run)  # one compilation for the four separate runs
    rtol = RTOL_CENTERED if CONFIGS[name].get("centered") else RTOL
    for i, (lr, decay) in enumerate(zip(learning_rates, decays)):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], swept), single(lr, decay), rtol=rtol, atol=ATOL
        )
    # The four runs really used different hyperparameters.
    finals = np.asarray(swept["w"]).reshape(4, -1)
    assert len({tuple(row) for row in finals}) == 4


def test_vmap_trains_an_ensemble_of_models():
    tx = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9)
    problems = [make_problem(seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *problems)
    ensemble = jax.jit(jax.vmap(lambda p, x, y: train(tx, p, x, y)))(*stacked)
    one = jax.jit(lambda p, x, y: train(tx, p, x, y))
    for i, problem in enumerate(problems):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], ensemble), one(*problem), rtol=1e-6, atol=ATOL
        )


# ---------------------------------------------------------------------- grad


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("hyperparameter", ["learning_rate", "decay"])
def test_grad_through_training_matches_finite_differences(name, hyperparameter):
    """Meta-learning: d(validation loss after 8 steps)/d(hyperparameter), in float64."""
    with jax.enable_x64(True):
        params, x, y = make_problem(dtype=np.float64)
        _, x_val, y_val = make_problem(seed=1, dtype=np.float64)
        x_val, y_val = x_val[0], y_val[0]
        point = {"learning_rate": 0.05, "decay": 0.9}

        def meta_loss(value):
            hyper = {**point, hyperparameter: value}
            tx = rmsprop_jax.rmsprop(hyper["learning_rate"], hyper["decay"], **CONFIGS[name])
            return loss_fn(train(tx, params, x, y), x_val, y_val)

        value = jnp.asarray(point[hyperparameter], jnp.float64)
        grad = jax.jit(jax.grad(meta_loss))(value)
        # Five-point central difference, truncation error O(h^4). The centered variance
        # loses digits to cancellation, so h stays well above the rounding noise.
        h, f = 1e-4, jax.jit(meta_loss)
        finite_difference = (
            -f(value + 2 * h) + 8 * f(value + h) - 8 * f(value - h) + f(value - 2 * h)
        ) / (12 * h)

        chex.assert_tree_all_finite(grad)
        assert abs(float(grad)) > 1e-3, "the meta-gradient should not vanish here"
        np.testing.assert_allclose(float(grad), float(finite_difference), rtol=1e-6)


# ------------------------------------------------- pmap and shard_map (4 devices)

WORKER = Path(__file__).with_name("_parallel_worker.py")
N_DEVICES = 4
WORKER_CONFIGS = ["plain", "centered_momentum", "bias_nesterov"]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel") / "results.pkl"
    run_worker(WORKER, str(out), devices=N_DEVICES)
    with out.open("rb") as f:
        return pickle.load(f)


# Data parallelism averages the gradient in another order than the single-device
# mean: the runs agree to float32 rounding accumulated over the steps.
PARALLEL_RTOL, PARALLEL_ATOL = 2e-5, 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", WORKER_CONFIGS)
def test_pmap_replicas_agree_and_match_one_device(parallel, name):
    params, state, losses = parallel[name]["pmap"]
    reference = parallel[name]["reference"]
    chex.assert_tree_shape_prefix((params, state), (N_DEVICES,))
    replica = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    for i in range(1, N_DEVICES):
        chex.assert_trees_all_equal(replica((params, state), i), replica((params, state), 0))
    chex.assert_trees_all_close(
        replica((params, state), 0), reference[:2], rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL
    )
    assert float(losses[-1][0]) < 0.6 * float(losses[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "fsdp"])
@pytest.mark.parametrize("name", WORKER_CONFIGS)
def test_shard_map_data_parallel_matches_one_device(parallel, name, mode):
    params, state, losses = parallel[name][mode]
    reference = parallel[name]["reference"]
    chex.assert_trees_all_equal_shapes_and_dtypes((params, state), reference[:2])
    chex.assert_trees_all_close(
        (params, state), reference[:2], rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL
    )
    chex.assert_trees_all_close(losses, reference[2], rtol=PARALLEL_RTOL)
    assert int(optax.tree_utils.tree_get(state, "count")) == len(losses)
    if mode == "fsdp":  # the state came out split like the parameters, the scalars replicated
        assert all(parallel[name]["fsdp_state_specs_hold"]), parallel[name]["fsdp_state_specs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", WORKER_CONFIGS)
def test_shard_map_init_and_scan_inside_matches_one_device(parallel, name):
    # init inside shard_map must give state that varies over the axis like the
    # parameter slices (zeros_like/full_like), or lax.scan refuses the carry.
    result = parallel[name]["fsdp_scan"]
    assert not isinstance(result, str), result[:1500]
    params, state, losses = result
    reference = parallel[name]["reference"]
    chex.assert_trees_all_close(
        (params, state), reference[:2], rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL
    )
    chex.assert_trees_all_close(losses, reference[2], rtol=PARALLEL_RTOL)
