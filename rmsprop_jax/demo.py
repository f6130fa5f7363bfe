"""Train a small MLP on scikit-learn's bundled digits with several RMSProp variants.

Run ``python -m rmsprop_jax.demo`` (add ``--quick`` for a run of a few seconds).
The data set ships with scikit-learn (1,797 8x8 images, no download). Each
optimizer trains the same Flax NNX model from the same initialisation on the
same mini-batches; the table gives the final training loss and the test
accuracy, and a JSON file with the per-epoch numbers is written to ``--out``.
Needs the ``examples`` extra (flax, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import presets


def optimizers() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The contenders, each built fresh; learning rates are fixed by hand, not tuned."""
    return {
        "rmsprop": lambda: rmsprop_jax.rmsprop(1e-3),
        "rmsprop centered+momentum": lambda: rmsprop_jax.rmsprop(3e-4, centered=True, momentum=0.9),
        "rmsprop bias-corrected": lambda: rmsprop_jax.rmsprop(1e-3, bias_correction=True),
        "presets.pytorch": lambda: presets.pytorch(lr=1e-3),
        "optax.adam": lambda: optax.adam(1e-3),
    }


def load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split 75/25 with a fixed permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.75 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(
    name: str,
    make_tx: Callable[[], optax.GradientTransformation],
    data: tuple[np.ndarray, ...],
    *,
    epochs: int,
    batch: int,
    seed: int,
) -> dict[str, object]:
    """Trains one optimizer; returns per-epoch losses and the final test accuracy."""
    from flax import nnx

    x_train, y_train, x_test, y_test = data

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(64, 128, rngs=rngs)
            self.out = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.out(nnx.relu(self.hidden(x)))

    model = MLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)

    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            step(model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
        loss, _ = evaluate(model, jnp.asarray(x_train), jnp.asarray(y_train))
        losses.append(float(loss))
    test_loss, accuracy = evaluate(model, jnp.asarray(x_test), jnp.asarray(y_test))
    return {
        "optimizer": name,
        "train_loss_per_epoch": losses,
        "final_train_loss": losses[-1],
        "test_loss": float(test_loss),
        "test_accuracy": float(accuracy),
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs instead of 15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("rmsprop_demo_out"))
    args = parser.parse_args(argv)

    epochs = 2 if args.quick else 15
    data = load_digits(args.seed)
    results = []
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {epochs} epochs")
    for name, make_tx in optimizers().items():
        results.append(train(name, make_tx, data, epochs=epochs, batch=64, seed=args.seed))
        print(f"  trained {name} ({results[-1]['seconds']:.1f} s)")

    print()
    print("| optimizer | final train loss | test loss | test accuracy |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['optimizer']} | {r['final_train_loss']:.4f} | {r['test_loss']:.4f} "
            f"| {r['test_accuracy']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps({"epochs": epochs, "seed": args.seed, "results": results}, indent=2))
    print(f"\nwrote {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
