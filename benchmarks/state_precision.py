"""bfloat16 optimizer state on a real training: stochastic rounding against round-to-nearest.

A moving average stored in bfloat16 and rounded to nearest drops every increment below half
a unit in the last place; with decay 0.999 that is any change of :math:`\\nu` smaller than
about 20% of it, so :math:`\\nu` stops following the gradients. :func:`compare` trains the
same MLP on scikit-learn's digits three times from the same initialisation and mini-batches:
float32 state, bfloat16 state with rmsprop_jax's stochastic rounding, and bfloat16 state
rounded to nearest (:func:`nearest_rounding_rmsprop`, written here as the baseline, since
rmsprop_jax itself always rounds bfloat16 state stochastically). It reports how far each
loss curve strays from the float32 one. ``python -m benchmarks`` prints it;
``tests/test_rounding.py`` asserts it. The data come from the demo's public
:mod:`rmsprop_jax.demo.data`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

__all__ = [
    "compare",
    "compare_quantized",
    "format_quantized_table",
    "format_table",
    "nearest_rounding_rmsprop",
]


def nearest_rounding_rmsprop(
    learning_rate: float, decay: float, eps: float
) -> optax.GradientTransformation:
    """Plain RMSProp (eps inside the root) with ``nu`` kept in bfloat16, rounded to nearest.

    As in rmsprop_jax, the arithmetic runs in float32 and the update uses ``nu`` as stored;
    only the rounding of the stored ``nu`` differs.
    """

    def init_fn(params: optax.Params) -> Any:
        return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.bfloat16), params)

    def update_fn(grads: optax.Updates, nu: Any, params: optax.Params | None = None) -> Any:
        del params
        stored = jax.tree.map(
            lambda n, g: (decay * n.astype(jnp.float32) + (1.0 - decay) * g * g).astype(
                jnp.bfloat16
            ),
            nu,
            grads,
        )
        updates = jax.tree.map(
            lambda g, n: -learning_rate * g / jnp.sqrt(n.astype(jnp.float32) + eps), grads, stored
        )
        return updates, stored

    return optax.GradientTransformation(init_fn, update_fn)


def _mlp_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
    logits = hidden @ params["w2"] + params["b2"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _init_mlp(seed: int, features: int, hidden: int, classes: int) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (features, hidden)) / float(np.sqrt(features)),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, classes)) / float(np.sqrt(hidden)),
        "b2": jnp.zeros(classes),
    }


def compare(
    steps: int = 2000,
    decay: float = 0.999,
    learning_rate: float = 1e-3,
    eps: float = 1e-8,
    batch: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains the digits MLP with float32, stochastically rounded and nearest-rounded bf16 state.

    Returns, per variant, the loss curve and its relative deviation from the float32 curve
    (largest, median, and of the mean over the last 10% of steps).
    """
    from rmsprop_jax.demo import data as demo_data

    data = demo_data.load_digits(0)
    x = jnp.asarray(data.x_train.reshape(len(data.x_train), -1))
    y = jnp.asarray(data.y_train)
    batches = jnp.asarray(np.random.default_rng(seed).integers(0, len(x), (steps, batch)))
    variants = {
        "float32 state": rmsprop_jax.rmsprop(learning_rate, decay, eps),
        "bfloat16, stochastic rounding": rmsprop_jax.rmsprop(
            learning_rate, decay, eps, nu_dtype=jnp.bfloat16
        ),
        "bfloat16, round to nearest": nearest_rounding_rmsprop(learning_rate, decay, eps),
    }
    params = _init_mlp(seed, x.shape[1], 64, 10)
    curves = {name: _curve(_mlp_loss, params, tx, x, y, batches) for name, tx in variants.items()}
    reference = curves["float32 state"]
    results: dict[str, Any] = {
        "steps": steps,
        "decay": decay,
        "learning_rate": learning_rate,
        "batch": batch,
    }
    for name, curve in curves.items():
        results[name] = {"curve": curve.tolist(), **_deviations(curve, reference)}
    return results


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare`'s deviations."""
    lines = [
        f"bfloat16 state on the digits MLP: {results['steps']} steps, decay {results['decay']}, "
        f"learning rate {results['learning_rate']}, batch {results['batch']}; relative "
        "deviation of the training loss from the float32-state run",
        "",
        "| state | final loss | max deviation | median deviation | last-10% mean deviation |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, row in results.items():
        if isinstance(row, dict):
            lines.append(
                f"| {name} | {row['final_loss']:.4f} | {row['max_relative_deviation']:.2%} "
                f"| {row['median_relative_deviation']:.2%} "
                f"| {row['tail_mean_relative_deviation']:.2%} |"
            )
    return "\n".join(lines)


# --- 8-bit quantized state -----------------------------------------------------------------


def _deviations(curve: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    tail = max(1, len(curve) // 10)
    deviation = np.abs(curve - reference) / reference
    return {
        "final_loss": float(curve[-1]),
        "max_relative_deviation": float(deviation.max()),
        "median_relative_deviation": float(np.median(deviation)),
        "tail_mean_relative_deviation": float(
            abs(curve[-tail:].mean() - reference[-tail:].mean()) / reference[-tail:].mean()
        ),
    }


def _gru_problem(seed: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """The demo's GRU on the sequence count: (loss, initial parameters, inputs, labels)."""
    from flax import nnx

    from rmsprop_jax.demo import data as demo_data
    from rmsprop_jax.demo import models

    data = demo_data.make_sequence_count(seed)
    model = models.GRUClassifier(2, data.num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))

    def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        state = nnx.State(p)
        logits = nnx.merge(graphdef, state)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params, jnp.asarray(data.x_train), jnp.asarray(data.y_train)


def _curve(
    loss: Any,
    params: Any,
    tx: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    batches: jax.Array,
) -> np.ndarray:
    """The full training-set loss after each mini-batch step of ``tx`` from ``params``."""

    @jax.jit
    def run(params: Any) -> jax.Array:
        def step(carry: Any, idx: jax.Array) -> tuple[Any, jax.Array]:
            params, state = carry
            grads = jax.grad(loss)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), loss(params, x, y)

        return jax.lax.scan(step, (params, tx.init(params)), batches)[1]

    return np.asarray(run(params), dtype=np.float64)


# The noise floor of the deviations: float32 state with every element's update multiplied by
# a fixed factor drawn uniformly from 1 +- JITTER (a per-element learning-rate error of the
# size the 8-bit codes give the update: a relative 2^-5 .. 2^-4). A deviation this run
# reaches too measures the task's sensitivity at that step (an exploding gradient in the
# GRU, say), not the state format.
JITTER = 0.03
JITTER_ROW = "float32 state, learning rate x (1 +- 3%) per element"

QUANTIZED_FORMATS = {
    "float32 state": None,
    "bfloat16, stochastic rounding": jnp.bfloat16,
    "8-bit, stochastic rounding": rmsprop_jax.quantized(min_size=0),
    "8-bit, round to nearest": rmsprop_jax.quantized(min_size=0, stochastic_rounding=False),
}


def compare_quantized(
    steps: int = 2000,
    decay: float = 0.999,
    learning_rate: float = 1e-3,
    eps: float = 1e-8,
    batch: int = 64,
    seeds: tuple[int, ...] = (0,),
    tasks: tuple[str, ...] = ("mlp", "gru"),
    formats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The digits MLP and the GRU with every state format, plain and centered with momentum.

    Every statistic uses the format (``min_size=0``: every leaf is quantized, the biases
    too). Each seed draws the initialisation and the mini-batches. Returns ``{task:
    {configuration: {format: deviations}}}`` with the deviations of :func:`compare`; a task
    run with a seed other than 0 is named ``"task, seed s"``.
    """
    from rmsprop_jax.demo import data as demo_data

    formats = QUANTIZED_FORMATS if formats is None else formats
    results: dict[str, Any] = {"steps": steps, "decay": decay, "learning_rate": learning_rate}
    for task, seed in [(task, seed) for task in tasks for seed in seeds]:
        if task == "mlp":
            data = demo_data.load_digits(0)
            x = jnp.asarray(data.x_train.reshape(len(data.x_train), -1))
            y = jnp.asarray(data.y_train)
            params = _init_mlp(seed, x.shape[1], 64, 10)
            loss: Any = _mlp_loss
        else:
            loss, params, x, y = _gru_problem(seed)
        batches = jnp.asarray(np.random.default_rng(seed).integers(0, len(x), (steps, batch)))
        key = task if seed == 0 else f"{task}, seed {seed}"
        results[key] = {}
        for config, centered in (("plain", False), ("centered + momentum 0.9", True)):
            curves = {}
            for name, fmt in [*formats.items(), (JITTER_ROW, None)]:
                extra = dict(centered=True, momentum=0.9, mu_dtype=fmt) if centered else {}
                # Momentum 0.9 multiplies the step by ~10: a tenth of the learning rate keeps
                # the two configurations at comparable losses (relative deviations of a
                # loss near 0 measure noise).
                tx = rmsprop_jax.rmsprop(
                    learning_rate / 10 if centered else learning_rate,
                    decay,
                    eps if not centered else 1e-6,
                    nu_dtype=fmt,
                    momentum_dtype=fmt if centered else None,
                    **extra,
                )
                if name == JITTER_ROW:
                    tx = optax.chain(tx, _jitter(params, JITTER, seed))
                curves[name] = _curve(loss, params, tx, x, y, batches)
            reference = curves[next(iter(formats))]
            results[key][config] = {
                name: _deviations(curve, reference) for name, curve in curves.items()
            }
    return results


def _jitter(params: Any, size: float, seed: int) -> optax.GradientTransformation:
    """Multiplies each element of the updates by a fixed factor uniform in 1 +- ``size``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    factors = treedef.unflatten(
        [
            1 + jax.random.uniform(key, jnp.shape(leaf), minval=-size, maxval=size)
            for key, leaf in zip(keys, leaves, strict=True)
        ]
    )

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(jnp.multiply, updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def format_quantized_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare_quantized`'s deviations."""
    lines = [
        f"8-bit state: {results['steps']} steps, decay {results['decay']}, learning rate "
        f"{results['learning_rate']}; relative deviation of the training loss from the "
        "float32-state run (every leaf in the format; the last row of each block is float32 "
        f"state with a fixed per-element learning-rate error of up to {JITTER:.0%}, the noise "
        "floor)",
        "",
        "| task | configuration | state | final loss | max | median | last 10% |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for task, configs in results.items():
        if not isinstance(configs, dict):
            continue
        for config, rows in configs.items():
            for name, row in rows.items():
                lines.append(
                    f"| {task} | {config} | {name} | {row['final_loss']:.4f} "
                    f"| {row['max_relative_deviation']:.2%} "
                    f"| {row['median_relative_deviation']:.2%} "
                    f"| {row['tail_mean_relative_deviation']:.2%} |"
                )
    return "\n".join(lines)
