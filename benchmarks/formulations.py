"""Formulations of one RMSProp step on one vector: how the way a step is written changes its speed.

Part of ``python -m benchmarks``. Each row is a jitted, donated step on the same float32
vector, timed in interleaved rounds and given as a multiple of the plain float32 step. Rows
whose step is "hand-written" are experiments written out in this module; rows whose step is
``rmsprop_jax.rmsprop`` time the library itself (``update`` and ``optax.apply_updates``), so
each experiment sits next to what the library does. The experiments record what was tried for
bfloat16 state on XLA:CPU and for two choices inside the library:

* bfloat16 ``nu`` computed in float32 and stored with ``astype``, with ``uint16`` bit shifts,
  or as two bfloat16 values packed into one ``uint32``, each with the update taken from the
  unrounded ``nu`` (XLA then keeps the old state alive for a second pass), and with the update
  taken from ``nu`` as stored (what the library does);
* stochastic rounding with a full MurmurHash3 finaliser per element and with one multiply and
  one xor-shift per element (the cost of the hash that draws the random bits);
* a momentum step whose overflow guard is ``jnp.clip`` against one that replaces infinities
  with a select;
* ``rsqrt`` in place of a square root and a division;
* 8-bit block-wise quantized ``nu`` (``rmsprop_jax.quantized``): the ``"float"`` map (codes
  are 8-bit floats, a bit shift of the float32 pattern) against the ``"linear"`` map (a
  multiply and a floor), each stochastically rounded and rounded to nearest, and all three
  statistics quantized with centered RMSProp and momentum. :func:`map_accuracy` measures
  the maps' round-trip error on the same vector, and :func:`quantized_costs` the state
  bytes and compile time of quantized state on a tree of 100 leaves.

Recorded on XLA:CPU (2 shared cores, 2026-11-30), ``compare(size=2**22, repeats=15)``,
as multiples of the hand-written float32 step (median; minimum):

=====================================================  ============  ============
formulation                                            × float32     × float32
                                                       (median)      (min)
=====================================================  ============  ============
rmsprop_jax float32 nu                                 1.03          0.96
rmsprop_jax bf16 nu, stochastic                        1.06          1.04
rmsprop_jax float32 momentum 0.9                       1.34          1.47
rmsprop_jax 8-bit nu, float map, stochastic            1.61          1.81
rmsprop_jax 8-bit nu, float map, to nearest            1.45          1.59
rmsprop_jax 8-bit nu, linear map, stochastic           1.77          2.01
rmsprop_jax float32 centered, momentum 0.9             2.06          2.20
rmsprop_jax 8-bit centered, momentum 0.9 (all three)   8.17          7.16
=====================================================  ============  ============

The first quantized implementation, timed beside the current one (21 interleaved rounds,
medians): 8-bit nu 2.81x -> 1.65x, to nearest 2.54x -> 1.46x, linear 2.79x -> 1.79x,
centered with momentum and all three statistics 8-bit 20.4x -> 6.8x (float32 2.06x); CPU
time per step 3.59x -> 1.95x and 24.3x -> 8.3x. A ragged 4096 x 1000 leaf (a shorter last block),
8-bit nu: 3.35x -> 1.66x (11 rounds). ``quantized_costs()`` (100 leaves of
8,192, 5 compilations): state bytes 0.254x float32 (plain and centered+momentum); compile
2.06 s against 0.23 s (plain, 9.0x) and 8.68 s against 0.55 s (centered+momentum, 15.9x).
On this CPU the quantized step is bound by arithmetic (about four times a float32 step's
per element), not by the bytes it saves; see the dtype-policy page.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

__all__ = [
    "compare",
    "format_costs_table",
    "format_map_table",
    "format_table",
    "map_accuracy",
    "quantized_costs",
]

LR, RHO, EPS, BETA = 1e-3, 0.9, 1e-8, 0.9
_F32, _BF16, _U16, _U32 = jnp.float32, jnp.bfloat16, jnp.uint16, jnp.uint32
_BIG = float(jnp.finfo(jnp.float32).max)


def _ema(nu: jax.Array, g: jax.Array) -> jax.Array:
    return RHO * nu + (1 - RHO) * g * g


def _plain(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    nu = _ema(nu, g)
    return p - LR * g / jnp.sqrt(nu + EPS), nu


def _rsqrt(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    nu = _ema(nu, g)
    return p - LR * g * jax.lax.rsqrt(nu + EPS), nu


def _bf16_unrounded(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    wide = _ema(nu.astype(_F32), g)
    return p - LR * g / jnp.sqrt(wide + EPS), wide.astype(_BF16)


def _bf16_stored(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    stored = _ema(nu.astype(_F32), g).astype(_BF16)
    return p - LR * g / jnp.sqrt(stored.astype(_F32) + EPS), stored


def _round_to_bf16_bits(x: jax.Array) -> jax.Array:
    """Round-to-nearest-even of float32 ``x`` to the top 16 bits, as uint32."""
    bits = jax.lax.bitcast_convert_type(x, _U32)
    return (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16


def _uint16_unrounded(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    wide = _ema(jax.lax.bitcast_convert_type(nu.astype(_U32) << 16, _F32), g)
    return p - LR * g / jnp.sqrt(wide + EPS), _round_to_bf16_bits(wide).astype(_U16)


def _packed_pairs(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # nu: uint32 of half the length; the low half-word holds the state of p[:n/2], the high
    # half-word that of p[n/2:], so every access stays contiguous.
    half = p.shape[0] // 2
    lo = jax.lax.bitcast_convert_type(nu << 16, _F32)
    hi = jax.lax.bitcast_convert_type(nu & np.uint32(0xFFFF0000), _F32)
    p_lo, lo = _plain(p[:half], lo, g[:half])
    p_hi, hi = _plain(p[half:], hi, g[half:])
    packed = _round_to_bf16_bits(lo) | (_round_to_bf16_bits(hi) << 16)
    return jnp.concatenate([p_lo, p_hi]), packed


def _float8_codes(nu: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``nu`` (blocks of 256 on the last axis) as a native float8 ``dtype`` times a block scale.

    The block's largest element maps to the format's largest finite value, and XLA's
    convert rounds to nearest; the sign bit is never used (nu >= 0).
    """
    blocks = nu.reshape(-1, 256)
    scale = jnp.max(blocks, axis=1, keepdims=True)
    top = np.float32(jnp.finfo(dtype).max)
    safe = jnp.where(scale > 0, scale, 1.0)
    return (blocks * (top / safe)).astype(dtype).reshape(nu.shape), scale[:, 0]


