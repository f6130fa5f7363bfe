"""Checkpointing the optimizer state: orbax across processes, flax.serialization in memory.

For every state variant (plain, centered, momentum, bias correction, Nesterov,
bfloat16 statistics, 8-bit quantized statistics, and ``optax.inject_hyperparams`` state)
the test trains a few steps, saves ``(params, opt_state)`` with orbax, and keeps training; a fresh
process (``tests/_checkpoint_worker.py``) restores the checkpoint and trains the
same remaining steps. The resumed run must equal the uninterrupted one bit for bit,
with the same state types and dtypes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import in_rms_state, load_module, run_worker

import rmsprop_jax

ocp = pytest.importorskip("orbax.checkpoint")
serialization = pytest.importorskip("flax.serialization")

WORKER = Path(__file__).with_name("_checkpoint_worker.py")


worker = load_module(WORKER)
VARIANTS = list(worker.VARIANTS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, Path]:
    """Per variant, the uninterrupted run; and the folder of the checkpoints saved mid-run."""
    checkpoints = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    params0, xs, ys = worker.make_problem()
    before, after = slice(None, worker.STEPS_BEFORE), slice(worker.STEPS_BEFORE, None)
    runs = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for name, make_tx in worker.VARIANTS.items():
            tx = make_tx()
            step = worker.make_step(tx)
            params = jax.tree.map(jnp.asarray, params0)
            params, state = worker.train(step, params, tx.init(params), xs[before], ys[before])
            checkpointer.save(checkpoints / name, (params, state))
            params, state = worker.train(step, params, state, xs[after], ys[after])
            runs[name] = jax.device_get((params, state))
        # Leaving the block waits for the asynchronous saves to finish.
    return runs, checkpoints


@pytest.fixture(scope="module")
def runs(uninterrupted) -> dict:
    """Per variant: the uninterrupted run and the run resumed in another process."""
    finished, checkpoints = uninterrupted
    out = checkpoints.parent / "resumed.pkl"
    run_worker(WORKER, str(checkpoints), str(out))
    with out.open("rb") as f:
        resumed = pickle.load(f)
    return {name: (finished[name], resumed[name]) for name in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_run_resumed_in_a_fresh_process_is_bit_identical(runs, name):
    uninterrupted, resumed = runs[name]
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    chex.assert_trees_all_equal_shapes_and_dtypes(resumed, uninterrupted)
    chex.assert_trees_all_equal(resumed, uninterrupted)
    count = optax.tree_utils.tree_get(resumed[1], "count", filtering=in_rms_state)
    assert int(count) == worker.STEPS_BEFORE + worker.STEPS_AFTER


@pytest.mark.slow
def test_bfloat16_statistics_stay_bfloat16_through_the_checkpoint(runs):
    _, (_, state) = runs["bfloat16_state"]
    for field in ("nu", "mu", "trace"):
        leaves = jax.tree.leaves(optax.tree_utils.tree_get(state, field))
        assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves), field


@pytest.mark.slow
def test_quantized_statistics_stay_quantized_through_the_checkpoint(runs):
    _, (_, state) = runs["quantized_state"]
    for field, codes in (("nu", jnp.uint8), ("mu", jnp.int8), ("trace", jnp.int8)):
        stat = optax.tree_utils.tree_get(state, field)
        leaves = jax.tree.leaves(stat, is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedArray))
        assert leaves and all(isinstance(leaf, rmsprop_jax.QuantizedArray) for leaf in leaves)
        assert all(leaf.codes.dtype == codes for leaf in leaves), field
        assert all(leaf.scales.dtype == jnp.float32 for leaf in leaves), field


@pytest.mark.parametrize("name", VARIANTS)
def test_flax_serialization_round_trips_the_state(uninterrupted, name):
    _, state = uninterrupted[0][name]
    params0, _, _ = worker.make_problem()
    target = worker.VARIANTS[name]().init(params0)  # a freshly initialised state

    restored = serialization.from_bytes(target, serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)

    state_dict = serialization.to_state_dict(state)
    assert isinstance(state_dict, dict)
    assert len(jax.tree.leaves(state_dict)) == len(jax.tree.leaves(state))
    # NamedTuple fields become dictionary keys: the second moment is found by name.
    holders = [d for d in _subdicts(state_dict) if "nu" in d]
    assert len(holders) == 1
    # (A quantized leaf, a NamedTuple, becomes a dictionary of its codes and scales.)
    nu = serialization.to_state_dict(optax.tree_utils.tree_get(state, "nu"))
    chex.assert_trees_all_equal(holders[0]["nu"], nu)
    from_dict = serialization.from_state_dict(target, state_dict)
    assert jax.tree.structure(from_dict) == jax.tree.structure(state)
    chex.assert_trees_all_equal(from_dict, state)


def _subdicts(tree):
    if isinstance(tree, dict):
        yield tree
        for value in tree.values():
            yield from _subdicts(value)
