"""The demo's optimizers, tasks and training loop.

Every optimizer (a :class:`Contender`) trains the same initialisation on the same mini-batches
of a :class:`Task`. :func:`train_contender` trains all learning rates and seeds of one
optimizer together in a single ``vmap``-ed, ``jit``-compiled loop; :func:`summarise` picks the
learning rate from the five swept, half a decade apart, by the final training loss averaged
over seeds and gives the mean ± std over seeds at that rate.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import presets
from rmsprop_jax.demo import data as demo_data

__all__ = [
    "CONTENDERS",
    "QUICK_CONTENDERS",
    "Contender",
    "Task",
    "build_tasks",
    "summarise",
    "train_contender",
]

MakeTx = Callable[[jax.Array], optax.GradientTransformation]


class Contender(NamedTuple):
    """An optimizer built from a (possibly traced) learning rate, and the rates to sweep."""

    make: MakeTx
    learning_rates: tuple[float, ...]  # half-decade steps; the table flags a pick at an end
    # optax's own optimizers rely on standard dtype promotion (e.g. adam's bias correction takes
    # a Python float to an int32 power), so they are traced under it even in strict test runs.
    strict: bool = True


_RMS_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

CONTENDERS: dict[str, Contender] = {
    "rmsprop": Contender(lambda lr: rmsprop_jax.rmsprop(lr), _RMS_LRS),
    "rmsprop centered": Contender(lambda lr: rmsprop_jax.rmsprop(lr, centered=True), _RMS_LRS),
    "rmsprop momentum 0.9": Contender(
        lambda lr: rmsprop_jax.rmsprop(lr, momentum=0.9), (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    ),
    "rmsprop bias-corrected": Contender(
        lambda lr: rmsprop_jax.rmsprop(lr, bias_correction=True), _RMS_LRS
    ),
    "presets.pytorch": Contender(lambda lr: presets.pytorch(lr=lr), _RMS_LRS),
    "optax.sgd momentum 0.9": Contender(
        lambda lr: optax.sgd(lr, momentum=0.9), (3e-3, 1e-2, 3e-2, 1e-1, 3e-1), strict=False
    ),
    "optax.adam": Contender(lambda lr: optax.adam(lr), _RMS_LRS, strict=False),
    "optax.nadam": Contender(lambda lr: optax.nadam(lr), _RMS_LRS, strict=False),
    "optax.adagrad": Contender(
        lambda lr: optax.adagrad(lr), (1e-2, 3e-2, 1e-1, 3e-1, 1.0), strict=False
    ),
}


# ``--quick`` (CI) keeps one of each kind, since compiling dominates a short run.
QUICK_CONTENDERS = [
    "rmsprop",
    "rmsprop momentum 0.9",
    "presets.pytorch",
    "optax.sgd momentum 0.9",
    "optax.adam",
]


class Task(NamedTuple):
    """One model on one data set."""

    name: str
    data: demo_data.Dataset
    make_model: Callable[[Any], Any]  # nnx.Rngs -> nnx.Module
    epochs: int
    batch: int
    target_loss: float  # "steps to target" counts steps until the full training loss is below


def build_tasks(quick: bool, data_dir: pathlib.Path | None, limit: int) -> list[Task]:
    """The four tasks; ``quick`` shortens training, ``data_dir`` swaps digits for MNIST/CIFAR."""
    from rmsprop_jax.demo import models

    images = (
        demo_data.load_digits(0)
        if data_dir is None
        else _subsample(demo_data.find_image_dataset(data_dir), limit)
    )
    linear = demo_data.make_linear_regression(0)
    sequences = demo_data.make_sequence_count(0)
    shape = tuple(images.x_train.shape[1:])
    epochs, short = (3, 3) if quick else (20, 15)  # the CNN and GRU take longer per epoch
    return [
        Task(
            "linear regression",
            linear,
            lambda rngs: models.LinearRegression(linear.x_train.shape[1], rngs=rngs),
            epochs,
            32,
            0.05,
        ),
        Task(
            f"MLP on {images.name}",
            images,
            lambda rngs: models.MLP(shape, images.num_classes, rngs=rngs),
            epochs,
            64,
            0.1,
        ),
        Task(
            f"CNN on {images.name}",
            images,
            lambda rngs: models.CNN(shape, images.num_classes, rngs=rngs),
            short,
            64,
            0.1,
        ),
        Task(
            "GRU on sequence count",
            sequences,
            lambda rngs: models.GRUClassifier(2, sequences.num_classes, rngs=rngs),
            short,
            64,
            0.1,
        ),
    ]


def _subsample(data: demo_data.Dataset, limit: int) -> demo_data.Dataset:
    """Keeps the first ``limit`` training and ``limit // 4`` test examples (0: keep all)."""
    if limit <= 0:
        return data
    return data._replace(
        x_train=data.x_train[:limit],
        y_train=data.y_train[:limit],
        x_test=data.x_test[: max(1, limit // 4)],
        y_test=data.y_test[: max(1, limit // 4)],
    )


def _loss_and_accuracy(logits: jax.Array, y: jax.Array, classes: int) -> tuple[jax.Array, ...]:
    if classes == 0:
        return jnp.mean(jnp.square(logits - y)), jnp.asarray(jnp.nan, dtype=logits.dtype)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    correct = (jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)
    return loss, jnp.mean(correct)


def _promotion(contender: Contender) -> contextlib.AbstractContextManager[Any]:
    """Standard dtype promotion for optax's own optimizers; the ambient setting otherwise."""
    if contender.strict:
        return contextlib.nullcontext()
    return jax.numpy_dtype_promotion("standard")


_EVAL_CACHE: dict[tuple[Any, ...], Callable[..., Any]] = {}


def train_contender(
    task: Task, contender: Contender, seeds: Sequence[int], tick: Callable[[], None]
) -> dict[str, np.ndarray]:
    """Trains every (learning rate, seed) pair of one optimizer at once.

    Returns per-epoch curves of shape (learning rates, seeds, epochs + 1), epoch 0 being the
    initialisation: ``train_loss``, ``test_loss`` and ``test_accuracy`` (NaN for regression).
    """
    from flax import nnx

    data, classes = task.data, task.data.num_classes
    lrs = np.asarray(contender.learning_rates, dtype=np.float32)
    lane_lr = np.repeat(lrs, len(seeds))  # lanes run learning-rate major, seed minor
    lane_seed = np.tile(np.arange(len(seeds)), len(lrs))

    graphdef, *per_seed = zip(*(nnx.split(task.make_model(nnx.Rngs(s))) for s in seeds))
    params = jax.tree.map(lambda *xs: jnp.stack([xs[i] for i in lane_seed]), *per_seed[0])
    graphdef = graphdef[0]

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p)(x)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return _loss_and_accuracy(apply(p, x), y, classes)[0]

    def lane_epoch(
        p: Any, state: Any, lr: jax.Array, order: jax.Array, x: jax.Array, y: jax.Array
    ) -> tuple[Any, Any]:
        tx = contender.make(lr)

        def step(carry: tuple[Any, Any], idx: jax.Array) -> tuple[tuple[Any, Any], None]:
            p, state = carry
            grads = jax.grad(loss_fn)(p, x[idx], y[idx])
            with _promotion(contender):
                updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, state), _ = jax.lax.scan(step, (p, state), order)
        return p, state

    def lane_eval(p: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
        return _loss_and_accuracy(apply(p, x), y, classes)

    epoch_fn = jax.jit(jax.vmap(lane_epoch, in_axes=(0, 0, 0, 0, None, None)))
    # One evaluation function per task, shared by every optimizer, so it compiles only once.
    key = (task.name, data.x_train.shape[1:], classes, len(lane_lr))
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = jax.jit(jax.vmap(lane_eval, in_axes=(0, None, None)))
    eval_fn = _EVAL_CACHE[key]
    with _promotion(contender):
        state = jax.vmap(lambda p, lr: contender.make(lr).init(p))(params, jnp.asarray(lane_lr))

    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    steps = len(data.x_train) // task.batch
    rngs = [np.random.default_rng(1000 + s) for s in seeds]  # same batches for every optimizer

    curves: dict[str, list[np.ndarray]] = {"train_loss": [], "test_loss": [], "test_accuracy": []}

    def record() -> None:
        train_loss, _ = eval_fn(params, x_train, y_train)
        test_loss, test_acc = eval_fn(params, x_test, y_test)
        for key, value in (("train_loss", train_loss), ("test_loss", test_loss)):
            curves[key].append(np.asarray(value, dtype=np.float64))
        curves["test_accuracy"].append(np.asarray(test_acc, dtype=np.float64))

    record()
    for _ in range(task.epochs):
        orders = [r.permutation(len(data.x_train))[: steps * task.batch] for r in rngs]
        order = np.stack([orders[i].reshape(steps, task.batch) for i in lane_seed])
        params, state = epoch_fn(
            params, state, jnp.asarray(lane_lr), jnp.asarray(order), x_train, y_train
        )
        record()
        tick()
    shape = (len(lrs), len(seeds), task.epochs + 1)
    return {k: np.stack(v, axis=-1).reshape(shape) for k, v in curves.items()}


def summarise(task: Task, lrs: Sequence[float], curves: dict[str, np.ndarray]) -> dict[str, Any]:
    """Picks the learning rate by the mean final training loss over seeds; summarises its row.

    A rate at which any seed diverged (a non-finite loss) ranks last.
    """
    final = curves["train_loss"][:, :, -1]
    final_mean = final.mean(axis=1)
    ranked = np.where(np.isfinite(final).all(axis=1), final_mean, np.inf)
    best = int(np.argmin(ranked))
    chosen = {k: v[best] for k, v in curves.items()}  # (seeds, epochs + 1)
    steps_per_epoch = len(task.data.x_train) // task.batch
    reached = chosen["train_loss"] <= task.target_loss
    steps_to_target = [
        float(np.argmax(row) * steps_per_epoch) if row.any() else math.nan for row in reached
    ]
    summary: dict[str, Any] = {
        "sweep": [
            {"learning_rate": float(lr), "final_train_loss_mean": float(loss)}
            for lr, loss in zip(lrs, final_mean)
        ],
        "learning_rate": float(lrs[best]),
        # A pick at either end of the sweep may not be the optimizer's best rate.
        "learning_rate_at_edge": best in (0, len(lrs) - 1),
        "steps_to_target": steps_to_target,
        "curves": {k: v.tolist() for k, v in chosen.items()},
    }
    for key in ("train_loss", "test_loss", "test_accuracy"):
        summary[f"final_{key}"] = chosen[key][:, -1].tolist()
    return summary
