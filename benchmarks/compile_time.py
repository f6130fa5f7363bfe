"""How compile time and step time grow with the number of leaves, from the train-step rows.

:mod:`benchmarks.train_step` times every contender on trees of small leaves (100, 1,000 and
3,000 in the full run). This module turns those rows into one table per configuration (seconds
to lower and compile the donated step, with JAX's caches cleared, and the median step time,
each with its ratio to ``optax.rmsprop`` on the same tree) and a log-log plot of both against
the number of leaves, so a reader sees how each contender grows.
"""

from __future__ import annotations

import pathlib
from typing import Any

from benchmarks.train_step import compile_seconds

# The row each contender's ratio is taken against.
BASELINE = "optax"


def _leaf_rows(rows: list[dict[str, Any]], leaves: dict[str, int]) -> list[dict[str, Any]]:
    """The rows measured on the small-leaf trees, with their leaf count."""
    return [dict(row, leaves=leaves[row["tree"]]) for row in rows if row["tree"] in leaves]


def format_table(rows: list[dict[str, Any]], leaves: dict[str, int]) -> str:
    """Markdown: per configuration, compile and step time by leaf count, and ratios to optax."""
    picked = _leaf_rows(rows, leaves)
    baseline = {(r["leaves"], r["config"]): r for r in picked if r["contender"] == BASELINE}
    lines = [
        "#### Growth with the number of leaves (small leaves, six shapes)",
        "",
        "| config | leaves | contender | lower+compile s | × optax | HLO instructions per leaf "
        "| step ms | × optax |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for row in sorted(picked, key=lambda r: (r["config"], r["leaves"])):
        ref = baseline.get((row["leaves"], row["config"]))
        compile_s = compile_seconds(row)
        compile_ratio = step_ratio = "–"
        if ref is not None and compile_s is not None:
            compile_ratio = f"{compile_s / compile_seconds(ref):.2f}"
        if ref is not None:
            step_ratio = f"{row['median_s'] / ref['median_s']:.2f}"
        per_leaf = (
            "–" if row["instructions"] is None else f"{row['instructions'] / row['leaves']:.1f}"
        )
        lines.append(
            f"| {row['config']} | {row['leaves']} | {row['contender']} "
            f"| {'–' if compile_s is None else f'{compile_s:.2f}'} | {compile_ratio} "
            f"| {per_leaf} | {row['median_s'] * 1e3:.2f} | {step_ratio} |"
        )
    lines += [
        "",
        "One compilation per cell with JAX's caches cleared; step times are medians of the "
        "interleaved rounds of the main table. torch compiles nothing. HLO instructions: "
        "those of the optimized program (XLA's passes visit each; kernels with identical "
        "bodies are compiled once), divided by the number of leaves.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], leaves: dict[str, int], path: pathlib.Path) -> bool:
    """Writes the log-log plot to ``path``; False (and no file) without matplotlib or rows."""
    if not _leaf_rows(rows, leaves):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    picked = _leaf_rows(rows, leaves)
    configs = sorted({r["config"] for r in picked})
    fig, axes = plt.subplots(2, len(configs), figsize=(6 * len(configs), 8), squeeze=False)
    for column, config in enumerate(configs):
        mine = [r for r in picked if r["config"] == config]
        for contender in dict.fromkeys(r["contender"] for r in mine):
            series = sorted(
                (r for r in mine if r["contender"] == contender), key=lambda r: r["leaves"]
            )
            xs = [r["leaves"] for r in series]
            if series[0]["compile_s"] is not None:
                axes[0][column].loglog(
                    xs, [compile_seconds(r) for r in series], "o-", label=contender
                )
            axes[1][column].loglog(xs, [r["median_s"] * 1e3 for r in series], "o-", label=contender)
        axes[0][column].set_title(f"{config}: lower + compile")
        axes[0][column].set_ylabel("seconds")
        axes[1][column].set_title(f"{config}: step (median)")
        axes[1][column].set_ylabel("milliseconds")
        for ax in axes[:, column]:
            ax.set_xlabel("leaves")
            ax.grid(True, which="both", alpha=0.3)
        axes[1][column].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