def _float8_values(codes: jax.Array, scale: jax.Array) -> jax.Array:
    top = np.float32(jnp.finfo(codes.dtype).max)
    blocks = codes.astype(_F32).reshape(-1, 256) * (scale[:, None] / top)
    return blocks.reshape(codes.shape)


def _float8_e4m3(p: jax.Array, state: Any, g: jax.Array) -> tuple[jax.Array, Any]:
    codes, scale = state
    stored = _float8_codes(_ema(_float8_values(codes, scale), g), jnp.float8_e4m3fn)
    return p - LR * g / jnp.sqrt(_float8_values(*stored) + EPS), stored


_SEED = np.uint32(12345)  # a fixed seed: the hashes below vary only with the index


def _murmur_finaliser(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: three xor-shifts and two multiplies per element."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits_full_mix(n: int) -> jax.Array:
    """Random bits per element from the full finaliser of (index * golden ratio + seed)."""
    index = jax.lax.iota(_U32, n)
    return _murmur_finaliser(index * np.uint32(0x9E3779B9) + _SEED)


def _bits_multiply_xorshift(n: int) -> jax.Array:
    """Random bits per element from one multiply and one xor-shift of (index ^ seed)."""
    h = (jax.lax.iota(_U32, n) ^ _SEED) * np.uint32(0x85EBCA6B)
    return h ^ (h >> 16)


def _stochastic_to_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """float32 to bfloat16, rounded up with probability equal to the discarded fraction.

    Clipped to bfloat16's finite range first; then 16 random bits are added below
    bfloat16's last place and the low half-word is dropped.
    """
    big = float(jnp.finfo(_BF16).max)
    raw = jax.lax.bitcast_convert_type(jnp.clip(x, -big, big), _U32)
    raw = (raw + (bits & np.uint32(0xFFFF))) & np.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(raw, _F32).astype(_BF16)


def _stochastic(bits: Callable[[int], jax.Array]) -> Callable[..., Any]:
    def step(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        stored = _stochastic_to_bf16(_ema(nu.astype(_F32), g), bits(p.shape[0]))
        return p - LR * g / jnp.sqrt(stored.astype(_F32) + EPS), stored

    return step


def _momentum(guard: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
    def step(p: jax.Array, state: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[Any, Any]:
        nu, m = state
        nu = _ema(nu, g)
        m = guard(LR * g / jnp.sqrt(nu + EPS) + BETA * m)
        return p - m, (nu, m)

    return step


def _clip_guard(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -_BIG, _BIG)


def _select_guard(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isinf(x), jnp.copysign(jnp.asarray(_BIG, x.dtype), x), x)


def _library(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """The library's step: ``tx.update``, then ``optax.apply_updates``."""

    def step(p: jax.Array, state: Any, g: jax.Array) -> tuple[Any, Any]:
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    return step


class _Row(NamedTuple):
    step_from: str  # "hand-written" (this module) or "rmsprop_jax.rmsprop" (the library)
    formulation: str
    fn: Callable[..., Any]  # (p, state, g) -> (p, state)
    state: Any


_HAND = "hand-written"
_LIB = "rmsprop_jax.rmsprop"


def _rows(p: jax.Array) -> list[_Row]:
    n = p.shape[0]

    def library(formulation: str, **kwargs: Any) -> _Row:
        kwargs.setdefault("eps", EPS)
        tx = rmsprop_jax.rmsprop(LR, decay=RHO, **kwargs)
        return _Row(_LIB, formulation, _library(tx), tx.init(p))

    # Fresh zeros for every row: the steps donate their state.
    def f32() -> jax.Array:
        return jnp.zeros(n, _F32)

    def bf16() -> jax.Array:
        return jnp.zeros(n, _BF16)

    return [
        _Row(_HAND, "float32 nu (reference)", _plain, f32()),
        _Row(_HAND, "float32 nu, rsqrt instead of sqrt and divide", _rsqrt, f32()),
        library("float32 nu"),
        _Row(_HAND, "bf16 nu, astype, update from unrounded nu", _bf16_unrounded, bf16()),
        _Row(
            _HAND,
            "bf16 nu, uint16 bit shifts, update from unrounded",
            _uint16_unrounded,
            jnp.zeros(n, _U16),
        ),
        _Row(
            _HAND,
            "bf16 nu, two per uint32, update from unrounded",
            _packed_pairs,
            jnp.zeros(n // 2, _U32),
        ),
        _Row(_HAND, "bf16 nu, astype, update from stored nu", _bf16_stored, bf16()),
        _Row(
            _HAND,
            "bf16 nu, stochastic, full MurmurHash3 finaliser per element",
            _stochastic(_bits_full_mix),
            bf16(),
        ),
        _Row(
            _HAND,
            "bf16 nu, stochastic, one multiply and xor-shift per element",
            _stochastic(_bits_multiply_xorshift),
            bf16(),
        ),
        library("bf16 nu (nu_dtype=bfloat16), stochastic", nu_dtype=_BF16),
        _Row(_HAND, "float32 momentum, jnp.clip guard", _momentum(_clip_guard), (f32(), f32())),
        _Row(_HAND, "float32 momentum, select guard", _momentum(_select_guard), (f32(), f32())),
        library(f"float32 momentum {BETA}", momentum=BETA),
        library("8-bit nu, float map, stochastic", nu_dtype=_Q8),
        library("8-bit nu, float map, to nearest", nu_dtype=_Q8_NEAREST),
        library("8-bit nu, linear map, stochastic", nu_dtype=_Q8_LINEAR),
        _Row(
            _HAND,
            "8-bit nu, float8_e4m3fn x block scale, astype to nearest",
            _float8_e4m3,
            (jnp.zeros(n, jnp.float8_e4m3fn), jnp.zeros(n // 256, _F32)),
        ),
        library(f"float32 centered, momentum {BETA}", centered=True, momentum=BETA, eps=1e-6),
        library(
            f"8-bit centered, momentum {BETA} (all three statistics)",
            centered=True,
            momentum=BETA,
            eps=1e-6,
            nu_dtype=_Q8,
            mu_dtype=_Q8,
            momentum_dtype=_Q8,
        ),
    ]


_Q8 = rmsprop_jax.quantized()
_Q8_NEAREST = rmsprop_jax.quantized(stochastic_rounding=False)
_Q8_LINEAR = rmsprop_jax.quantized(code_map="linear")


def map_accuracy(size: int = 1 << 20, seed: int = 0) -> dict[str, Any]:
    """The maps' round-trip error on ``nu`` of gradients with realistic spread.

    ``nu`` is the square of Gaussian gradients whose scale per row of 256 varies over two
    decades and per element over one; the error is that of ``1 / sqrt(nu)`` (what the
    update uses): median and 99th percentile of the relative error, and the fraction of
    elements whose stored ``nu`` is below half the true one (update more than 1.41x).
    """
    rng = np.random.default_rng(seed)
    rows = size // 256
    scale = 10.0 ** rng.uniform(-1, 1, (rows, 1)) * 10.0 ** rng.uniform(-0.5, 0.5, (rows, 256))
    nu = jnp.asarray((scale * rng.standard_normal((rows, 256))) ** 2, jnp.float32)
    out: dict[str, Any] = {"size": size}
    for name, fmt in (
        ("float map, stochastic", _Q8),
        ("float map, to nearest", _Q8_NEAREST),
        ("linear map, stochastic", _Q8_LINEAR),
        (
            "linear map, to nearest",
            rmsprop_jax.quantized(code_map="linear", stochastic_rounding=False),
        ),
    ):
        tx = rmsprop_jax.scale_by_rms(0.0, 0.0, nu_dtype=fmt)
        state = tx.init(nu)
        # decay 0: nu is the square of the gradient, stored once.
        _, state = jax.jit(tx.update)(jnp.sqrt(nu), state)
        stored = np.asarray(rmsprop_jax.dequantize(state.nu, fmt.code_map), np.float64)
        out[name] = _update_errors(nu, stored)
    # Native float8 formats times the same block scale (a hand-written coding, rounded to
    # nearest by XLA's convert): the sign bit is wasted on nu.
    for name, dtype in (
        ("float8_e4m3fn x block scale, to nearest", jnp.float8_e4m3fn),
        ("float8_e5m2 x block scale, to nearest", jnp.float8_e5m2),
    ):
        stored = jax.jit(lambda x, dtype=dtype: _float8_values(*_float8_codes(x, dtype)))(nu)
        out[name] = _update_errors(nu, np.asarray(stored, np.float64))
    return out


def _update_errors(nu: jax.Array, stored: np.ndarray) -> dict[str, float]:
    """The relative errors of 1 / sqrt(nu) that storing ``nu`` as ``stored`` gives."""
    exact = np.asarray(nu, np.float64)
    positive = exact > 0
    ratio = np.sqrt(exact[positive] / np.maximum(stored[positive], 1e-300))
    return {
        "median_update_error": float(np.median(np.abs(ratio - 1))),
        "p99_update_error": float(np.quantile(np.abs(ratio - 1), 0.99)),
        "update_over_1.41x": float(np.mean(ratio > math.sqrt(2))),
        "stored_as_zero": float(np.mean(stored[positive] == 0)),
    }


def compare(size: int, repeats: int, steps_per_sample: int = 3) -> dict[str, Any]:
    """Times every formulation on a ``size``-element vector; medians and minimums in seconds."""
    rng = np.random.default_rng(0)
    p0 = jnp.asarray(rng.standard_normal(size, dtype=np.float32))
    g = p0 * np.float32(0.05)
    rows = _rows(p0)
    runners = []
    for row in rows:
        step = jax.jit(row.fn, donate_argnums=(0, 1))
        carry = list(jax.block_until_ready(step(jnp.array(p0), row.state, g)))
        runners.append((step, carry))
    samples: list[list[float]] = [[] for _ in rows]
    for round_ in range(repeats):
        for offset in range(len(rows)):
            i = (round_ + offset) % len(rows)
            step, carry = runners[i]
            start = time.perf_counter()
            for _ in range(steps_per_sample):
                carry[:] = step(carry[0], carry[1], g)
            jax.block_until_ready(carry)
            samples[i].append((time.perf_counter() - start) / steps_per_sample)
    ref_median = statistics.median(samples[0])  # the hand-written float32 step
    ref_min = min(samples[0])
    return {
        "size": size,
        "repeats": repeats,
        "rows": [
            {
                "step_from": row.step_from,
                "formulation": row.formulation,
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "vs_float32_median": statistics.median(seconds) / ref_median,
                "vs_float32_min": min(seconds) / ref_min,
                "seconds": seconds,
            }
            for row, seconds in zip(rows, samples)
        ],
    }


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = [
        f"Formulations of one step on a {results['size'] / 1e6:.1f}M float32 vector "
        f"({results['repeats']} interleaved rounds); hand-written steps are in "
        "benchmarks/formulations.py, the others are the library's",
        "",
        "| step | formulation | median ms | min ms | × float32 step (median) "
        "| × float32 step (min) |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['step_from']} | {row['formulation']} | {row['median_s'] * 1e3:.2f} "
            f"| {row['min_s'] * 1e3:.2f} | {row['vs_float32_median']:.2f} "
            f"| {row['vs_float32_min']:.2f} |"
        )
    return "\n".join(lines)


def format_map_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`map_accuracy`."""
    lines = [
        f"8-bit maps on nu of {results['size'] / 1e6:.1f}M elements (blocks of 256): relative "
        "error of the update factor 1 / sqrt(nu) after one round trip",
        "",
        "| map | median error | 99th percentile | updates over 1.41x | positive nu stored as 0 |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, row in results.items():
        if isinstance(row, dict):
            lines.append(
                f"| {name} | {row['median_update_error']:.2%} | {row['p99_update_error']:.2%} "
                f"| {row['update_over_1.41x']:.3%} | {row['stored_as_zero']:.3%} |"
            )
    return "\n".join(lines)


def _tree(leaves: int, size: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(1)
    return {
        f"w{i:03d}": jnp.asarray(rng.standard_normal(size, dtype=np.float32)) for i in range(leaves)
    }


def _state_bytes(state: Any) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(state))


_COST_CONFIGS: dict[str, dict[str, Any]] = {
    "plain, float32": {},
    "plain, 8-bit nu": {"nu_dtype": _Q8},
    f"centered, momentum {BETA}, float32": {"centered": True, "momentum": BETA},
    f"centered, momentum {BETA}, all 8-bit": {
        "centered": True,
        "momentum": BETA,
        "nu_dtype": _Q8,
        "mu_dtype": _Q8,
        "momentum_dtype": _Q8,
    },
}


def quantized_costs(leaves: int = 100, size: int = 8192, repeats: int = 5) -> dict[str, Any]:
    """Compile time and state bytes of quantized state on a tree of ``leaves`` leaves.

    Each leaf has ``size`` elements (at least ``min_size``, so all are quantized). The
    step (``update`` and ``optax.apply_updates``) is traced, lowered and compiled afresh
    ``repeats`` times per configuration, interleaved; medians and minimums in seconds.
    State bytes count every array of the state (codes, scales and counters).
    """
    params = _tree(leaves, size)
    rows: dict[str, dict[str, Any]] = {}
    for name, kwargs in _COST_CONFIGS.items():
        tx = rmsprop_jax.rmsprop(LR, decay=RHO, eps=EPS, **kwargs)
        rows[name] = {"state_bytes": _state_bytes(tx.init(params)), "lower_s": [], "compile_s": []}
    for _ in range(repeats):
        for name, kwargs in _COST_CONFIGS.items():
            # A fresh transformation and function: nothing comes from JAX's caches.
            tx = rmsprop_jax.rmsprop(LR, decay=RHO, eps=EPS, **kwargs)
            state = tx.init(params)
            step = jax.jit(_library(tx), donate_argnums=(0, 1))
            start = time.perf_counter()
            lowered = step.lower(params, state, params)
            lowered_at = time.perf_counter()
            lowered.compile()
            rows[name]["lower_s"].append(lowered_at - start)
            rows[name]["compile_s"].append(time.perf_counter() - lowered_at)
    return {"leaves": leaves, "size": size, "repeats": repeats, "rows": rows}


def format_costs_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`quantized_costs`: each 8-bit row against its float32 row."""
    rows = results["rows"]
    lines = [
        f"Quantized state on {results['leaves']} leaves of {results['size']} elements: state "
        f"bytes and the time to trace+lower and to compile a step (median of "
        f"{results['repeats']} interleaved fresh compilations)",
        "",
        "| configuration | state bytes | × float32 | lower s | compile s | × float32 compile |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    names = list(rows)
    for name in names:
        row = rows[name]
        base = rows[names[0] if name.startswith("plain") else names[2]]
        compile_s = statistics.median(row["compile_s"])
        lines.append(
            f"| {name} | {row['state_bytes']:,} | {row['state_bytes'] / base['state_bytes']:.3f} "
            f"| {statistics.median(row['lower_s']):.2f} | {compile_s:.2f} "
            f"| {compile_s / statistics.median(base['compile_s']):.2f} |"
        )
    return "\n".join(lines)
