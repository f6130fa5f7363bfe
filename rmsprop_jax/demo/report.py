"""The demo's output: the Markdown table, the figures, a progress bar and the JSON results."""

from __future__ import annotations

import math
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from rmsprop_jax.demo.training import Task

__all__ = [
    "finite_or_none",
    "format_sensitivity",
    "format_table",
    "plot_sensitivity",
    "plot_stability",
    "plot_task",
    "progress",
    "read_sensitivity",
]

# A grid cell counts as "good" when its mean final training loss is within this factor of the
# grid's best.
GOOD_FACTOR = 2.0


def _mean_std(values: Sequence[float], digits: int) -> str:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return "—"
    text = f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f}"
    return text if finite.size == arr.size else f"{text} ({finite.size}/{arr.size})"


def format_table(task: Task, rows: dict[str, dict[str, Any]]) -> str:
    """One Markdown table per task: the swept learning rates, finals and steps to target."""
    lines = [
        f"### {task.name} ({task.epochs} epochs, target train loss {task.target_loss})",
        "",
        "Learning rate picked by the mean final training loss over seeds (bold); † marks a pick "
        "at an end of the sweep.",
        "",
        "| optimizer | lr (sweep: mean final train loss) | train loss | test loss "
        "| test accuracy | steps to target |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        sweep = ", ".join(
            ("**" if s["learning_rate"] == row["learning_rate"] else "")
            + f"{s['learning_rate']:g}: {s['final_train_loss_mean']:.3g}"
            + ("**" if s["learning_rate"] == row["learning_rate"] else "")
            for s in row["sweep"]
        )
        edge = " †" if row["learning_rate_at_edge"] else ""
        lines.append(
            f"| {row.get('label', name)} | {sweep}{edge} | {_mean_std(row['final_train_loss'], 4)} "
            f"| {_mean_std(row['final_test_loss'], 4)} "
            f"| {_mean_std(row['final_test_accuracy'], 3)} "
            f"| {_mean_std(row['steps_to_target'], 0)} |"
        )
    return "\n".join(lines)


def plot_task(task: Task, rows: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    """Training loss (log scale) and test accuracy (or test loss) per epoch, min-max seed bands."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, right_ax = fig.subplots(1, 2)
    right_key = "test_accuracy" if task.data.num_classes else "test_loss"
    for name, row in rows.items():
        label = row.get("label", name)
        for ax, key in ((loss_ax, "train_loss"), (right_ax, right_key)):
            values = np.asarray(row["curves"][key], dtype=np.float64)
            epochs = np.arange(values.shape[1])
            with warnings.catch_warnings():  # a diverged run leaves all-NaN columns
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
                low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            style = "--" if label.startswith("optax.") else "-"  # baselines dashed
            (line,) = ax.plot(epochs, mean, style, label=label)
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    loss_ax.set_yscale("log")
    loss_ax.axhline(task.target_loss, color="grey", linestyle=":", linewidth=1)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title=f"{task.name}: training loss")
    right_ax.set(
        xlabel="epoch", ylabel=right_key.replace("_", " "), title=right_key.replace("_", " ")
    )
    if right_key == "test_loss":
        right_ax.set_yscale("log")
    right_ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _grid_mean(losses: np.ndarray) -> np.ndarray:
    """Mean over seeds (last axis); inf where any seed diverged."""
    losses = np.asarray(losses, dtype=np.float64)
    return np.where(np.isfinite(losses).all(axis=-1), losses.mean(axis=-1), np.inf)


def read_sensitivity(
    losses: np.ndarray, learning_rates: Sequence[float], decays: Sequence[float]
) -> dict[str, Any]:
    """The best cell of a (learning rates, decays, seeds) grid of final losses, and its margin.

    Returns the best learning rate and decay (by the mean over seeds), its loss, the cells
    within :data:`GOOD_FACTOR` of it, and for each decay the learning rates of those cells.
    """
    mean = _grid_mean(losses)
    i, j = (int(k) for k in np.unravel_index(int(np.argmin(mean)), mean.shape))
    good = mean <= GOOD_FACTOR * mean[i, j]
    return {
        "best_learning_rate": float(learning_rates[i]),
        "best_decay": float(decays[j]),
        "best_loss": float(mean[i, j]),
        "good_cells": int(good.sum()),
        "cells": int(good.size),
        "good_learning_rates": {
            f"{d:g}": [float(lr) for lr, ok in zip(learning_rates, good[:, k]) if ok]
            for k, d in enumerate(decays)
        },
    }


def format_sensitivity(
    task: Task,
    grids: dict[str, np.ndarray],
    learning_rates: Sequence[float],
    decays: Sequence[float],
) -> str:
    """Markdown: per variant, the mean final training loss over the learning rate x decay grid."""
    lines = [
        f"### Sensitivity: {task.name}, final training loss after {task.epochs} epochs",
        "",
        f"Mean over seeds; best cell in bold, cells within {GOOD_FACTOR:g}x of it marked *.",
    ]
    for variant, losses in grids.items():
        mean = _grid_mean(losses)
        best = mean.min()
        lines += ["", f"**{variant}**", ""]
        lines.append("| lr \\ decay | " + " | ".join(f"{d:g}" for d in decays) + " |")
        lines.append("|---|" + "---:|" * len(decays))
        for lr, row in zip(learning_rates, mean):
            cells = []
            for value in row:
                text = "diverged" if not np.isfinite(value) else f"{value:.3g}"
                if value == best:
                    text = f"**{text}**"
                elif value <= GOOD_FACTOR * best:
                    text += "*"
                cells.append(text)
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        reading = read_sensitivity(losses, learning_rates, decays)
        lines += [
            "",
            f"Best: lr {reading['best_learning_rate']:g}, decay {reading['best_decay']:g} "
            f"(loss {reading['best_loss']:.3g}); {reading['good_cells']} of {reading['cells']} "
            f"cells within {GOOD_FACTOR:g}x.",
        ]
    return "\n".join(lines)


def plot_sensitivity(
    task: Task,
    grids: dict[str, np.ndarray],
    learning_rates: Sequence[float],
    decays: Sequence[float],
    path: Any,
) -> None:
    """Heatmaps of log10 mean final training loss over learning rate x decay, one per variant."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    means = {k: _grid_mean(v) for k, v in grids.items()}
    finite = np.concatenate([m[np.isfinite(m)] for m in means.values()])
    low, high = (np.log10(finite.min()), np.log10(finite.max())) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(5.5 * len(grids) + 1, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    image = None
    for ax, (variant, mean) in zip(axes, means.items()):
        with np.errstate(divide="ignore"):
            shown = np.where(np.isfinite(mean), np.log10(mean), np.nan)
        image = ax.imshow(shown, cmap="viridis_r", vmin=low, vmax=high, aspect="auto")
        best = np.unravel_index(int(np.argmin(mean)), mean.shape)
        for (i, j), value in np.ndenumerate(mean):
            text = "div." if not np.isfinite(value) else f"{value:.2g}"
            weight = "bold" if (i, j) == best else "normal"
            good = np.isfinite(value) and value <= GOOD_FACTOR * mean[best]
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                weight=weight,
                color="white" if good else "black",
            )
        ax.add_patch(
            Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)
        )
        ax.set_xticks(range(len(decays)), [f"{d:g}" for d in decays])
        ax.set_yticks(range(len(learning_rates)), [f"{lr:g}" for lr in learning_rates])
        ax.set(xlabel="decay ρ", ylabel="learning rate", title=f"{variant}")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="log10 mean final training loss")
    fig.suptitle(f"{task.name}: final training loss after {task.epochs} epochs (red: best)")
    fig.savefig(path, dpi=100)


