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
    "SENSITIVITY_DECAYS",
    "SENSITIVITY_LEARNING_RATES",
    "TASK_KEYS",
    "Contender",
    "Task",
    "build_tasks",
    "summarise",
    "train_contender",
    "train_sensitivity",
]

MakeTx = Callable[[jax.Array], optax.GradientTransformation]


class Contender(NamedTuple):
    """An optimizer built from a (possibly traced) learning rate, and the rates to sweep."""

    label: str  # the name in tables and figures; the key in CONTENDERS is the CLI name
    make: MakeTx
    learning_rates: tuple[float, ...]  # half-decade steps; the table flags a pick at an end
    # optax's own optimizers rely on standard dtype promotion (e.g. adam's bias correction takes
    # a Python float to an int32 power), so they are traced under it even in strict test runs.
    strict: bool = True


_RMS_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

# Keys are the names ``--optimizers`` takes: lower case, no spaces.
CONTENDERS: dict[str, Contender] = {
    "rmsprop": Contender("rmsprop", lambda lr: rmsprop_jax.rmsprop(lr), _RMS_LRS),
    "rmsprop-centered": Contender(
        "rmsprop centered", lambda lr: rmsprop_jax.rmsprop(lr, centered=True), _RMS_LRS
    ),
    "rmsprop-momentum": Contender(
        "rmsprop momentum 0.9",
        lambda lr: rmsprop_jax.rmsprop(lr, momentum=0.9),
        (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    ),
    "rmsprop-bias-corrected": Contender(
        "rmsprop bias-corrected", lambda lr: rmsprop_jax.rmsprop(lr, bias_correction=True), _RMS_LRS
    ),
    "pytorch-preset": Contender("presets.pytorch", lambda lr: presets.pytorch(lr=lr), _RMS_LRS),
    "sgd": Contender("optax.sgd", lambda lr: optax.sgd(lr), (1e-2, 3e-2, 1e-1, 3e-1, 1.0), False),
    "sgd-momentum": Contender(
        "optax.sgd momentum 0.9",
        lambda lr: optax.sgd(lr, momentum=0.9),
        (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        strict=False,
    ),
    "adam": Contender("optax.adam", lambda lr: optax.adam(lr), _RMS_LRS, strict=False),
    "nadam": Contender("optax.nadam", lambda lr: optax.nadam(lr), _RMS_LRS, strict=False),
    "adagrad": Contender(
        "optax.adagrad", lambda lr: optax.adagrad(lr), (1e-2, 3e-2, 1e-1, 3e-1, 1.0), strict=False
    ),
}


# ``--quick`` (CI) keeps four kinds (RMSProp with and without momentum, SGD with momentum,
# Adam), since compiling dominates a short run; it stays under a minute on two CPU cores.
QUICK_CONTENDERS = ["rmsprop", "rmsprop-momentum", "sgd-momentum", "adam"]


class Task(NamedTuple):
    """One model on one data set."""

    key: str  # the name ``--tasks`` takes: lower case, no spaces
    name: str
    data: demo_data.Dataset
    make_model: Callable[[Any], Any]  # nnx.Rngs -> nnx.Module
    epochs: int
    batch: int
    target_loss: float  # "steps to target" counts steps until the full training loss is below


# The sensitivity grid (train_sensitivity): learning rates half a decade apart, decays from a
# memory of 2 steps (0.5) to 1000 steps (0.999).
SENSITIVITY_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SENSITIVITY_DECAYS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)

TASK_KEYS = ("linear", "mlp", "cnn", "gru", "lstm", "deep")


def build_tasks(
    quick: bool, data_dir: pathlib.Path | None, limit: int, keys: Sequence[str] = TASK_KEYS
) -> list[Task]:
    """The tasks named by ``keys`` (of :data:`TASK_KEYS`), in that order.

    ``quick`` shortens training; ``data_dir`` swaps digits for MNIST or CIFAR-10 files in the
    MLP, CNN and deep-MLP tasks.

    Raises:
        ValueError: if a key is not one of :data:`TASK_KEYS`.
    """
    from rmsprop_jax.demo import models

    unknown = [k for k in keys if k not in TASK_KEYS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the tasks are {', '.join(TASK_KEYS)}")
    images = (
        demo_data.load_digits(0)
        if data_dir is None
        else _subsample(demo_data.find_image_dataset(data_dir), limit)
    )
    linear = demo_data.make_linear_regression(0)
    sequences = demo_data.make_sequence_count(0)
    shape = tuple(images.x_train.shape[1:])
    # The CNN and the recurrent networks take longer per epoch; fewer epochs keep the full run
    # within a few minutes on two CPU cores.
    epochs, cnn_epochs, rnn_epochs = (3, 3, 3) if quick else (20, 8, 10)
    builders: dict[str, Callable[[], Task]] = {
        "linear": lambda: Task(
            "linear",
            "linear regression",
            linear,
            lambda rngs: models.LinearRegression(linear.x_train.shape[1], rngs=rngs),
            epochs,
            32,
            0.05,
        ),
        "mlp": lambda: Task(
            "mlp",
            f"MLP on {images.name}",
            images,
            lambda rngs: models.MLP(shape, images.num_classes, rngs=rngs),
            epochs,
            64,
            0.1,
        ),
        "cnn": lambda: Task(
            "cnn",
            f"CNN on {images.name}",
            images,
            lambda rngs: models.CNN(shape, images.num_classes, rngs=rngs),
            cnn_epochs,
            64,
            0.1,
        ),
        "gru": lambda: Task(
            "gru",
            "GRU on sequence count",
            sequences,
            lambda rngs: models.GRUClassifier(2, sequences.num_classes, rngs=rngs),
            rnn_epochs,
            64,
            0.1,
        ),
        "lstm": lambda: Task(
            "lstm",
            "LSTM on sequence count",
            sequences,
            lambda rngs: models.LSTMClassifier(2, sequences.num_classes, rngs=rngs),
            rnn_epochs,
            64,
            0.1,
        ),
        "deep": lambda: Task(
            "deep",
            f"deep tanh MLP on {images.name}",
            images,
            lambda rngs: models.DeepTanhMLP(shape, images.num_classes, rngs=rngs),
            epochs,
            64,
            0.1,
        ),
    }
    return [builders[k]() for k in keys]


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


_EVAL_CACHE: dict[tuple[Any, ...], Callable[..., Any]] = {}


def train_contender(
    task: Task, contender: Contender, seeds: Sequence[int], tick: Callable[[], None]
) -> dict[str, np.ndarray]:
    """Trains every (learning rate, seed) pair of one optimizer at once.

    Returns per-epoch curves of shape (learning rates, seeds, epochs + 1), epoch 0 being the
    initialisation: ``train_loss``, ``test_loss`` and ``test_accuracy`` (NaN for regression).
    """
    lrs = np.asarray(contender.learning_rates, dtype=np.float32)
    hyper = np.repeat(lrs, len(seeds))[:, None]  # lanes run learning-rate major, seed minor
    curves = _train_lanes(
        task, lambda h: contender.make(h[0]), contender.strict, hyper, seeds, tick
    )
    shape = (len(lrs), len(seeds), task.epochs + 1)
    return {k: v.reshape(shape) for k, v in curves.items()}


def train_sensitivity(
    task: Task,
    centered: bool,
    learning_rates: Sequence[float],
    decays: Sequence[float],
    seeds: Sequence[int],
    tick: Callable[[], None],
) -> np.ndarray:
    """Final training loss of ``rmsprop_jax.rmsprop`` over a learning rate x decay grid.

    ``optax.inject_hyperparams`` makes both the learning rate and the decay traced inputs, so
    the whole grid (times the seeds) trains in one ``vmap``-ed loop: one compilation per
    variant. Returns an array of shape (learning rates, decays, seeds); NaN or inf where a run
    diverged.
    """
    grid = np.array([(lr, d) for lr in learning_rates for d in decays], dtype=np.float32)
    hyper = np.repeat(grid, len(seeds), axis=0)  # lanes: lr major, then decay, then seed

    def make(h: jax.Array) -> optax.GradientTransformation:
        factory = optax.inject_hyperparams(
            lambda learning_rate, decay: rmsprop_jax.rmsprop(
                learning_rate, decay=decay, centered=centered
            )
        )
        return factory(learning_rate=h[0], decay=h[1])

    curves = _train_lanes(task, make, True, hyper, seeds, tick, record_every_epoch=False)
    final = curves["train_loss"][:, -1]
    return final.reshape(len(learning_rates), len(decays), len(seeds))


def _train_lanes(
    task: Task,
    make: Callable[[jax.Array], optax.GradientTransformation],
    strict: bool,
    hyper: np.ndarray,
    seeds: Sequence[int],
    tick: Callable[[], None],
    record_every_epoch: bool = True,
) -> dict[str, np.ndarray]:
    """Trains one lane per row of ``hyper`` (seed-minor: row i uses ``seeds[i % len(seeds)]``).

    ``make`` builds the optimizer from a lane's (traced) row of hyperparameters. Returns
    curves of shape (lanes, recorded epochs): every epoch and the initialisation, or the
    initialisation and the last epoch only when ``record_every_epoch`` is false.
    """
    from flax import nnx

    data, classes = task.data, task.data.num_classes
    lane_seed = np.tile(np.arange(len(seeds)), len(hyper) // len(seeds))
    promotion = contextlib.nullcontext if strict else lambda: jax.numpy_dtype_promotion("standard")

    graphdef, *per_seed = zip(*(nnx.split(task.make_model(nnx.Rngs(s))) for s in seeds))
    params = jax.tree.map(lambda *xs: jnp.stack([xs[i] for i in lane_seed]), *per_seed[0])
    graphdef = graphdef[0]

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p)(x)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return _loss_and_accuracy(apply(p, x), y, classes)[0]

    def lane_epoch(
        p: Any, state: Any, h: jax.Array, order: jax.Array, x: jax.Array, y: jax.Array
    ) -> tuple[Any, Any]:
        tx = make(h)

        def step(carry: tuple[Any, Any], idx: jax.Array) -> tuple[tuple[Any, Any], None]:
            p, state = carry
            grads = jax.grad(loss_fn)(p, x[idx], y[idx])
            with promotion():
                updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, state), _ = jax.lax.scan(step, (p, state), order)
        return p, state

    def lane_eval(p: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
        return _loss_and_accuracy(apply(p, x), y, classes)

    epoch_fn = jax.jit(jax.vmap(lane_epoch, in_axes=(0, 0, 0, 0, None, None)))
    # One evaluation function per task and lane count, shared by every optimizer, so it
    # compiles only once.
    key = (task.name, data.x_train.shape[1:], classes, len(hyper))
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = jax.jit(jax.vmap(lane_eval, in_axes=(0, None, None)))
    eval_fn = _EVAL_CACHE[key]
    lane_hyper = jnp.asarray(hyper)
    with promotion():
        state = jax.vmap(lambda p, h: make(h).init(p))(params, lane_hyper)

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
    for epoch in range(task.epochs):
        orders = [r.permutation(len(data.x_train))[: steps * task.batch] for r in rngs]
        order = np.stack([orders[i].reshape(steps, task.batch) for i in lane_seed])
        params, state = epoch_fn(params, state, lane_hyper, jnp.asarray(order), x_train, y_train)
        if record_every_epoch or epoch == task.epochs - 1:
            record()
        tick()
    return {k: np.stack(v, axis=-1) for k, v in curves.items()}


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
