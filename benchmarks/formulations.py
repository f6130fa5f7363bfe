"""Hand-written RMSProp steps on one vector: how the formulation of a step changes its speed.

Part of ``python -m benchmarks``. Each row is a jitted, donated step on the same
float32 vector, timed in interleaved rounds and given as a multiple of the plain float32 step.
They record what was tried for bfloat16 state on XLA:CPU and two choices inside the library:

* bfloat16 ``nu`` computed in float32 and stored with ``astype``, with ``uint16`` bit shifts,
  or as two bfloat16 values packed into one ``uint32``, each with the update taken from the
  unrounded ``nu`` (XLA then keeps the old state alive for a second pass), and with the update
  taken from ``nu`` as stored (what the library does);
* stochastic rounding with the library's per-element hash and with a full MurmurHash3
  finaliser per element;
* a momentum step whose overflow guard is ``jnp.clip`` against one that replaces infinities
  with a select (the library's ``clip_finite``);
* ``rsqrt`` in place of a square root and a division.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax

__all__ = ["compare", "format_table"]

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


def _murmur_finaliser(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: three xor-shifts and two multiplies per element."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
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


def _murmur_stochastic(p: jax.Array, nu: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Stochastic rounding with a full MurmurHash3 finaliser per element, both written here:
    # bits = finaliser(index * golden + seed), seed fixed.
    index = jax.lax.iota(_U32, p.shape[0])
    bits = _murmur_finaliser(index * np.uint32(0x9E3779B9) + np.uint32(12345))
    stored = _stochastic_to_bf16(_ema(nu.astype(_F32), g), bits)
    return p - LR * g / jnp.sqrt(stored.astype(_F32) + EPS), stored


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
    def step(p: jax.Array, state: Any, g: jax.Array) -> tuple[Any, Any]:
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    return step


def _variants(p: jax.Array) -> dict[str, tuple[Callable[..., Any], Any]]:
    n = p.shape[0]
    bf16_library = rmsprop_jax.rmsprop(LR, RHO, EPS, nu_dtype=_BF16)
    return {
        "float32 nu (reference)": (_plain, jnp.zeros(n, _F32)),
        "float32 nu, rsqrt instead of sqrt and divide": (_rsqrt, jnp.zeros(n, _F32)),
        "bf16 nu, astype, update from unrounded nu": (_bf16_unrounded, jnp.zeros(n, _BF16)),
        "bf16 nu, uint16 bit shifts, update from unrounded": (
            _uint16_unrounded,
            jnp.zeros(n, _U16),
        ),
        "bf16 nu, two per uint32, update from unrounded": (_packed_pairs, jnp.zeros(n // 2, _U32)),
        "bf16 nu, astype, update from stored nu": (_bf16_stored, jnp.zeros(n, _BF16)),
        "bf16 nu, stochastic, full MurmurHash3 per element": (
            _murmur_stochastic,
            jnp.zeros(n, _BF16),
        ),
        "bf16 nu, stochastic (rmsprop_jax, nu_dtype=bfloat16)": (
            _library(bf16_library),
            bf16_library.init(p),
        ),
        "float32 momentum, jnp.clip guard": (
            _momentum(_clip_guard),
            (jnp.zeros(n, _F32), jnp.zeros(n, _F32)),
        ),
        "float32 momentum, select guard (rmsprop_jax)": (
            _momentum(_select_guard),
            (jnp.zeros(n, _F32), jnp.zeros(n, _F32)),
        ),
    }


def compare(size: int, repeats: int, steps_per_sample: int = 3) -> dict[str, Any]:
    """Times every formulation on a ``size``-element vector; medians and minimums in seconds."""
    rng = np.random.default_rng(0)
    p0 = jnp.asarray(rng.standard_normal(size, dtype=np.float32))
    g = p0 * np.float32(0.05)
    runners = {}
    for name, (fn, state) in _variants(p0).items():
        step = jax.jit(fn, donate_argnums=(0, 1))
        carry = list(jax.block_until_ready(step(jnp.array(p0), state, g)))
        runners[name] = (step, carry)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for offset in range(len(names)):
            name = names[(round_ + offset) % len(names)]
            step, carry = runners[name]
            start = time.perf_counter()
            for _ in range(steps_per_sample):
                carry[:] = step(carry[0], carry[1], g)
            jax.block_until_ready(carry)
            samples[name].append((time.perf_counter() - start) / steps_per_sample)
    reference = names[0]
    ref_median = statistics.median(samples[reference])
    ref_min = min(samples[reference])
    return {
        "size": size,
        "repeats": repeats,
        "rows": [
            {
                "formulation": name,
                "median_s": statistics.median(samples[name]),
                "min_s": min(samples[name]),
                "vs_float32_median": statistics.median(samples[name]) / ref_median,
                "vs_float32_min": min(samples[name]) / ref_min,
                "seconds": samples[name],
            }
            for name in names
        ],
    }


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = [
        f"Formulations of one step on a {results['size'] / 1e6:.1f}M float32 vector "
        f"({results['repeats']} interleaved rounds)",
        "",
        "| formulation | median ms | min ms | × float32 step (median) | × float32 step (min) |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['formulation']} | {row['median_s'] * 1e3:.2f} | {row['min_s'] * 1e3:.2f} "
            f"| {row['vs_float32_median']:.2f} | {row['vs_float32_min']:.2f} |"
        )
    return "\n".join(lines)
