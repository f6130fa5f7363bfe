"""Optimizer state and updates for parameters sharded on a 2-D mesh of 8 CPU devices.

Run by ``tests/test_sharding.py`` in a subprocess, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts, so the
test process keeps its single device. Usage::

    python tests/_sharding_worker.py REPORT.json

For each mesh (both axes ``Explicit``, both ``Auto``, one of each) and each
optimizer configuration it records, as JSON:

* the sharding of every leaf of the state returned by ``init`` (eagerly and under
  ``jax.jit``) and by a jitted ``update``, next to the sharding expected for it:
  that of its parameter for leaves shaped like a parameter (found with
  ``optax.tree_map_params``), replicated for the scalars;
* the collectives in the compiled update's HLO;
* the largest difference between the sharded updates and the same updates on one
  device, relative to the value's magnitude (or absolute below 1).

The test process reads the report and does the asserting. Nothing runs on import:
pytest's ``--doctest-modules`` imports this file.
"""

from __future__ import annotations

import json
import re
import sys

N_DEVICES = 8
MESH_SHAPE = (2, 4)
AXES = ("x", "y")
MESHES = {
    "explicit": ("Explicit", "Explicit"),
    "auto": ("Auto", "Auto"),
    "mixed": ("Explicit", "Auto"),
}
CONFIGS = {
    "plain": dict(learning_rate=0.1),
    "centered_momentum_bias": dict(
        learning_rate=0.1, centered=True, momentum=0.9, bias_correction=True, eps=1e-4
    ),
    # 8-bit state: "q" and "qt" (512 elements) are quantized in blocks of 32 along their
    # last axis, which their sharding splits into whole blocks; the other leaves are smaller
    # than min_size and keep float32.
    "quantized": dict(learning_rate=0.1, centered=True, momentum=0.9, eps=1e-4, quantized=True),
}
QUANTIZED = dict(min_size=512, block_size=32)
# name: (shape, partition spec as a tuple of mesh axes or None)
PARAMS = {
    "w": ((8, 16), ("x", "y")),
    "v": ((16, 4), ("y", "x")),
    "b": ((16,), ("y",)),
    "r": ((6,), ()),
    "s": ((), ()),
    "q": ((4, 128), ("x", "y")),  # 32 elements of the last axis per device: one block
    "qt": ((8, 64), ("y", "x")),  # 32 per device on the last axis too
}
COLLECTIVES = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
)


def main(report_path: str) -> None:
    import warnings

    warnings.simplefilter("error")  # as in the test suite

    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == N_DEVICES, jax.devices()

    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in PARAMS.items()}
    g = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in PARAMS.items()}
    # The second gradient is far from the first everywhere, so that the two-sample
    # centered variance has no cancellation to amplify rounding differences.
    grads = [g, jax.tree.map(lambda a: np.float32(-1.5) * a, g)]

    def describe(sharding) -> str:
        return str(sharding.spec) if isinstance(sharding, NamedSharding) else repr(sharding)

    def compare(tree, expected) -> list[dict]:
        """One record per leaf: its sharding, the expected one, and whether they agree."""
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        wanted = jax.tree.leaves(expected, is_leaf=lambda s: isinstance(s, NamedSharding))
        assert len(leaves) == len(wanted)
        return [
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(leaf.shape),
                "sharding": describe(leaf.sharding),
                "expected": describe(want),
                "ok": bool(leaf.sharding.is_equivalent_to(want, leaf.ndim)),
            }
            for (path, leaf), want in zip(leaves, wanted)
        ]

    report = {}
    for mesh_name, axis_types in MESHES.items():
        mesh = jax.make_mesh(
            MESH_SHAPE, AXES, axis_types=tuple(getattr(AxisType, t) for t in axis_types)
        )
        for config_name, config in CONFIGS.items():
            config = dict(config)
            if config.pop("quantized", False):
                fmt = rmsprop_jax.quantized(**QUANTIZED)
                config.update(nu_dtype=fmt, mu_dtype=fmt, momentum_dtype=fmt)
            tx = rmsprop_jax.rmsprop(**config)

            replicated = NamedSharding(mesh, P())

            def step(params, state, grads, *, tx=tx):
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            with jax.set_mesh(mesh):
                shardings = {k: NamedSharding(mesh, P(*spec)) for k, (_, spec) in PARAMS.items()}
                params = jax.device_put(values, shardings)
                grads_sharded = [jax.device_put(g, shardings) for g in grads]
                # A quantized leaf's codes and scales both take its parameter's sharding.
                expected = optax.tree_map_params(
                    tx,
                    lambda leaf, sharding: (
                        rmsprop_jax.QuantizedArray(sharding, sharding)
                        if isinstance(leaf, rmsprop_jax.QuantizedArray)
                        else sharding
                    ),
                    jax.eval_shape(tx.init, values),
                    shardings,
                    transform_non_params=lambda _, r=replicated: r,
                    is_leaf=lambda s: isinstance(s, (NamedSharding, rmsprop_jax.QuantizedArray)),
                )
                record = {
                    "params": compare(params, shardings),
                    "init_eager": compare(tx.init(params), expected),
                    "init_jit": compare(jax.jit(tx.init)(params), expected),
                }
                # The update is checked from a state laid out as expected, so that it is
                # tested on its own, whatever ``init`` does.
                state = jax.device_put(jax.device_get(tx.init(values)), expected)
                jitted = jax.jit(step)
                hlo = jitted.lower(params, state, grads_sharded[0]).compile().as_text()
                new_params, new_state = params, state
                for g in grads_sharded:
                    new_params, new_state = jitted(new_params, new_state, g)
                record["update_state"] = compare(new_state, expected)
                record["update_params"] = compare(new_params, shardings)
                record["collectives"] = sorted(set(COLLECTIVES.findall(hlo)))
                sharded_result = jax.device_get((new_params, new_state))

            # The same two steps on one device, outside the mesh.
            one = jax.devices()[0]
            single = jax.jit(step)
            p1, s1 = jax.device_put((values, jax.device_get(tx.init(values))), one)
            for g in grads:
                p1, s1 = single(p1, s1, jax.device_put(g, one))

            def relative_difference(a, b):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))

            differences = jax.tree.map(
                relative_difference, sharded_result, jax.device_get((p1, s1))
            )
            record["max_relative_difference"] = max(jax.tree.leaves(differences))
            report[f"{mesh_name}/{config_name}"] = record

    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
