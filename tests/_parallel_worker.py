"""Data-parallel training with ``pmap`` and ``shard_map`` on 4 virtual CPU devices.

Run by ``tests/test_jax_transforms.py`` in a subprocess, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before JAX starts, so the
test process keeps its single device. Usage::

    python tests/_parallel_worker.py OUTPUT.pkl

For each optimizer configuration it trains the same small MLP on the same global
batch four ways and pickles the final parameters, states and losses:

* ``reference``: one device, the whole batch;
* ``pmap``: parameters replicated, batch split over devices, ``lax.pmean`` of the
  gradients (the per-device copies are kept, to check they agree bit for bit);
* ``shard_map``: the same with ``jax.shard_map`` on a 1-D mesh (the loss is
  ``pmean``-ed, see below);
* ``fsdp``: ``jax.shard_map`` with parameters *and optimizer state* split over the
  devices (ZeRO-3 style): ``all_gather`` the parameters, ``psum_scatter`` the
  gradients, and each device updates its own slice of the state;
* ``fsdp_scan``: the same with ``init`` and a ``lax.scan`` over the steps inside one
  ``shard_map`` (an error message instead, if it fails).

Nothing runs on import: pytest's ``--doctest-modules`` imports this file.
"""

from __future__ import annotations

import functools
import pickle
import sys

N_DEVICES = 4
STEPS = 10
BATCH, FEATURES, HIDDEN, OUT = 32, 8, 8, 4  # leading dims divisible by N_DEVICES

CONFIGS = {
    "plain": dict(learning_rate=0.01),
    "centered_momentum": dict(learning_rate=0.003, centered=True, momentum=0.9, eps=1e-4),
    "bias_nesterov": dict(
        learning_rate=0.01, bias_correction=True, momentum=0.5, nesterov=True, decay=0.95
    ),
}


def make_problem():
    import numpy as np

    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
        "b2": np.zeros(OUT),
    }
    x = rng.normal(size=(BATCH, FEATURES))
    y = np.tanh(x @ rng.normal(size=(FEATURES, OUT)))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {k: f32(v) for k, v in params.items()}, f32(x), f32(y)


def main(out_path: str) -> None:
    import warnings

    warnings.simplefilter("error")  # as in the test suite

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == N_DEVICES, jax.devices()

    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
        return jnp.mean((h @ params["w2"] + params["b2"][None, :] - y) ** 2)

    params0, x, y = make_problem()
    mesh = jax.make_mesh((N_DEVICES,), ("data",))
    results = {}

    for name, config in CONFIGS.items():
        tx = rmsprop_jax.rmsprop(**config)

        def dp_step(params, state, x, y, *, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            grads, loss = jax.lax.pmean((grads, loss), "data")
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        def train(step, params, state, x, y):
            losses = []
            for _ in range(STEPS):
                params, state, loss = step(params, state, x, y)
                losses.append(loss)
            return jax.device_get((params, state, losses))

        # One device, the whole batch.
        @jax.jit
        def single_step(params, state, x, y, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        one = jax.devices()[0]
        p, s = jax.device_put((params0, tx.init(params0)), one)
        reference = train(single_step, p, s, jax.device_put(x, one), jax.device_put(y, one))

        # pmap: a leading device axis on everything.
        def replicate(tree):
            return jax.tree.map(lambda a: np.broadcast_to(a, (N_DEVICES, *np.shape(a))), tree)

        def split(a):
            return a.reshape(N_DEVICES, -1, *a.shape[1:])

        pmapped = train(
            jax.pmap(dp_step, axis_name="data"),
            replicate(params0),
            replicate(jax.device_get(tx.init(params0))),
            split(x),
            split(y),
        )

        # shard_map, parameters and state replicated, batch split. Under shard_map's
        # replication checking (check_vma) the gradient with respect to a replicated
        # input is summed over the devices by autodiff itself, so the mean is taken by
        # pmean-ing the loss before differentiating, not the gradients after.
        def ddp_step(params, state, x, y, *, tx=tx):
            mean_loss = lambda *args: jax.lax.pmean(loss_fn(*args), "data")  # noqa: E731
            loss, grads = jax.value_and_grad(mean_loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        def put(tree, spec):
            return jax.device_put(tree, NamedSharding(mesh, spec))

        ddp = jax.jit(
            jax.shard_map(
                ddp_step,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=(P(), P(), P()),
            )
        )
        sharded = train(
            ddp, put(params0, P()), put(tx.init(params0), P()), put(x, P("data")), put(y, P("data"))
        )

        # shard_map, parameters and state split over the devices along their first axis.
        param_specs = jax.tree.map(lambda _: P("data"), params0)
        state_specs = optax.tree_map_params(
            tx,
            lambda _, spec: spec,
            jax.eval_shape(tx.init, params0),
            param_specs,
            transform_non_params=lambda _: P(),
            is_leaf=lambda v: isinstance(v, P),
        )

        def fsdp_step(shards, state, x, y, *, tx=tx):
            gather = functools.partial(jax.lax.all_gather, axis_name="data", tiled=True)
            loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(gather, shards), x, y)
            grads = jax.tree.map(
                lambda g: jax.lax.psum_scatter(g, "data", tiled=True) / N_DEVICES, grads
            )
            updates, state = tx.update(grads, state, shards)
            return optax.apply_updates(shards, updates), state, jax.lax.pmean(loss, "data")

        fsdp = jax.jit(
            jax.shard_map(
                fsdp_step,
                mesh=mesh,
                in_specs=(param_specs, state_specs, P("data"), P("data")),
                out_specs=(param_specs, state_specs, P()),
            )
        )
        # Each device initialises the state of its own slice.
        fsdp_init = jax.jit(
            jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=state_specs)
        )
        shards = jax.tree.map(lambda a, spec: put(a, spec), params0, param_specs)
        fsdp_state = fsdp_init(shards)
        specs_hold = [
            leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
            for leaf, spec in zip(
                jax.tree.leaves(fsdp_state),
                jax.tree.leaves(state_specs, is_leaf=lambda v: isinstance(v, P)),
            )
        ]
        fully_sharded = train(fsdp, shards, fsdp_state, put(x, P("data")), put(y, P("data")))

        # The same, with init and the whole loop (a lax.scan) inside one shard_map: the
        # state that init returns must have the type the update returns, varying
        # over "data" like the slices of the parameters, or scan rejects the carry.
        def fsdp_loop(shards, xs, ys, *, fsdp_step=fsdp_step, tx=tx):
            def body(carry, batch):
                shards, state, loss = fsdp_step(*carry, *batch)
                return (shards, state), loss

            (shards, state), losses = jax.lax.scan(body, (shards, tx.init(shards)), (xs, ys))
            return shards, state, losses

        loop = jax.jit(
            jax.shard_map(
                fsdp_loop,
                mesh=mesh,
                in_specs=(param_specs, P(None, "data"), P(None, "data")),
                out_specs=(param_specs, state_specs, P()),
            )
        )
        stacked = lambda a: put(np.broadcast_to(a, (STEPS, *a.shape)), P(None, "data"))  # noqa: E731
        try:
            scanned = jax.device_get(loop(shards, stacked(x), stacked(y)))
            scanned = (scanned[0], scanned[1], list(scanned[2]))
        except Exception as error:  # reported to the test, which shows it
            scanned = f"{type(error).__name__}: {error}"

        results[name] = {
            "fsdp_scan": scanned,
            "reference": reference,
            "pmap": pmapped,
            "shard_map": sharded,
            "fsdp": fully_sharded,
            "fsdp_state_specs_hold": specs_hold,
            "fsdp_state_specs": str(state_specs),
        }

    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