def plot_stability(results: dict[str, tuple[Task, dict[str, dict[str, Any]]]], path: Any) -> None:
    """Final test accuracy of every seed, per optimizer, one panel per classification task."""
    from matplotlib.figure import Figure

    tasks = [(t, rows) for t, rows in results.values() if t.data.num_classes]
    cols = min(max(len(tasks), 1), 3)
    rows_ = -(-max(len(tasks), 1) // cols)
    fig = Figure(figsize=(4.4 * cols, 4.6 * rows_), layout="constrained")
    axes = fig.subplots(rows_, cols, squeeze=False).ravel()
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    for ax, (task, rows) in zip(axes, tasks):
        labels = [row.get("label", name) for name, row in rows.items()]
        for x, row in enumerate(rows.values()):
            acc = np.asarray(row["final_test_accuracy"], dtype=np.float64)
            jitter = np.linspace(-0.15, 0.15, len(acc)) if len(acc) > 1 else np.zeros(1)
            ax.plot(x + jitter, acc, "o", color=f"C{x % 10}", alpha=0.8, markersize=5)
            if np.isfinite(acc).any():
                ax.hlines(np.nanmean(acc), x - 0.3, x + 0.3, color=f"C{x % 10}")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
        ax.set(title=task.name, ylabel="final test accuracy")
    fig.suptitle("Final test accuracy per seed at the picked learning rate (line: mean)")
    fig.savefig(path, dpi=100)


class _Bar:
    """A minimal stand-in for ``tqdm`` that redraws one line on ``stream``."""

    def __init__(self, total: int, stream: TextIO, desc: str = "") -> None:
        self.total, self.n, self.desc, self.start = total, 0, desc, time.perf_counter()
        self.stream = stream

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        filled = int(30 * self.n / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total} "
            f"{elapsed:5.0f}s {self.desc[:40]:<40}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _SilentBar:
    """The progress bar's interface, writing nothing."""

    def set_description(self, desc: str) -> None:
        del desc

    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no ``isatty``, or a closed stream
        return False


def progress(total: int, stream: TextIO | None = None) -> Any:
    """A bar counting epochs on ``stream`` (default ``sys.stderr``) if it is a terminal.

    A ``tqdm`` bar when tqdm is installed, else :class:`_Bar`. When ``stream`` is a file or
    a pipe (a CI log, ``2> log``) the bar would write a carriage-return update per epoch
    into it, so the bar is silent there.
    """
    stream = sys.stderr if stream is None else stream
    if not _is_terminal(stream):
        return _SilentBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Bar(total, stream)
    return tqdm(total=total, unit="epoch", dynamic_ncols=True, file=stream)


def finite_or_none(value: Any) -> Any:
    """Makes the results valid JSON: NaN and infinities become ``null``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value
