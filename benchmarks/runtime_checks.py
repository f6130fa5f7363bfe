"""The cost of the run-time range checks of traced hyperparameters.

A hyperparameter known when a transform is built is checked then and adds nothing to the
compiled step. One known only at run time (a schedule's output, a value set through
``optax.inject_hyperparams``) is checked inside the step: one conditional per transform,
whose host callback runs only when a value is out of range (``rmsprop_jax.runtime_checks``).
This module times the same jitted, donated train step of
``optax.inject_hyperparams(rmsprop_jax.rmsprop)`` (learning rate, decay, eps and momentum
all traced, so every check is in the step) traced with the checks on and off, in
interleaved rounds, on trees from one tiny leaf to a 16M-parameter vector, and reports the
median step times and their ratio.
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

import rmsprop_jax

HYPERPARAMETERS = dict(learning_rate=1e-3, decay=0.9, eps=1e-8, momentum=0.9)


def _trees(quick: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    big = 2**20 if quick else 16 * 2**20
    return {
        "1 leaf of 256": {"w": (256,)},
        "100 leaves of 64x64": {f"w{i:03d}": (64, 64) for i in range(100)},
        f"1 leaf of {big / 2**20:.0f}M": {"w": (big,)},
    }


def _step(checks: bool, centered: bool) -> tuple[optax.GradientTransformation, Callable]:
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**HYPERPARAMETERS, centered=centered)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with rmsprop_jax.runtime_checks(checks):
        # Traced (and compiled) inside the block: the switch is read when tracing.
        compiled = jax.jit(step, donate_argnums=(0, 1))
        return tx, compiled


def _time(
    runners: dict[str, tuple[Any, Callable, Any]], grads: Any, rounds: int, steps: int
) -> dict[str, list[float]]:
    """Interleaved rounds (A, B, A, B, ... rotated each round); seconds per step."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            state, step, params = runners[name]
            tick = time.perf_counter()
            for _ in range(steps):
                params, state = step(params, state, grads)
            jax.block_until_ready(params)
            times[name].append((time.perf_counter() - tick) / steps)
            runners[name] = (state, step, params)
    return times


def compare(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Step time with the checks on and off, per tree and configuration."""
    rounds = rounds if rounds is not None else (3 if quick else 15)
    rng = np.random.default_rng(0)
    results = []
    for tree_name, shapes in _trees(quick).items():
        grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        size = sum(int(np.prod(s)) for s in shapes.values())
        steps = max(1, min(200, 2**22 // max(size, 1)))
        for centered in (False, True):
            runners: dict[str, tuple[Any, Callable, Any]] = {}
            compile_s = {}
            for checks in (True, False):
                tx, step = _step(checks, centered)
                params = jax.tree.map(jnp.zeros_like, grads)
                state = tx.init(params)
                tick = time.perf_counter()
                params, state = step(params, state, grads)
                jax.block_until_ready(params)
                name = "checks on" if checks else "checks off"
                compile_s[name] = time.perf_counter() - tick
                runners[name] = (state, step, params)
            times = _time(runners, grads, rounds, steps)
            on = statistics.median(times["checks on"])
            off = statistics.median(times["checks off"])
            results.append(
                {
                    "tree": tree_name,
                    "config": "centered+momentum" if centered else "plain+momentum",
                    "step_s_on": on,
                    "step_s_off": off,
                    "min_s_on": min(times["checks on"]),
                    "min_s_off": min(times["checks off"]),
                    "ratio": on / off,
                    "compile_s": compile_s,
                }
            )
    return {"rounds": rounds, "rows": results}


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the medians and their ratio."""
    lines = [
        "#### Run-time hyperparameter checks (inject_hyperparams: lr, decay, eps, momentum traced)",
        "",
        "| tree | config | checks on (median) | checks off (median) | on / off | "
        "min on / min off |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['tree']} | {row['config']} | {row['step_s_on'] * 1e3:.3f} ms | "
            f"{row['step_s_off'] * 1e3:.3f} ms | {row['ratio']:.3f} | "
            f"{row['min_s_on'] / row['min_s_off']:.3f} |"
        )
    lines += [
        "",
        f"Medians of {results['rounds']} interleaved rounds. Concrete hyperparameters are "
        "checked when the transform is built and add nothing to the step.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compare(quick=True)))
