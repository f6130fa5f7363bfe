"""Timing of one RMSProp train step: rmsprop_jax against optax.rmsprop and torch.optim.RMSprop.

Part of ``python -m benchmarks``. A step is ``update`` then ``optax.apply_updates``, in one
``jax.jit`` that donates the parameters and the optimizer state; the gradients are fixed arrays
passed in each step. PyTorch runs ``optimizer.step()`` with the same gradients assigned once to
``.grad``, with ``foreach=True`` and ``foreach=False`` (when torch is importable).
``pack_small_leaves`` is ``rmsprop_jax.pack_small_leaves(rmsprop_jax.rmsprop(...))`` (leaves of
at most 1,024 elements packed into one buffer per dtype); ``optax.flatten(optax)`` is
``optax.flatten(optax.rmsprop(...))`` (every leaf packed into one vector).

The trees (:func:`trees`): a transformer-shaped tree (~40M parameters in ~150 leaves), trees of
100, 1,000 and 3,000 small leaves (384 elements on average) and one large vector (32M
float32). Two
configurations (:data:`CONFIGS`): ``plain`` (``rmsprop(lr)``) and ``centered+momentum+bias``
(torch has no bias correction, so it runs centered with momentum only). ``rmsprop_jax bf16
state`` keeps its statistics in bfloat16 (``nu_dtype`` and friends of
:func:`rmsprop_jax.rmsprop`, stochastically rounded); ``rmsprop_jax 8-bit state`` in
``rmsprop_jax.quantized()`` (8-bit codes in blocks of 256 with a float32 scale each, leaves of
fewer than 4,096 elements kept in float32).

:func:`time_group` times all contenders of one tree and configuration in interleaved rounds
(A, B, C, A, B, C, ... with the starting contender rotated each round) so that machine noise
hits all alike; the ratios compare medians measured side by side in one run. The roofline is
the ideal number of bytes a step must move (reading the gradient, parameter and state, writing
the parameter and state) divided by the streaming bandwidth (:func:`measure_bandwidth`)
measured in the same run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

__all__ = [
    "CONFIGS",
    "CONTENDER_IDS",
    "FULL",
    "QUICK",
    "TREE_IDS",
    "Config",
    "Scale",
    "compile_seconds",
    "format_table",
    "machine_info",
    "measure_bandwidth",
    "small_leaves_tree",
    "time_group",
    "trees",
]

LEARNING_RATE = 1e-3
DECAY = 0.9
EPS = 1e-8
_MB = 1e6


class Scale(NamedTuple):
    """The sizes of one run."""

    width: int  # transformer model width d
    layers: int  # transformer blocks
    vocab: int  # rows of the embedding
    leaf_counts: tuple[int, ...]  # leaves of the small-leaf trees
    vector: int  # elements of the large vector
    repeats: int  # interleaved rounds
    sample_s: float  # a timing sample runs at least this long (several steps if need be)
    bandwidth_mb: int  # size of the array the bandwidth is measured on


FULL = Scale(
    512, 12, 4096, (100, 1000, 3000), 32 * 2**20, repeats=15, sample_s=0.05, bandwidth_mb=512
)
QUICK = Scale(128, 2, 512, (30, 120), 2**21, repeats=3, sample_s=0.01, bandwidth_mb=128)


class Config(NamedTuple):
    """One optimizer configuration, spelled for each framework."""

    name: str
    kwargs: dict[str, Any]  # for rmsprop_jax.rmsprop and optax.rmsprop
    bf16_kwargs: dict[str, Any]  # added for the bfloat16-state row
    q8_kwargs: dict[str, Any]  # added for the 8-bit-state row
    torch_kwargs: dict[str, Any]
    bytes_f32: int  # ideal bytes per float32 parameter and step
    bytes_bf16: int  # the same with bfloat16 state
    bytes_q8: int  # the same with 8-bit state (a code and 1/64 of a float32 scale per element)
    note: str


_BF16 = jnp.bfloat16
_Q8 = rmsprop_jax.quantized()  # 8 bits, blocks of 256; leaves under 4,096 elements in float32
CONFIGS = (
    # Reads g, p, nu and writes p, nu.
    Config("plain", {}, {"nu_dtype": _BF16}, {"nu_dtype": _Q8}, {}, 20, 16, 14, ""),
    # Reads g, p, nu, mu, m and writes p, nu, mu, m.
    Config(
        "centered+momentum+bias",
        {"centered": True, "momentum": 0.9, "bias_correction": True},
        {"nu_dtype": _BF16, "mu_dtype": _BF16, "momentum_dtype": _BF16},
        {"nu_dtype": _Q8, "mu_dtype": _Q8, "momentum_dtype": _Q8},
        {"centered": True, "momentum": 0.9},
        36,
        24,
        18,
        "torch has no bias correction: its rows run centered with momentum only",
    ),
)


def transformer_shapes(width: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """A decoder's parameter shapes: fused QKV, output, MLP, two layer norms per block."""
    d = width
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (vocab, d),
        "final_ln_scale": (d,),
        "final_ln_bias": (d,),
    }
    for i in range(layers):
        block = {
            "qkv": (d, 3 * d),
            "qkv_bias": (3 * d,),
            "attn_out": (d, d),
            "attn_out_bias": (d,),
            "mlp_in": (d, 4 * d),
            "mlp_in_bias": (4 * d,),
            "mlp_out": (4 * d, d),
            "mlp_out_bias": (d,),
            "ln1_scale": (d,),
            "ln1_bias": (d,),
            "ln2_scale": (d,),
            "ln2_bias": (d,),
        }
        shapes.update({f"block{i:02d}_{name}": shape for name, shape in block.items()})
    return shapes


