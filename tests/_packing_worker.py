"""Worker for ``test_packing.py``: packing on a mesh of 4 virtual CPU devices.

Run by the test in a fresh process (the device count is fixed when JAX starts).
Parameters: two replicated small vectors (packed together), a small vector and a
matrix both split over the mesh (never packed). Writes the layout, the number of
collectives in the compiled packed update, whether every state leaf kept its
parameter's sharding, and the packed and unpacked updates (which must be equal).
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax


def main(out: str) -> None:
    mesh = jax.make_mesh((4,), ("x",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))
    rng = np.random.default_rng(0)
    shapes = {
        "replicated_a": ((3,), replicated),
        "replicated_b": ((5,), replicated),
        "sharded_small": ((8,), split),
        "sharded_wide": ((8, 6), split),
    }
    params = {
        k: jax.device_put(jnp.asarray(rng.normal(size=s), jnp.float32), sh)
        for k, (s, sh) in shapes.items()
    }
    grads = {
        k: jax.device_put(jnp.asarray(rng.normal(size=s), jnp.float32), sh)
        for k, (s, sh) in shapes.items()
    }
    inner = lambda: rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9)  # noqa: E731
    tx = rmsprop_jax.pack_small_leaves(inner(), max_leaf_size=64)
    state = tx.init(params)
    update = jax.jit(tx.update)
    hlo = update.lower(grads, state, params).compile().as_text()
    collectives = len(
        re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", hlo)
    )
    packed, new_state = update(grads, state, params)
    unpacked, _ = jax.jit(inner().update)(grads, inner().init(params), params)
    nu = new_state.inner_state[0].nu
    kept = all(
        leaf.sharding.is_equivalent_to(params[name].sharding, leaf.ndim)
        for name, leaf in zip(["sharded_small", "sharded_wide"], nu.unpacked)
    ) and all(b.sharding.is_fully_replicated for b in nu.buffers)
    flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    np.savez(
        out,
        groups=np.asarray(state.layout.groups),
        collectives=collectives,
        shardings_kept=kept,
        packed=flat(packed),
        unpacked=flat(unpacked),
    )


if __name__ == "__main__":
    main(sys.argv[1])
