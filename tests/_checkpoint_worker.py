"""Resumes training from orbax checkpoints in a fresh process.

``tests/test_checkpoint.py`` trains each optimizer variant for ``STEPS_BEFORE``
steps, saves ``(params, opt_state)`` with orbax to ``CKPT_DIR/<variant>`` and runs
this script::

    python tests/_checkpoint_worker.py CKPT_DIR OUT.pkl

which, in a process that has never seen the run, restores every checkpoint, trains
``STEPS_AFTER`` more steps with the same batches and pickles the final
``(params, opt_state)`` per variant, for the test to compare bit for bit with the
uninterrupted run.

The problem and the variants are defined here and imported by the test, so both
processes run the same code. Nothing runs on import: pytest's
``--doctest-modules`` imports this file.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

STEPS_BEFORE, STEPS_AFTER = 4, 4
QUANTIZED = rmsprop_jax.quantized(min_size=0, block_size=2)

VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "plain": lambda: rmsprop_jax.rmsprop(0.01),
    "centered": lambda: rmsprop_jax.rmsprop(0.01, centered=True, eps=1e-4),
    "momentum": lambda: rmsprop_jax.rmsprop(0.01, momentum=0.9),
    "bias_correction": lambda: rmsprop_jax.rmsprop(0.01, bias_correction=True),
    "centered_nesterov_bias": lambda: rmsprop_jax.rmsprop(
        0.01, centered=True, momentum=0.9, nesterov=True, bias_correction=True, eps=1e-4
    ),
    "bfloat16_state": lambda: rmsprop_jax.rmsprop(
        0.01,
        centered=True,
        momentum=0.9,
        nu_dtype=jnp.bfloat16,
        mu_dtype=jnp.bfloat16,
        momentum_dtype=jnp.bfloat16,
    ),
    # 8-bit state on every leaf (min_size=0), stochastically rounded from the count.
    "quantized_state": lambda: rmsprop_jax.rmsprop(
        0.01,
        centered=True,
        momentum=0.9,
        nu_dtype=QUANTIZED,
        mu_dtype=QUANTIZED,
        momentum_dtype=QUANTIZED,
    ),
    "injected_hyperparams": lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=0.01, decay=0.95, momentum=0.5, bias_correction=True
    ),
}


def make_problem():
    """Initial parameters and the batches of all steps, the same in every process."""
    rng = np.random.default_rng(0)
    params = {
        "w": (rng.normal(size=(6, 3)) / np.sqrt(6)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    }
    n = STEPS_BEFORE + STEPS_AFTER
    xs = rng.normal(size=(n, 16, 6)).astype(np.float32)
    ys = (xs @ rng.normal(size=(6, 3)) + 1.0).astype(np.float32)
    return params, xs, ys


def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)


def make_step(tx: optax.GradientTransformation):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def train(step, params, state, xs, ys):
    for x, y in zip(xs, ys):
        params, state = step(params, state, x, y)
    return params, state


def main(ckpt_dir: str, out_path: str) -> None:
    import warnings

    warnings.simplefilter("error")  # as in the test suite

    import orbax.checkpoint as ocp

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")

    params0, xs, ys = make_problem()
    results = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for name, make_tx in VARIANTS.items():
            tx = make_tx()
            # The target's structure (NamedTuples, dtypes, shapes) comes from init.
            target = jax.tree.map(
                ocp.utils.to_shape_dtype_struct,
                (jax.tree.map(jnp.asarray, params0), tx.init(params0)),
            )
            params, state = checkpointer.restore(Path(ckpt_dir) / name, target)
            params, state = train(
                make_step(tx), params, state, xs[STEPS_BEFORE:], ys[STEPS_BEFORE:]
            )
            results[name] = jax.device_get((params, state))

    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