def small_leaf_shapes(count: int) -> dict[str, tuple[int, ...]]:
    """``count`` leaves of mixed small shapes, 384 elements on average."""
    cycle = [(384,), (24, 16), (128,), (640,), (8, 80), (4, 32)]
    return {f"leaf{i:05d}": cycle[i % len(cycle)] for i in range(count)}


def small_leaves_tree(count: int) -> str:
    """The name of the tree of ``count`` small leaves."""
    return f"{count} small leaves"


def trees(scale: Scale) -> dict[str, dict[str, tuple[int, ...]]]:
    """The trees of a run, by name."""
    return {
        "transformer": transformer_shapes(scale.width, scale.layers, scale.vocab),
        **{small_leaves_tree(n): small_leaf_shapes(n) for n in scale.leaf_counts},
        "vector": {"w": (scale.vector,)},
    }


def measure_bandwidth(megabytes: int, repeats: int = 8) -> dict[str, Any]:
    """Streaming bandwidth of a jitted, in-place ``x * a + b`` (one read, one write per element)."""
    x = jnp.ones(megabytes * 2**20 // 4, jnp.float32)
    axpb = jax.jit(lambda x: x * 0.999 + 1e-3, donate_argnums=0)
    x = axpb(x).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = axpb(x).block_until_ready()
        seconds.append(time.perf_counter() - start)
    moved = 2 * x.nbytes
    del x
    # The median, not the best: on a shared machine the best of a few calls of a streaming
    # kernel varied from 22 to 52 GB/s here, and the roofline should not rest on an outlier.
    return {
        "bytes_per_call": moved,
        "seconds": seconds,
        "gb_per_s": moved / statistics.median(seconds) / 1e9,
    }


class _JaxRunner:
    """A jitted train step with donated parameters and state.

    ``lower_s`` and ``compile_s`` are the seconds to trace and lower the step and to compile
    it, with JAX's caches cleared first (so no contender reuses another's traces).
    """

    def __init__(
        self, tx: optax.GradientTransformation, params: dict[str, np.ndarray], grads: Any
    ) -> None:
        def train_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self._params = {k: jnp.array(v) for k, v in params.items()}
        self._state = tx.init(self._params)
        self._grads = grads
        jax.clear_caches()
        start = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(self._params, self._state, grads)
        self.lower_s: float | None = time.perf_counter() - start
        start = time.perf_counter()
        self._step = lowered.compile()
        self.compile_s: float | None = time.perf_counter() - start
        # XLA's passes run over every instruction of the optimized program (kernels of
        # identical bodies are compiled once), so this count follows the compile time.
        text = self._step.as_text() or ""
        self.instructions: int | None = sum(" = " in line for line in text.splitlines())
        self.state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(self._state))

    def run(self, steps: int) -> None:
        params, state = self._params, self._state
        for _ in range(steps):
            params, state = self._step(params, state, self._grads)
        self._params, self._state = jax.block_until_ready((params, state))


