"""Compile time of one jitted, donated train step against the number of leaves.

For trees of small 2-D and 1-D leaves (six shapes in a cycle, 384 elements on average, as
in :func:`benchmarks.train_step.small_leaf_shapes`), the seconds to trace and lower
(``jax.jit(...).lower``) and to compile (``.compile()``) the step ``update`` then
``optax.apply_updates``, for ``rmsprop_jax.rmsprop`` and ``optax.rmsprop`` in the same run.
Each cell is the minimum over ``repeats`` compilations with JAX's caches cleared before
each, contenders interleaved, so the ratio to optax is measured side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks.train_step import small_leaf_shapes

CONTENDERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax plain": lambda: optax.rmsprop(1e-3),
    "rmsprop_jax plain": lambda: rmsprop_jax.rmsprop(1e-3),
    "optax centered+momentum": lambda: optax.rmsprop(1e-3, centered=True, momentum=0.9),
    "rmsprop_jax centered+momentum+bias": lambda: rmsprop_jax.rmsprop(
        1e-3, centered=True, momentum=0.9, bias_correction=True
    ),
    "rmsprop_jax plain, bfloat16 state": lambda: rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16),
}
# The optax row each rmsprop_jax row is compared with.
BASELINE = {
    "rmsprop_jax plain": "optax plain",
    "rmsprop_jax centered+momentum+bias": "optax centered+momentum",
    "rmsprop_jax plain, bfloat16 state": "optax plain",
}


def _seconds(tx: optax.GradientTransformation, params: Any) -> tuple[float, float]:
    """Seconds to lower and to compile the donated step, with JAX's caches cleared first."""
    grads = jax.tree.map(jnp.ones_like, params)

    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    jax.clear_caches()
    tick = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    lower_s = time.perf_counter() - tick
    tick = time.perf_counter()
    lowered.compile()
    return lower_s, time.perf_counter() - tick


def compare(leaf_counts: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Lowering and compile seconds per contender and leaf count (minimum over repeats)."""
    rows = []
    for count in leaf_counts:
        params = {k: jnp.zeros(s, jnp.float32) for k, s in small_leaf_shapes(count).items()}
        best: dict[str, tuple[float, float]] = {}
        for r in range(repeats):
            names = list(CONTENDERS)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                # optax computes decay ** count on int/float: standard promotion for it.
                with jax.numpy_dtype_promotion("standard"):
                    lower_s, compile_s = _seconds(CONTENDERS[name](), params)
                old = best.get(name, (np.inf, np.inf))
                if lower_s + compile_s < sum(old):
                    best[name] = (lower_s, compile_s)
        for name, (lower_s, compile_s) in best.items():
            rows.append(
                {"leaves": count, "contender": name, "lower_s": lower_s, "compile_s": compile_s}
            )
    return {"repeats": repeats, "rows": rows}


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: seconds to lower and compile, and the ratio to optax's total."""
    totals = {(r["leaves"], r["contender"]): r["lower_s"] + r["compile_s"] for r in results["rows"]}
    lines = [
        "#### Compile time against the number of leaves (small leaves, six shapes)",
        "",
        "| leaves | contender | lower | compile | total | total / optax |",
        "|--:|---|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        total = row["lower_s"] + row["compile_s"]
        baseline = BASELINE.get(row["contender"])
        ratio = f"{total / totals[(row['leaves'], baseline)]:.2f}" if baseline else "—"
        lines.append(
            f"| {row['leaves']} | {row['contender']} | {row['lower_s']:.2f} s | "
            f"{row['compile_s']:.2f} s | {total:.2f} s | {ratio} |"
        )
    lines += [
        "",
        f"Minimum of {results['repeats']} compilations per cell, JAX's caches cleared before "
        "each, contenders interleaved; the bfloat16 row is compared with optax's plain step.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compare((30, 100), repeats=2)))
