"""Compare RMSProp variants with SGD, Adam, NAdam and Adagrad on six small Flax NNX models.

Run ``python -m rmsprop_jax.demo`` (a few minutes on 2 CPU cores; ``--quick`` takes well under a
minute). Needs the ``examples`` extra (flax, scikit-learn, matplotlib; tqdm optional).

The tasks: linear regression on synthetic data, an MLP, a small CNN and a deep, narrow tanh MLP
on scikit-learn's bundled 8x8 digits (no download; ``--data-dir`` switches them to MNIST or
CIFAR-10 files you already have), and a GRU and an LSTM that count the ones in a generated
binary sequence. Every optimizer trains the
same initialisation on the same mini-batches. Its learning rate is picked fairly from five
values, half a decade apart, by the final training loss averaged over seeds; the table gives
the mean ± std over seeds at that learning rate. All learning rates and seeds of one optimizer
train together in a single ``vmap``-ed, ``jit``-compiled loop. Output: a table on stdout (also
``table.md``), PNG loss and accuracy curves with min-max seed bands, a stability figure (final
test accuracy of every seed), and ``results.json`` in ``--out``. On the MLP task it also trains
RMSProp (plain and centered) over a grid of learning rates x decays, all cells in one
``vmap``-ed compile per variant, and draws the final training loss as a heatmap. A progress
bar counts epochs on stderr when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax

from rmsprop_jax.demo import report
from rmsprop_jax.demo.training import (
    CONTENDERS,
    QUICK_CONTENDERS,
    SENSITIVITY_DECAYS,
    SENSITIVITY_LEARNING_RATES,
    TASK_KEYS,
    build_tasks,
    summarise,
    train_contender,
    train_sensitivity,
)

_SENSITIVITY_VARIANTS = {"rmsprop": False, "rmsprop centered": True}  # name: centered

__all__ = ["main"]

_TASK_HELP = {
    "linear": "linear regression on synthetic data",
    "mlp": "an MLP (one ReLU layer) on digits",
    "cnn": "a small CNN on digits",
    "gru": "a GRU counting the ones in bit sequences",
    "lstm": "an LSTM on the same sequences",
    "deep": "a 12-layer, 16-wide tanh MLP on digits (fading gradients)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax.demo",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks (--tasks):\n"
        + "".join(f"  {k:<24}{_TASK_HELP[k]}\n" for k in TASK_KEYS)
        + "optimizers (--optimizers):\n"
        + "".join(f"  {k:<24}{c.label}\n" for k, c in CONTENDERS.items()),
    )
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 seed, 4 optimizers (CI)")
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
        "--optimizers",
        nargs="+",
        choices=list(CONTENDERS),
        default=None,
        metavar="NAME",
        help="optimizers to compare, by name (listed below; default: all, quick: "
        + " ".join(QUICK_CONTENDERS)
        + ")",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(TASK_KEYS),
        default=None,
        metavar="TASK",
        help="tasks to run, by name (listed below; default: all)",
    )
    parser.add_argument(
        "--no-sensitivity",
        action="store_true",
        help="skip the learning rate x decay grid of RMSProp on the MLP task",
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"`--seeds` must be at least 1, got {args.seeds}")
    if args.limit < 0:
        parser.error(f"`--limit` must be 0 (keep all) or positive, got {args.limit}")

    num_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.seed, args.seed + num_seeds))
    tasks = build_tasks(args.quick, args.data_dir, args.limit, args.tasks or TASK_KEYS)
    names = args.optimizers or (QUICK_CONTENDERS if args.quick else list(CONTENDERS))
    contenders = {k: CONTENDERS[k] for k in names}
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    # The learning rate x decay grid runs on the MLP task, if it is among the tasks.
    sensitivity_task = next((t for t in tasks if t.key == "mlp"), None)
    if args.no_sensitivity:
        sensitivity_task = None
    epochs = sum(t.epochs for t in tasks) * len(contenders)
    if sensitivity_task is not None:
        epochs += sensitivity_task.epochs * len(_SENSITIVITY_VARIANTS)
    bar = report.progress(epochs)
    results: dict[str, Any] = {}
    grids: dict[str, Any] = {}
    task_seconds: dict[str, float] = {}
    try:
        for task in tasks:
            task_start = time.perf_counter()
            rows = {}
            for name, contender in contenders.items():
                bar.set_description(f"{task.name}: {name}")
                curves = train_contender(task, contender, seeds, lambda: bar.update(1))
                rows[name] = {
                    "label": contender.label,
                    **summarise(task, contender.learning_rates, curves),
                }
            results[task.name] = (task, rows)
            task_seconds[task.name] = time.perf_counter() - task_start
        if sensitivity_task is not None:
            task_start = time.perf_counter()
            for variant, centered in _SENSITIVITY_VARIANTS.items():
                bar.set_description(f"sensitivity: {variant}")
                grids[variant] = train_sensitivity(
                    sensitivity_task,
                    centered,
                    SENSITIVITY_LEARNING_RATES,
                    SENSITIVITY_DECAYS,
                    seeds,
                    lambda: bar.update(1),
                )
            task_seconds["sensitivity"] = time.perf_counter() - task_start
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    tables = "\n\n".join(report.format_table(task, rows) for task, rows in results.values())
    if sensitivity_task is not None:
        tables += "\n\n" + report.format_sensitivity(
            sensitivity_task, grids, SENSITIVITY_LEARNING_RATES, SENSITIVITY_DECAYS
        )
    print(
        f"\nseeds {seeds}; learning rate of each optimizer picked by the mean final training "
        f"loss over seeds (bold); mean ± std over seeds; {seconds:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in task_seconds.items())
        + ")\n"
    )
    print(tables)
    (args.out / "table.md").write_text(tables + "\n")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\nmatplotlib is not installed: no figures (pip install matplotlib)")
    else:
        for task, rows in results.values():
            report.plot_task(task, rows, args.out / f"task_{task.key}.png")
        if any(task.data.num_classes for task, _ in results.values()):
            report.plot_stability(results, args.out / "stability.png")
        if sensitivity_task is not None:
            report.plot_sensitivity(
                sensitivity_task,
                grids,
                SENSITIVITY_LEARNING_RATES,
                SENSITIVITY_DECAYS,
                args.out / "sensitivity.png",
            )

    payload = {
        "seeds": seeds,
        "quick": args.quick,
        "seconds": seconds,
        "seconds_per_task": task_seconds,
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
    if sensitivity_task is not None:
        payload["sensitivity"] = {
            "task": sensitivity_task.name,
            "epochs": sensitivity_task.epochs,
            "learning_rates": list(SENSITIVITY_LEARNING_RATES),
            "decays": list(SENSITIVITY_DECAYS),
            "variants": {
                variant: {
                    "final_train_loss": losses.tolist(),  # (learning rates, decays, seeds)
                    **report.read_sensitivity(
                        losses, SENSITIVITY_LEARNING_RATES, SENSITIVITY_DECAYS
                    ),
                }
                for variant, losses in grids.items()
            },
        }
    path = args.out / "results.json"
    path.write_text(json.dumps(report.finite_or_none(payload), indent=1))
    print(f"\nwrote {args.out.resolve()} (results.json, table.md, figures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