class _TorchRunner:
    """``torch.optim.RMSprop.step`` on gradients assigned once to ``.grad``."""

    def __init__(
        self, torch: Any, params: dict[str, np.ndarray], grads: list[Any], **kwargs: Any
    ) -> None:
        self._torch = torch
        self._params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
        for param, grad in zip(self._params, grads, strict=True):
            param.grad = grad
        self._opt = torch.optim.RMSprop(self._params, **kwargs)
        self.lower_s: float | None = None
        self.compile_s: float | None = None
        self.instructions: int | None = None
        self.run(1)  # torch allocates its state at the first step

    @property
    def state_bytes(self) -> int:
        return sum(
            value.nbytes
            for state in self._opt.state.values()
            for value in state.values()
            if isinstance(value, self._torch.Tensor)
        )

    def run(self, steps: int) -> None:
        with self._torch.no_grad():
            for _ in range(steps):
                self._opt.step()


def _contenders(
    config: Config, params: dict[str, np.ndarray], torch: Any
) -> dict[str, tuple[Callable[[], Any], int]]:
    """Each contender's constructor and ideal bytes per parameter, by name."""
    grads_np = {k: (v * 0.05).astype(np.float32) for k, v in params.items()}
    grads = {k: jnp.array(v) for k, v in grads_np.items()}

    def ours(**bf16: Any) -> optax.GradientTransformation:
        return rmsprop_jax.rmsprop(LEARNING_RATE, DECAY, EPS, **config.kwargs, **bf16)

    def theirs() -> optax.GradientTransformation:
        return optax.rmsprop(LEARNING_RATE, DECAY, EPS, **config.kwargs)

    pack = rmsprop_jax.pack_small_leaves
    bf16 = config.bf16_kwargs
    out: dict[str, tuple[Callable[[], Any], int]] = {
        "rmsprop_jax": (lambda: _JaxRunner(ours(), params, grads), config.bytes_f32),
        "rmsprop_jax bf16 state": (
            lambda: _JaxRunner(ours(**bf16), params, grads),
            config.bytes_bf16,
        ),
        "rmsprop_jax 8-bit state": (
            lambda: _JaxRunner(ours(**config.q8_kwargs), params, grads),
            config.bytes_q8,
        ),
        "pack_small_leaves": (lambda: _JaxRunner(pack(ours()), params, grads), config.bytes_f32),
        "pack_small_leaves bf16 state": (
            lambda: _JaxRunner(pack(ours(**bf16)), params, grads),
            config.bytes_bf16,
        ),
        "optax": (lambda: _JaxRunner(theirs(), params, grads), config.bytes_f32),
        "optax.flatten(optax)": (
            lambda: _JaxRunner(optax.flatten(theirs()), params, grads),
            config.bytes_f32,
        ),
    }
    if torch is not None:
        torch_grads = [torch.from_numpy(v) for v in grads_np.values()]
        kwargs = {"lr": LEARNING_RATE, "alpha": DECAY, "eps": EPS, **config.torch_kwargs}
        for name, foreach in (("torch foreach", True), ("torch for-loop", False)):
            out[name] = (
                lambda foreach=foreach: _TorchRunner(
                    torch, params, torch_grads, foreach=foreach, **kwargs
                ),
                config.bytes_f32,
            )
    return out


