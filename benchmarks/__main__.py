"""Time one RMSProp train step: rmsprop_jax against optax.rmsprop and torch.optim.RMSprop.

Run ``python -m benchmarks`` from a clone of the repository (about half an hour on 2 CPU cores,
most of it compiling the 1,000- and 3,000-leaf trees; ``--quick`` scales every tree down and
takes about two minutes).
``--trees`` and ``--contenders`` narrow a run, e.g. to a two-way A/B on one tree. The
benchmark is not part of the installed package and not part of the test suite; CI only
smoke-runs it. It uses rmsprop_jax through its public API only.

The run has these parts:

* :mod:`benchmarks.train_step`: one jitted train step of ``rmsprop_jax.rmsprop``,
  ``rmsprop_jax.pack_small_leaves``, ``optax.rmsprop``, ``optax.flatten`` and
  ``torch.optim.RMSprop`` on five trees and two configurations, timed in interleaved rounds,
  with the roofline from the streaming bandwidth of this machine and each step's compile time;
* :mod:`benchmarks.compile_time`: those rows on the small-leaf trees, as the growth of
  compile and step time with the number of leaves (a table and ``leaf_count.png``);
* :mod:`benchmarks.packing`: ways to pack small leaves into one buffer and back;
* :mod:`benchmarks.state_precision`: the reduced-precision state studies (loss curves of
  float32, bfloat16 and 8-bit state, stochastically rounded and rounded to nearest);
* :mod:`benchmarks.formulations`: hand-written formulations of one step next to the
  library's own steps, and the 8-bit maps' accuracy;
* :mod:`benchmarks.runtime_checks`: the step with traced hyperparameters, with the run-time
  range checks on and off.

Output: Markdown tables on stdout (also ``table.md``), every raw timing in ``benchmark.json``
and the plot ``leaf_count.png``, in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import compile_time, formulations, packing, runtime_checks, state_precision
from benchmarks.train_step import (
    CONFIGS,
    CONTENDER_IDS,
    FULL,
    QUICK,
    TREE_IDS,
    format_table,
    machine_info,
    measure_bandwidth,
    time_group,
    trees,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller trees, fewer rounds (CI)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_results"))
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds (15; quick 3)"
    )
    parser.add_argument("--trees", nargs="+", choices=list(TREE_IDS), default=None)
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDER_IDS), default=None)
    args = parser.parse_args(argv)
    only = None if args.contenders is None else [CONTENDER_IDS[c] for c in args.contenders]
    prefixes = None if args.trees is None else tuple(TREE_IDS[t] for t in args.trees)
    scale = QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else scale.repeats
    if repeats < 1:
        parser.error(f"`--repeats` must be at least 1, got {repeats}")
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        torch = None
    previous_threads = None if torch is None else torch.get_num_threads()
    start = time.perf_counter()
    try:
        info = machine_info(torch)
        if torch is not None:
            torch.set_num_threads(info["cpu_count"])
            info["torch_threads"] = torch.get_num_threads()
        bandwidth = measure_bandwidth(scale.bandwidth_mb)
        gbps = bandwidth["gb_per_s"]
        print(f"streaming bandwidth: {gbps:.1f} GB/s", file=sys.stderr)
        rows: list[dict[str, Any]] = []
        tree_info = {}
        rng = np.random.default_rng(0)
        for tree_name, shapes in trees(scale).items():
            if prefixes is not None and not tree_name.endswith(prefixes):
                continue
            params = {
                k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
                for k, s in shapes.items()
            }
            size = sum(v.size for v in params.values())
            tree_info[tree_name] = {"parameters": size, "leaves": len(params)}
            for config in CONFIGS:
                tick = time.perf_counter()
                group = time_group(config, params, torch, scale, repeats, gbps, only)
                rows.extend({"tree": tree_name, **row} for row in group)
                print(
                    f"{tree_name} / {config.name}: {time.perf_counter() - tick:.1f} s",
                    file=sys.stderr,
                )
                del group
                gc.collect()  # free this group's parameters and states before the next
            del params
            gc.collect()
    finally:
        if torch is not None:
            torch.set_num_threads(previous_threads)
    study = state_precision.compare(steps=300 if args.quick else 2000)
    quantized_study = state_precision.compare_quantized(
        steps=300 if args.quick else 2000, seeds=(0,) if args.quick else (0, 1)
    )
    maps = formulations.map_accuracy(size=2**16 if args.quick else 2**20)
    quantized_costs = formulations.quantized_costs(
        leaves=10 if args.quick else 100, repeats=2 if args.quick else 5
    )
    packings = packing.compare(leaves=100 if args.quick else 1000, repeats=3 if args.quick else 9)
    sizes = packing.compare_sizes(
        (256, 4096) if args.quick else (64, 256, 1024, 2048, 4096, 16384, 65536),
        repeats=3 if args.quick else 15,
        elements=2**16 if args.quick else 2**22,
    )
    step_formulations = formulations.compare(
        size=2**20 if args.quick else 16 * 2**20, repeats=3 if args.quick else 9
    )
    checks = runtime_checks.compare(quick=args.quick)
    leaf_counts = {t: i["leaves"] for t, i in tree_info.items() if t.endswith("small leaves")}
    plotted = compile_time.plot(rows, leaf_counts, args.out / "leaf_count.png")
    wall_s = time.perf_counter() - start

    table = format_table(rows)
    described = "; ".join(
        f"{name}: {t['parameters'] / 1e6:.2f}M parameters in {t['leaves']} leaves"
        for name, t in tree_info.items()
    )
    notes = [
        f"Trees: {described}.",
        f"Streaming bandwidth (jitted in-place x*a+b on {scale.bandwidth_mb} MB, median of "
        f"{len(bandwidth['seconds'])}): {gbps:.1f} GB/s. Roofline: 20 bytes per parameter "
        "(plain), 36 (centered+momentum), 16 and 24 with bfloat16 state, 14 and 18 with 8-bit "
        "state.",
        f"Ratios: medians of {repeats} interleaved rounds. {info['cpu_count']} CPUs, "
        f"jax {info['jax']}, optax {info['optax']}, torch {info['torch']}; {wall_s:.0f} s.",
        f"¹ {CONFIGS[1].note}.",
    ]
    report = (
        table
        + "\n\n"
        + "\n".join(f"* {note}" for note in notes)
        + "\n\n"
        + compile_time.format_table(rows, leaf_counts)
        + ("\n\n(plot: leaf_count.png)" if plotted else "")
        + "\n\n"
        + packing.format_table(packings)
        + "\n\n"
        + packing.format_sizes_table(sizes)
        + "\n\n"
        + state_precision.format_table(study)
        + "\n\n"
        + state_precision.format_quantized_table(quantized_study)
        + "\n\n"
        + formulations.format_table(step_formulations)
        + "\n\n"
        + formulations.format_map_table(maps)
        + "\n\n"
        + formulations.format_costs_table(quantized_costs)
        + "\n\n"
        + runtime_checks.format_table(checks)
    )
    print(report)
    (args.out / "table.md").write_text(report + "\n")
    payload = {
        "quick": args.quick,
        "repeats": repeats,
        "scale": scale._asdict(),
        "wall_s": wall_s,
        "machine": info,
        "bandwidth": bandwidth,
        "trees": tree_info,
        "rows": rows,
        "state_precision": study,
        "formulations": step_formulations,
        "runtime_checks": checks,
        "packing": packings,
        "packing_sizes": sizes,
        "quantized_state_precision": quantized_study,
        "map_accuracy": maps,
        "quantized_costs": quantized_costs,
    }
    (args.out / "benchmark.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out.resolve()} (table.md, benchmark.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
