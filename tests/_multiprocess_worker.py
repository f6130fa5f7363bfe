"""One of several JAX processes training a model data-parallel with rmsprop_jax.

Started by ``tests/test_multiprocess.py`` (one ``Popen`` per process) with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``, so each process owns 2 CPU
devices. Usage::

    python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The processes meet through ``jax.distributed.initialize`` at ``127.0.0.1:PORT``
and talk through gloo CPU collectives. Every step's global batch is split over
all the devices of all the processes; parameters and optimizer state are
replicated. Each process pickles the parameters and state it ends with, and
whether its local copies agree, to ``OUT_DIR/process_<id>.pkl``.

The problem (``make_problem``, ``loss_fn``, ``CONFIGS``) is importable, so the
test can train the same model in one process for comparison. Nothing runs on
import: pytest's ``--doctest-modules`` imports this file.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

STEPS = 10
BATCH, FEATURES, HIDDEN, OUT = 32, 6, 8, 3
CONFIGS = {
    "momentum": dict(learning_rate=0.01, momentum=0.9),
    "centered_bias": dict(learning_rate=0.01, centered=True, bias_correction=True, eps=1e-3),
}


def make_problem():
    """Initial parameters and one global batch per step, the same in every process."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
        "b2": np.zeros(OUT),
    }
    x = rng.normal(size=(STEPS, BATCH, FEATURES))
    y = np.tanh(x @ rng.normal(size=(FEATURES, OUT))) + 0.5
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return params, x.astype(np.float32), y.astype(np.float32)


def loss_fn(params, x, y):
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean((h @ params["w2"] + params["b2"][None, :] - y) ** 2)


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    import warnings

    warnings.simplefilter("error")  # as in the test suite

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",  # not every interface, the default
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    try:
        run(out_dir)
    finally:
        jax.distributed.shutdown()


def run(out_dir: str) -> None:
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax

    assert jax.local_device_count() == 2, jax.local_devices()
    assert jax.device_count() == 2 * jax.process_count(), jax.devices()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
        # Every process knows the whole value and hands over its devices' slices.
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    params0, xs, ys = make_problem()
    results = {}
    for name, config in CONFIGS.items():
        tx = rmsprop_jax.rmsprop(**config)

        @jax.jit
        def step(params, state, x, y, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params = jax.tree.map(lambda a: global_array(a, replicated), params0)
        state = jax.tree.map(
            lambda a: global_array(np.asarray(a), replicated), jax.device_get(tx.init(params0))
        )
        losses = []
        for x, y in zip(xs, ys):
            x, y = global_array(x, split), global_array(y, split)
            assert not x.is_fully_addressable  # part of the batch lives in the other process
            params, state, loss = step(params, state, x, y)
            losses.append(loss)

        final = (params, state, losses)
        first = jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data), final)
        agree = all(
            np.array_equal(np.asarray(shard.data), np.asarray(a.addressable_shards[0].data))
            for a in jax.tree.leaves(final)
            for shard in a.addressable_shards
        )
        results[name] = {"params": first[0], "state": first[1], "losses": first[2], "agree": agree}
        results[name]["replicated"] = all(
            leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves((params, state))
        )

    out = Path(out_dir) / f"process_{jax.process_index()}.pkl"
    with out.open("wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
