"""Ways to pack many small leaves into one buffer and back: compile seconds and step time.

A plain RMSProp step written by hand on a tree of small leaves (the six shapes of
:func:`benchmarks.train_step.small_leaf_shapes`), jitted with the parameters and the state
donated, in these formulations:

* ``per leaf``: one computation per leaf, no packing (what optax does);
* ``packed state, split``: the gradients concatenated into one buffer, the state one flat
  buffer, the updates cut back with ``jnp.split``;
* ``packed state, lax.slice``: the same, cut with one ``lax.slice`` per leaf (constant offsets);
* ``packed state, chunked concatenate``: concatenation in chunks of 64 leaves, ``lax.slice``;
* ``packed state, dynamic_slice``: ``lax.dynamic_slice`` at constant offsets;
* ``packed state, dynamic_slice, run-time offsets``: ``lax.dynamic_slice`` at offsets passed
  through a ``lax.cond`` that XLA does not fold (what :func:`rmsprop_jax.pack_small_leaves`
  does), so leaves of one shape share one compiled kernel;
* ``packed gradients and state, per-leaf state``: the state stays per leaf and is concatenated
  each step along with the gradients, then cut back (the state layout unchanged).

XLA:CPU compiles one kernel per distinct fused computation; a constant offset makes every
leaf's slicing kernel distinct, which is what the run-time offsets avoid.

:func:`compare_sizes` times ``rmsprop_jax.pack_small_leaves(rmsprop_jax.rmsprop(...))``
against the unpacked step on trees of equal leaves of one size, to show up to which leaf
size packing pays (the default ``max_leaf_size``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import rmsprop_jax
from benchmarks.train_step import small_leaf_shapes


def _kernel(nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    nu = 0.9 * nu + 0.1 * g * g
    return -1e-3 * g / jnp.sqrt(nu + 1e-8), nu


def _opaque(values: list[int]) -> tuple[jax.Array, ...]:
    # The mechanism of rmsprop_jax._opaque.runtime_values, written out (private API).
    def make() -> tuple[jax.Array, ...]:
        return tuple(jnp.int32(v) for v in values)

    return lax.cond(lax.optimization_barrier(jnp.bool_(True)), make, make)


def _formulations(shapes: list[tuple[int, ...]]) -> dict[str, tuple[Callable[..., Any], bool]]:
    """Each formulation's step ``(params, state, grads) -> (params, state)`` and whether its
    state is one flat buffer."""
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = [int(o) for o in np.cumsum([0, *sizes])[:-1]]

    def flat(xs: list[jax.Array]) -> jax.Array:
        return lax.concatenate([x.reshape(-1) for x in xs], 0)

    def chunked(xs: list[jax.Array]) -> jax.Array:
        return lax.concatenate([flat(xs[i : i + 64]) for i in range(0, len(xs), 64)], 0)

    def by_split(u: jax.Array) -> list[jax.Array]:
        parts = jnp.split(u, np.cumsum(sizes)[:-1])
        return [x.reshape(s) for x, s in zip(parts, shapes)]

    def by_slice(u: jax.Array) -> list[jax.Array]:
        return [lax.slice(u, (o,), (o + n,)).reshape(s) for o, n, s in zip(offsets, sizes, shapes)]

    def by_dynamic_slice(u: jax.Array) -> list[jax.Array]:
        return [
            lax.dynamic_slice(u, (jnp.int32(o),), (n,)).reshape(s)
            for o, n, s in zip(offsets, sizes, shapes)
        ]

    def by_runtime_offsets(u: jax.Array) -> list[jax.Array]:
        return [
            lax.dynamic_slice(u, (o,), (n,)).reshape(s)
            for o, n, s in zip(_opaque(offsets), sizes, shapes)
        ]

    def per_leaf(p: list, nu: list, g: list) -> tuple[list, list]:
        out = [_kernel(n, x) for n, x in zip(nu, g)]
        return [a + u for a, (u, _) in zip(p, out)], [n for _, n in out]

    def packed(pack: Callable, unpack: Callable) -> Callable[..., Any]:
        def step(p: list, nu: jax.Array, g: list) -> tuple[list, jax.Array]:
            u, nu = _kernel(nu, pack(g))
            return [a + b for a, b in zip(p, unpack(u))], nu

        return step

    def per_leaf_state(p: list, nu: list, g: list) -> tuple[list, list]:
        u, new = _kernel(flat(nu), flat(g))
        return [a + b for a, b in zip(p, by_slice(u))], by_slice(new)

    return {
        "per leaf": (per_leaf, False),
        "packed state, split": (packed(flat, by_split), True),
        "packed state, lax.slice": (packed(flat, by_slice), True),
        "packed state, chunked concatenate": (packed(chunked, by_slice), True),
        "packed state, dynamic_slice": (packed(flat, by_dynamic_slice), True),
        "packed state, dynamic_slice, run-time offsets": (packed(flat, by_runtime_offsets), True),
        "packed gradients and state, per-leaf state": (per_leaf_state, False),
    }


def compare(leaves: int, repeats: int, steps_per_sample: int = 10) -> dict[str, Any]:
    """Compile seconds (caches cleared) and step times of every formulation on ``leaves``."""
    shapes = list(small_leaf_shapes(leaves).values())
    params = [jnp.zeros(s, jnp.float32) for s in shapes]
    grads = [jnp.full(s, 0.1, jnp.float32) for s in shapes]
    total = sum(int(np.prod(s)) for s in shapes)
    compiled, live, compile_s = {}, {}, {}
    for name, (step, packed_state) in _formulations(shapes).items():
        state = jnp.zeros(total) if packed_state else [jnp.zeros_like(p) for p in params]
        jax.clear_caches()
        tick = time.perf_counter()
        compiled[name] = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        compile_s[name] = time.perf_counter() - tick
        live[name] = ([p.copy() for p in params], state)
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    names = list(compiled)
    for round_ in range(repeats + 1):  # round 0 warms up
        for offset in range(len(names)):
            name = names[(round_ + offset) % len(names)]
            p, s = live[name]
            tick = time.perf_counter()
            for _ in range(steps_per_sample):
                p, s = compiled[name](p, s, grads)
            jax.block_until_ready((p, s))
            if round_:
                samples[name].append((time.perf_counter() - tick) / steps_per_sample)
            live[name] = (p, s)
    return {
        "leaves": leaves,
        "repeats": repeats,
        "rows": [
            {
                "formulation": name,
                "compile_s": compile_s[name],
                "median_s": statistics.median(samples[name]),
                "min_s": min(samples[name]),
            }
            for name in names
        ],
    }


def format_table(results: dict[str, Any]) -> str:
    """Markdown: compile seconds and step time, with ratios to the per-leaf step."""
    base = results["rows"][0]
    lines = [
        f"#### Packing formulations: a hand-written plain step on {results['leaves']} small leaves",
        "",
        "| formulation | lower+compile s | × per leaf | step median ms | × per leaf |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['formulation']} | {row['compile_s']:.2f} | "
            f"{row['compile_s'] / base['compile_s']:.2f} | {row['median_s'] * 1e3:.2f} | "
            f"{row['median_s'] / base['median_s']:.2f} |"
        )
    lines += [
        "",
        f"Step times: medians of {results['repeats']} interleaved rounds; one compilation per "
        "row with JAX's caches cleared.",
    ]
    return "\n".join(lines)


def compare_sizes(sizes: tuple[int, ...], repeats: int, elements: int = 2**22) -> dict[str, Any]:
    """Packed against unpacked ``rmsprop_jax.rmsprop`` steps on trees of equal leaves.

    For each size, a tree of ``elements / size`` leaves (between 20 and 400) of that size;
    the packed step packs every leaf (``max_leaf_size=size``). Medians of interleaved rounds.
    """
    rows = []
    for size in sizes:
        count = max(20, min(400, elements // size))
        params = {f"leaf{i:03d}": jnp.zeros((size,), jnp.float32) for i in range(count)}
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
        runs: dict[str, list[Any]] = {}
        contenders = {
            "unpacked": rmsprop_jax.rmsprop(1e-3),
            "packed": rmsprop_jax.pack_small_leaves(rmsprop_jax.rmsprop(1e-3), max_leaf_size=size),
        }
        for name, tx in contenders.items():

            def step(p: Any, s: Any, g: Any, tx: optax.GradientTransformation = tx) -> Any:
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            state = tx.init(params)
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
            runs[name] = [compiled, (jax.tree.map(jnp.copy, params), state)]
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(repeats + 1):  # round 0 warms up
            for name in list(runs) if round_ % 2 else list(runs)[::-1]:
                compiled, (p, s) = runs[name]
                tick = time.perf_counter()
                for _ in range(3):
                    p, s = compiled(p, s, grads)
                jax.block_until_ready(p)
                if round_:
                    samples[name].append((time.perf_counter() - tick) / 3)
                runs[name][1] = (p, s)
        packed, unpacked = (statistics.median(samples[k]) for k in ("packed", "unpacked"))
        rows.append({"size": size, "leaves": count, "packed_s": packed, "unpacked_s": unpacked})
    return {"repeats": repeats, "rows": rows}


def format_sizes_table(results: dict[str, Any]) -> str:
    """Markdown: packed and unpacked step time by leaf size."""
    lines = [
        "#### pack_small_leaves by leaf size (plain rmsprop, every leaf packed)",
        "",
        "| leaf size | leaves | unpacked ms | packed ms | packed / unpacked |",
        "|--:|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['size']} | {row['leaves']} | {row['unpacked_s'] * 1e3:.2f} | "
            f"{row['packed_s'] * 1e3:.2f} | {row['packed_s'] / row['unpacked_s']:.2f} |"
        )
    lines += ["", f"Medians of {results['repeats']} interleaved rounds of 3 steps."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compare(300, repeats=5)))