# Command-line names of the contenders.
CONTENDER_IDS = {
    "ours": "rmsprop_jax",
    "bf16": "rmsprop_jax bf16 state",
    "q8": "rmsprop_jax 8-bit state",
    "pack": "pack_small_leaves",
    "pack-bf16": "pack_small_leaves bf16 state",
    "optax": "optax",
    "optax-flatten": "optax.flatten(optax)",
    "torch-foreach": "torch foreach",
    "torch-loop": "torch for-loop",
}
TREE_IDS = {"transformer": "transformer", "small-leaves": "small leaves", "vector": "vector"}


def time_group(
    config: Config,
    params: dict[str, np.ndarray],
    torch: Any,
    scale: Scale,
    repeats: int,
    bandwidth: float,
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Times every contender (or those named in ``only``) in interleaved rounds."""
    n_params = sum(v.size for v in params.values())
    runners, ideal = {}, {}
    for name, (make, bytes_per_param) in _contenders(config, params, torch).items():
        if only is not None and name not in only:
            continue
        runners[name] = make()
        ideal[name] = bytes_per_param * n_params
    inner = {}
    for name, runner in runners.items():
        runner.run(2)  # warm up
        start = time.perf_counter()
        runner.run(1)
        one = time.perf_counter() - start
        inner[name] = max(1, min(200, math.ceil(scale.sample_s / max(one, 1e-6))))
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for offset in range(len(names)):
            name = names[(round_ + offset) % len(names)]
            start = time.perf_counter()
            runners[name].run(inner[name])
            samples[name].append((time.perf_counter() - start) / inner[name])
    rows = []
    for name in names:
        rows.append(
            {
                "config": config.name,
                "contender": name,
                "steps_per_sample": inner[name],
                "seconds": samples[name],
                "median_s": statistics.median(samples[name]),
                "min_s": min(samples[name]),
                "lower_s": runners[name].lower_s,
                "compile_s": runners[name].compile_s,
                "instructions": runners[name].instructions,
                "state_bytes": runners[name].state_bytes,
                "ideal_bytes": ideal[name],
                "roofline_s": ideal[name] / (bandwidth * 1e9),
            }
        )
    by_name = {row["contender"]: row for row in rows}
    for row in rows:
        for ref in ("optax", "torch foreach"):
            key = ref.replace(" ", "_")
            if ref in by_name:
                row[f"vs_{key}_median"] = row["median_s"] / by_name[ref]["median_s"]
                row[f"vs_{key}_min"] = row["min_s"] / by_name[ref]["min_s"]
        row["roofline_fraction"] = row["roofline_s"] / row["median_s"]
    return rows


def machine_info(torch: Any) -> dict[str, Any]:
    """What the timings were taken on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    device = jax.devices()[0]
    return {
        "cpu_count": cpus,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
        "device_kind": device.device_kind,
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def compile_seconds(row: dict[str, Any]) -> float | None:
    """Seconds to lower and compile a row's step (None for torch)."""
    if row["compile_s"] is None:
        return None
    return row["lower_s"] + row["compile_s"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of every row."""
    lines = [
        "| tree | config | contender | median ms | min ms | × optax | × torch foreach "
        "| % roofline | lower+compile s | state MB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        torch_row = row["contender"].startswith("torch")
        config = row["config"] + (" ¹" if torch_row and row["config"] != "plain" else "")
        lines.append(
            f"| {row['tree']} | {config} | {row['contender']} "
            f"| {row['median_s'] * 1e3:.2f} | {row['min_s'] * 1e3:.2f} "
            f"| {_cell(row.get('vs_optax_median'), '.2f')} "
            f"| {_cell(row.get('vs_torch_foreach_median'), '.2f')} "
            f"| {row['roofline_fraction'] * 100:.0f} | {_cell(compile_seconds(row), '.2f')} "
            f"| {row['state_bytes'] / _MB:.1f} |"
        )
    return "\n".join(lines)
