"""Compare RMSProp variants with SGD, Adam, NAdam and Adagrad on four small Flax NNX models.

Run ``python -m rmsprop_jax.demo`` (a few minutes on 2 CPU cores; ``--quick`` takes well under a
minute). Needs the ``examples`` extra (flax, scikit-learn, matplotlib; tqdm optional).

The tasks: linear regression on synthetic data, an MLP and a small CNN on scikit-learn's bundled
8x8 digits (no download; ``--data-dir`` switches them to MNIST or CIFAR-10 files you already
have), and a GRU that counts the ones in a generated binary sequence. Every optimizer trains the
same initialisation on the same mini-batches. Its learning rate is picked fairly from five
values, half a decade apart, by the final training loss averaged over seeds; the table gives
the mean ± std over seeds at that learning rate. All learning rates and seeds of one optimizer
train together in a single ``vmap``-ed, ``jit``-compiled loop. Output: a table on stdout (also
``table.md``), PNG loss and accuracy curves with min-max seed bands, and ``results.json`` in
``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _demo_data, _demo_report, presets

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
    data: _demo_data.Dataset
    make_model: Callable[[Any], Any]  # nnx.Rngs -> nnx.Module
    epochs: int
    batch: int
    target_loss: float  # "steps to target" counts steps until the full training loss is below


def build_tasks(quick: bool, data_dir: pathlib.Path | None, limit: int) -> list[Task]:
    """The four tasks; ``quick`` shortens training, ``data_dir`` swaps digits for MNIST/CIFAR."""
    from rmsprop_jax import _demo_models as models

    images = (
        _demo_data.load_digits(0)
        if data_dir is None
        else _subsample(_demo_data.find_image_dataset(data_dir), limit)
    )
    linear = _demo_data.make_linear_regression(0)
    sequences = _demo_data.make_sequence_count(0)
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


def _subsample(data: _demo_data.Dataset, limit: int) -> _demo_data.Dataset:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 seed, 5 optimizers (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per optimizer (3; quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("rmsprop_demo_out"))
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=None,
        help="folder with MNIST IDX files or CIFAR-10 python batches, used instead of digits",
    )
    parser.add_argument(
        "--limit", type=int, default=10000, help="with --data-dir: training examples kept (0: all)"
    )
    parser.add_argument(
        "--optimizers", nargs="+", choices=sorted(CONTENDERS), default=None, help="a subset"
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="task indices (0-3)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"`--seeds` must be at least 1, got {args.seeds}")
    if args.limit < 0:
        parser.error(f"`--limit` must be 0 (keep all) or positive, got {args.limit}")
    bad_tasks = [i for i in args.tasks or [] if not 0 <= i <= 3]
    if bad_tasks:
        parser.error(f"`--tasks` takes indices 0-3, got {bad_tasks}")

    num_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.seed, args.seed + num_seeds))
    tasks = build_tasks(args.quick, args.data_dir, args.limit)
    if args.tasks is not None:
        tasks = [tasks[i] for i in args.tasks]
    names = args.optimizers or (QUICK_CONTENDERS if args.quick else list(CONTENDERS))
    contenders = {k: CONTENDERS[k] for k in names}
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    bar = _demo_report.progress(sum(t.epochs for t in tasks) * len(contenders))
    results: dict[str, Any] = {}
    try:
        for task in tasks:
            rows = {}
            for name, contender in contenders.items():
                bar.set_description(f"{task.name}: {name}")
                curves = train_contender(task, contender, seeds, lambda: bar.update(1))
                rows[name] = summarise(task, contender.learning_rates, curves)
            results[task.name] = (task, rows)
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    tables = "\n\n".join(_demo_report.format_table(task, rows) for task, rows in results.values())
    print(
        f"\nseeds {seeds}; learning rate of each optimizer picked by the mean final training "
        f"loss over seeds (bold); mean ± std over seeds; {seconds:.0f} s\n"
    )
    print(tables)
    (args.out / "table.md").write_text(tables + "\n")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\nmatplotlib is not installed: no figures (pip install matplotlib)")
    else:
        for i, (task, rows) in enumerate(results.values()):
            _demo_report.plot_task(
                task, rows, args.out / f"task{i}_{task.name.replace(' ', '_')}.png"
            )

    payload = {
        "seeds": seeds,
        "quick": args.quick,
        "seconds": seconds,
        "jax_backend": jax.default_backend(),
        "tasks": {
            name: {
                "data": task.data.name,
                "epochs": task.epochs,
                "batch": task.batch,
                "steps_per_epoch": len(task.data.x_train) // task.batch,
                "target_loss": task.target_loss,
                "optimizers": rows,
            }
            for name, (task, rows) in results.items()
        },
    }
    path = args.out / "results.json"
    path.write_text(json.dumps(_demo_report.finite_or_none(payload), indent=1))
    print(f"\nwrote {args.out.resolve()} (results.json, table.md, figures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
