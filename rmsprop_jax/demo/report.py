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

__all__ = ["finite_or_none", "format_table", "plot_task", "progress"]


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
