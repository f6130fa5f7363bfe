r"""8-bit block-wise quantized optimizer state: the storage format, the leaf and its maps.

A statistic stored with :func:`quantized` keeps, per leaf, one 8-bit code per element
(``codes``, shaped like the parameter) and one ``float32`` scale per block of
``block_size`` consecutive elements along the last axis (``scales``, shaped like the
parameter with the last axis replaced by the number of blocks). An element's value is
its block's scale times the value of its code in a fixed *map* of codes to :math:`[0, 1]`
(unsigned, for :math:`\nu`) or :math:`[-1, 1]` (signed, for :math:`\mu` and the momentum
trace). The scale is the block's largest magnitude, so the element that sets it is
stored exactly.

The maps (``code_map``):

* ``"float"`` (the default): 8-bit floats in :math:`(0, 1]`, and zero. Unsigned
  (:math:`\nu`, 255 positive codes): four bits after the leading one from
  :math:`2^{-8}` to 1 (relative gaps of at most :math:`2^{-4}`), three bits over the
  15.75 binades below (:math:`2^{-3}`), 23.75 binades in all (a ratio of
  :math:`1.3 \times 10^7` inside one block). Signed (:math:`\mu` and the momentum
  trace, 127 magnitudes): three bits over 15.75 binades (:math:`6 \times 10^4`).
  Coding is a bit shift of the ``float32`` bit pattern in each segment of the map.
* ``"linear"``: :math:`k/255` (unsigned) or :math:`k/127` (signed); a uniform
  absolute gap, so small elements of a block are stored coarsely.

**No zero for a positive** :math:`\nu`. The unsigned code 0 is used only for an exact
zero: a positive value below the smallest positive code is stored as that code
(rounded up), and a decoded positive code is at least the smallest normal
``float32``. A positive :math:`\nu` never comes back as 0, which would make the update
:math:`g/\sqrt{\epsilon}` (the zero-point problem, Li et al. 2023). Signed values
below the smallest code round between 0 and it like any other pair of neighbours.

**Rounding.** With ``stochastic_rounding`` a value between two neighbouring codes
:math:`a < x < b` is stored as :math:`b` with probability :math:`(x - a)/(b - a)`,
so that the stored value is unbiased, :math:`E[\hat x] = x`: the small increments of a
moving average with a decay near 1 survive on average. The random bits come from
:func:`rmsprop_jax._rounding.random_bits` (the element's index, the update count and
a per-leaf salt), as for ``bfloat16`` state. Without it, values round to the nearest
code.

References:
  Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
  Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

  Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States
  <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _opaque, _rounding

SUPPORTED_BITS = (8,)
CODE_MAPS = ("float", "linear")
_F32 = jnp.dtype(jnp.float32)
_MAX_BITS = 0x7F7FFFFF  # the bit pattern of float32's largest finite value
_SIGN_BIT = np.uint32(0x80000000)
# The smallest positive value a positive code decodes to: the smallest normal float32
# (XLA:CPU flushes subnormals to zero in arithmetic).
_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class QuantizedFormat:
    """How :func:`quantized` stores a statistic; made by :func:`quantized`, which checks it.

    Attributes:
      bits: bits per code (8).
      block_size: elements per block along the last axis (a power of two).
      min_size: leaves with fewer elements keep the dtype policy's dtype.
      stochastic_rounding: round codes stochastically (unbiased) or to nearest.
      code_map: ``"float"`` or ``"linear"`` (see :func:`quantized`).
    """

    bits: int = 8
    block_size: int = 256
    min_size: int = 4096
    stochastic_rounding: bool = True
    code_map: str = "float"

    def applies_to(self, shape: tuple[int, ...], *, complex_values: bool) -> bool:
        """Whether a statistic of this shape is quantized (else it keeps the policy dtype).

        Only real statistics with at least one axis and ``min_size`` elements are.
        """
        return not complex_values and len(shape) >= 1 and math.prod(shape) >= max(self.min_size, 1)


def quantized(
    bits: int = 8,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    stochastic_rounding: bool = True,
    code_map: str = "float",
) -> QuantizedFormat:
    r"""A block-wise quantized storage format, accepted wherever a state dtype is.

    Pass it as ``nu_dtype``, ``mu_dtype`` or ``momentum_dtype`` of
    :func:`rmsprop_jax.rmsprop`, :func:`rmsprop_jax.scale_by_rms` or
    :func:`rmsprop_jax.scale_by_centered_rms`. Each leaf of the statistic with at least
    ``min_size`` elements (and at least one axis, real) is stored as a
    :class:`QuantizedArray`: one ``bits``-bit code per element and one ``float32`` scale
    per block of ``block_size`` elements along the last axis. Smaller leaves, and the
    statistics of complex parameters that are complex, keep the dtype that the
    :ref:`dtype-policy` gives by default. An element :math:`x` of block :math:`b` is stored as

    .. math::

        s_b = \max_{i \in b} |x_i|, \qquad c = \mathrm{round}(x / s_b), \qquad
        \hat x = s_b\, \mathrm{map}(c),

    where :math:`\mathrm{round}` picks one of the two neighbouring values of the map,
    stochastically (unbiased, :math:`E[\hat x] = x`) or the nearest. :math:`\nu` uses an
    unsigned map whose zero code is kept for exact zeros (a positive :math:`\nu` is never
    stored as 0); :math:`\mu` and the momentum trace use a signed map. The arithmetic of a
    step runs in ``float32`` (or wider), and the update uses the statistics as stored. The
    state is about a quarter of ``float32`` state: 1 byte per element plus 4 per
    ``block_size`` elements. What this gives and costs is on :ref:`quantized-state`.

    Args:
      bits: bits per code; 8 is supported.
      block_size: elements per block along the last axis, a positive power of two. The
        last block of a row whose length is not a multiple holds the remainder (no
        padding is stored).
      min_size: leaves with fewer elements keep the dtype policy's dtype; ``>= 0``.
      stochastic_rounding: round codes stochastically (True) or to nearest (False).
      code_map: the values of the codes: ``"float"`` (8-bit floats: for :math:`\nu`,
        relative gaps of :math:`2^{-4}` over the top 8 binades of a block and
        :math:`2^{-3}` below, a ratio of :math:`1.3 \times 10^7` in all; for :math:`\mu`
        and the trace :math:`2^{-3}` over :math:`6 \times 10^4`), or ``"linear"``
        (equally spaced).

    Returns:
      A :class:`QuantizedFormat`, immutable and hashable.

    Raises:
      ValueError: an argument out of range, naming it and its value.

    References:
      Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
      Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022 (block-wise
      quantization of optimizer state).

      Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023 (the zero point of the second
      moment).

    Example:
      A 64 x 128 parameter keeps 8-bit codes and 64 x 1 block scales for :math:`\nu`:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.rmsprop(1e-3, nu_dtype=rmsprop_jax.quantized(block_size=128))
      >>> state = tx.init({"w": jnp.ones((64, 128)), "b": jnp.zeros(128)})
      >>> nu = optax.tree.get(state, "nu")
      >>> nu["w"].codes.dtype, nu["w"].codes.shape, nu["w"].scales.shape
      (dtype('uint8'), (64, 128), (64, 1))
      >>> nu["b"].dtype  # under min_size: the dtype policy's float32
      dtype('float32')
      >>> updates, state = tx.update({"w": jnp.ones((64, 128)), "b": jnp.ones(128)}, state)
      >>> nu_w = rmsprop_jax.dequantize(optax.tree.get(state, "nu")["w"])
      >>> print(nu_w.shape, f"{float(nu_w[0, 0]):.4f}")
      (64, 128) 0.1000
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}.")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
        or block_size & (block_size - 1)
    ):
        raise ValueError(f"`block_size` must be a positive power of two, got {block_size!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"`min_size` must be a non-negative integer, got {min_size!r}.")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(
            f"`stochastic_rounding` must be True or False, got {stochastic_rounding!r}."
        )
    if code_map not in CODE_MAPS:
        raise ValueError(f"`code_map` must be one of {CODE_MAPS}, got {code_map!r}.")
    return QuantizedFormat(bits, block_size, min_size, stochastic_rounding, code_map)


# What a ``*_dtype`` argument accepts: a dtype (or its name) or a quantized format.
StateDType = jax.typing.DTypeLike | QuantizedFormat


class QuantizedArray(NamedTuple):
    r"""One quantized statistic: codes and per-block scales (see :func:`quantized`).

    A NamedTuple, so ``jax.tree`` functions, orbax and ``flax.serialization`` see its two
    arrays as ordinary leaves. :func:`dequantize` gives the values back. Which map the codes
    use follows from their dtype: ``uint8`` the unsigned map (:math:`\nu`), ``int8`` the
    signed one. A sharding for it is a ``QuantizedArray`` of two shardings, both the
    parameter's (both arrays have the parameter's number of axes, and the blocks lie along
    the last axis).
    """

    codes: jax.Array
    """The parameter's shape; ``uint8`` (unsigned map) or ``int8`` (signed map)."""
    scales: jax.Array
    """``float32``; the codes' shape with the last axis ``ceil(n / block_size)``."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the values: the codes' shape."""
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the values it decodes to: ``float32``."""
        return _F32


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (for ``is_leaf`` in tree functions)."""
    return isinstance(x, QuantizedArray)


def _block_size_of(length: int, blocks: int) -> int:
    """The power-of-two block size that splits ``length`` into ``blocks`` blocks.

    The smallest power of two at least ``ceil(length / blocks)``: for two or more blocks it
    is the only one giving that many; for one block any size from ``length`` up does.
    """
    per_block = max(1, -(-length // max(blocks, 1)))
    return 1 << (per_block - 1).bit_length()


class _Layout(NamedTuple):
    """Where the elementwise coding runs: blocked ``(..., blocks, block_size)`` or flat.

    A last axis that is a multiple of ``block_size`` (the common case) is split into blocks
    by a reshape that costs nothing, and a block's scale is one broadcast value. A ragged
    last axis (a shorter last block) stays flat, each element finding its block's scale by
    index: padding it to whole blocks made XLA:CPU write padded copies of the codes and
    of the values (4.1x the float32 step on a 4096 x 1000 leaf against 1.8x at 4096 x 1024).
    """

    length: int
    block_size: int

    @property
    def aligned(self) -> bool:
        return self.length % self.block_size == 0

    def split(self, x: jax.Array) -> jax.Array:
        """``x`` (the codes' shape) in the layout."""
        if not self.aligned:
            return x
        return x.reshape(*x.shape[:-1], self.length // self.block_size, self.block_size)

    def merge(self, x: jax.Array) -> jax.Array:
        """The inverse of :meth:`split`."""
        return x.reshape(*x.shape[:-2], self.length) if self.aligned else x

    def spread(self, per_block: jax.Array) -> jax.Array:
        """Per-block values (the scales' shape) repeated over each block's elements."""
        blocks = per_block.shape[-1]
        full = jax.lax.broadcast_in_dim(
            per_block, (*per_block.shape, self.block_size), tuple(range(per_block.ndim))
        )
        if self.aligned:
            return full
        full = full.reshape(*per_block.shape[:-1], blocks * self.block_size)
        return jax.lax.slice_in_dim(full, 0, self.length, axis=-1)

    def block_max(self, magnitude_bits: jax.Array) -> jax.Array:
        """The largest value of each block, from non-negative float32 bit patterns."""
        if self.aligned:
            return _block_max(magnitude_bits)
        whole = self.length // self.block_size * self.block_size
        tail = jax.lax.slice_in_dim(magnitude_bits, whole, self.length, axis=-1)
        tail_max = jax.lax.reduce_max(jax.lax.bitcast_convert_type(tail, _F32), (tail.ndim - 1,))[
            ..., None
        ]
        if whole == 0:
            return tail_max
        head = jax.lax.slice_in_dim(magnitude_bits, 0, whole, axis=-1)
        head_max = _block_max(head.reshape(*head.shape[:-1], -1, self.block_size))
        return jax.lax.concatenate([head_max, tail_max], head_max.ndim - 1)


def _top(signed: bool) -> int:
    """The largest code magnitude: 127 (signed) or 255 (unsigned)."""
    return 127 if signed else 255


class _Segment(NamedTuple):
    """A run of the float map's codes with one number of bits after the leading one.

    Code magnitude ``code`` decodes to :math:`2^{-binade}`, and every code of the segment
    to the float32 bit pattern ``(code + offset) << shift``. A segment holds the codes
    from ``code`` up to the next higher segment's (the lowest segment also those below),
    and values from :math:`2^{-binade}` up are coded in it.
    """

    mantissa_bits: int
    code: int
    binade: int

    @property
    def shift(self) -> int:
        """The float32 mantissa bits the segment drops."""
        return 23 - self.mantissa_bits

    @property
    def offset(self) -> int:
        """``code + offset`` is the value's bit pattern shifted right by ``shift``."""
        return ((127 - self.binade) << 23 >> self.shift) - self.code


# The unsigned map (nu): 4 bits after the leading one over the top 8 binades of a block
# (codes 127 .. 255, 2^-8 .. 1: gradients within 16x of the block's largest root mean
# square), 3 bits below (codes 1 .. 126, 15.75 binades more), 23.75 binades in all. The
# signed map (mu and the momentum trace): 3 bits over 15.75 binades (codes 1 .. 127).
# Why two segments for nu (benchmarks/state_precision.py, plain RMSProp, decay 0.999,
# largest deviation of the training loss from float32 state): 3 bits over 32 binades
# strayed 5.48% (digits MLP) and 6.40% (GRU); 4 bits over 16 binades 3.72% and 3.20%, but
# floored the small elements of blocks whose gradients span four decades (the median
# update 6% small in tests/test_quantized.py); the two segments 3.25% and 1.57%.
_UNSIGNED_SEGMENTS = (_Segment(4, 127, 8), _Segment(3, 127, 8))
_SIGNED_SEGMENTS = (_Segment(3, 127, 0),)


def _segments(signed: bool) -> tuple[_Segment, ...]:
    """The float map's segments, from the highest codes down."""
    return _SIGNED_SEGMENTS if signed else _UNSIGNED_SEGMENTS


def _map_values(magnitude: jax.Array, code_map: str, signed: bool) -> jax.Array:
    """The map's value in [0, 1] of code magnitudes (int32, 0 .. top)."""
    if code_map == "linear":
        return magnitude.astype(_F32) * np.float32(1 / _top(signed))
    *higher, lowest = _segments(signed)
    raw = (magnitude + np.int32(lowest.offset)).astype(jnp.uint32) << np.uint32(lowest.shift)
    for segment in reversed(higher):
        in_segment = (magnitude + np.int32(segment.offset)).astype(jnp.uint32)
        raw = jax.lax.select(magnitude >= segment.code, in_segment << np.uint32(segment.shift), raw)
    value = jax.lax.bitcast_convert_type(raw, _F32)
    return jax.lax.select(magnitude == 0, jnp.zeros_like(value), value)


def smallest_value(code_map: str, signed: bool) -> float:
    """The map's smallest positive value (code magnitude 1)."""
    with jax.ensure_compile_time_eval():
        return float(_map_values(jnp.asarray(1, jnp.int32), code_map, signed))


def dequantize(leaf: QuantizedArray, code_map: str = "float") -> jax.Array:
    r"""The ``float32`` values of a quantized statistic, shaped like its parameter.

    For inspection: ``rmsprop_jax.dequantize(optax.tree.get(state, "nu")["w"])``. Each
    element is its block's scale times its code's value in the map (see
    :func:`quantized`); a positive code of :math:`\nu` gives at least the smallest normal
    ``float32``. A leaf does not record its map: pass the ``code_map`` of the
    :func:`quantized` format that made it.

    Args:
      leaf: a :class:`QuantizedArray` from an optimizer state.
      code_map: the format's ``code_map``, ``"float"`` (the default) or ``"linear"``.

    Returns:
      A ``float32`` array of the codes' shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.scale_by_rms(0.5, nu_dtype=rmsprop_jax.quantized(min_size=0))
      >>> _, state = tx.update(jnp.full(4, 2.0), tx.init(jnp.zeros(4)))
      >>> print(rmsprop_jax.dequantize(state.nu))
      [2. 2. 2. 2.]
    """
    if code_map not in CODE_MAPS:
        raise ValueError(f"`code_map` must be one of {CODE_MAPS}, got {code_map!r}.")
    codes, scales = leaf.codes, leaf.scales
    length = codes.shape[-1]
    block_size = _block_size_of(length, scales.shape[-1])
    signed = jnp.issubdtype(codes.dtype, jnp.signedinteger)
    layout = _Layout(length, block_size)
    # Decoded with integer operations on the float32 bit patterns (cheaper on XLA:CPU
    # than float max/select, which must order NaN and signed zeros).
    wide = layout.split(codes).astype(jnp.int32)
    magnitude = jax.lax.abs(wide) if signed else wide
    scale = layout.spread(scales.astype(_F32))
    values = _bits(_map_values(magnitude, code_map, signed) * scale)
    if signed:
        # The sign bit of a negative int32 code is the sign bit of its value.
        values = values | (jax.lax.bitcast_convert_type(wide, jnp.uint32) & _SIGN_BIT)
    else:
        # A positive code never decodes to 0, even where scale * value underflows: at
        # least the smallest normal float32 (the values are >= 0, so their bit patterns
        # order like them).
        floor = jax.lax.min(wide, jnp.ones_like(wide)).astype(jnp.uint32) << np.uint32(23)
        values = jax.lax.max(values, floor)
    return layout.merge(jax.lax.bitcast_convert_type(values, _F32))


def quantize(
    x: jax.Array,
    fmt: QuantizedFormat,
    *,
    signed: bool,
    bits: jax.Array | None,
) -> QuantizedArray:
    r"""Stores ``x`` (finite, real; non-negative unless ``signed``) in the format ``fmt``.

    Args:
      x: the values; cast to float32 first (saturating at float32's range).
      fmt: the format.
      signed: the signed map (int8 codes) or the unsigned one (uint8 codes).
      bits: uint32 random bits of ``x``'s shape for stochastic rounding, or ``None`` to
        round to nearest.

    Returns:
      The :class:`QuantizedArray`.
    """
    length = x.shape[-1]
    layout = _Layout(length, fmt.block_size)
    xb = layout.split(x.astype(_F32))
    # |x| clipped to float32's range (an overflow of the cast included), on the bit
    # pattern: for non-negative floats the integer order is the float order.
    raw_x = _bits(xb)
    magnitude_bits = jax.lax.min(raw_x & ~_SIGN_BIT, np.uint32(_MAX_BITS))
    magnitude = jax.lax.bitcast_convert_type(magnitude_bits, _F32)
    scales = layout.block_max(magnitude_bits)
    # y = |x| / scale in [0, 1], as a multiplication by a per-block reciprocal: a division
    # per element cost more than the rest of the coding, and XLA:CPU materialised its
    # result (16 MB on a 4M-element leaf) rather than recompute it in each consumer.
    prescale, reciprocal = _reciprocal(scales)
    y = (magnitude * layout.spread(prescale)) * layout.spread(reciprocal)
    # y exceeds 1 by at most two units in the last place (the block's largest element and
    # those within an ulp of it); the float map's code of such a y is the top one, and the
    # linear map's is capped at the top below.
    raw = _bits(y)
    top = _top(signed)
    smallest = np.float32(smallest_value(fmt.code_map, signed))
    if bits is not None:
        bits = layout.split(bits)
    positive = magnitude > 0
    # Uniform in [0, 1) from the top 24 random bits, for the rounding below the smallest
    # code and for the linear map; the float map adds the top bits below its last place.
    if fmt.code_map == "linear":
        q = y * np.float32(top)
        low = jnp.floor(q)
        if bits is None:
            up = q - low >= 0.5
        else:
            up = _uniform(bits) < q - low
        code = low.astype(jnp.int32) + up.astype(jnp.int32)
        code = jax.lax.min(code, jnp.full_like(code, top))  # y (so q) may pass 1 (top)
        if not signed:  # a positive nu is never stored as 0
            code = jax.lax.select(positive, jax.lax.max(code, jnp.ones_like(code)), code)
    else:
        # In each segment the codes are the top bits of y's pattern, offset: adding noise
        # below the segment's last kept bit and truncating rounds up with probability
        # equal to the discarded fraction (or to nearest, with half a unit). A value just
        # below a segment's lowest rounds up to it in the segment below (the same code),
        # and y <= 1 keeps the code at most ``top``.
        def segment_code(segment: _Segment) -> jax.Array:
            if bits is None:
                noise = jnp.full_like(raw, 1 << (segment.shift - 1))
            else:
                noise = bits >> np.uint32(32 - segment.shift)
            rounded = ((raw + noise) >> np.uint32(segment.shift)).astype(jnp.int32)
            return rounded - np.int32(segment.offset)

        *higher, lowest = _segments(signed)
        code = segment_code(lowest)
        for segment in reversed(higher):
            code = jax.lax.select(
                y >= np.float32(2.0**-segment.binade), segment_code(segment), code
            )
        if signed:
            # Below the smallest positive code: round between 0 and it.
            if bits is None:
                up = y >= smallest * np.float32(0.5)
            else:
                up = _uniform(bits) * smallest < y
            code = jax.lax.select(y < smallest, up.astype(jnp.int32), code)
        else:
            # Below the smallest positive code: up to it (a positive nu is never stored
            # as 0); an exact zero is code 0.
            code = jax.lax.select(
                positive, jax.lax.max(code, jnp.ones_like(code)), jnp.zeros_like(code)
            )
    if signed:
        code = jax.lax.select(raw_x >= _SIGN_BIT, -code, code)
        codes = code.astype(jnp.int8)
    else:
        codes = code.astype(jnp.uint8)
    return QuantizedArray(_materialised(layout.merge(codes)), scales)


def _block_max(magnitude_bits: jax.Array) -> jax.Array:
    """The largest value of each block (the last axis), from non-negative float32 patterns.

    First the largest of each run of 8 neighbours, as int32 (non-negative floats order like
    their bit patterns), then of those per block as float32. XLA:CPU fuses the first step
    with the computation of the values and vectorises it, so the values are never written
    to memory; a float32 max over whole blocks became a separate library kernel that read
    them back after they were written out. The second step is in float32 because XLA merges
    two int32 max-reductions into one, which it then runs as a slow reduce-window.
    """
    wide = jax.lax.bitcast_convert_type(magnitude_bits, jnp.int32)
    block_size = wide.shape[-1]
    group = min(block_size, 8)
    grouped = wide.reshape(*wide.shape[:-1], block_size // group, group)
    partial = jax.lax.bitcast_convert_type(jax.lax.reduce_max(grouped, (grouped.ndim - 1,)), _F32)
    return jax.lax.reduce_max(partial, (partial.ndim - 1,))


def _materialised(codes: jax.Array) -> jax.Array:
    """``codes``, computed once and read back from memory by every consumer.

    The reload of a stored statistic decodes its codes, and without this XLA:CPU fused the
    whole quantization (the statistic's update, the rounding bits, the coding) into each
    consumer of the decoded values instead of reading the one-byte codes: twice in a plain
    step, and with centered RMSProp and momentum, whose statistics feed one another, up to
    nine times. XLA sees through an optimization barrier and an identity ``lax.cond``, not
    through a ``lax.cond`` on a predicate computed at run time (always true) whose other
    branch differs.
    """
    (keep,) = _opaque.runtime_values([True])
    return jax.lax.cond(keep, lambda c: c, jnp.zeros_like, codes)


def _bits(x: jax.Array) -> jax.Array:
    """The uint32 bit pattern of float32 ``x``."""
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _reciprocal(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per block, ``(a, r)`` with ``a`` a power of two: ``(|x| * a) * r`` is ``|x| / s``.

    ``r`` is ``1 / (a s)`` rounded up, so that the block's largest element gets 1 (after
    clipping to 1) and its top code exactly. ``a`` is ``2^-64`` for a scale above
    ``2^64`` and 1 otherwise: ``1 / s`` of a scale near float32's maximum is subnormal,
    which XLA:CPU flushes to zero. Elements that ``a`` flushes to zero are more than
    ``2^126`` times smaller than their block's scale, far below any code. A block whose
    scale is 0 or subnormal (flushed) gets ``r = 0``: it holds zeros or values the caller
    stores as 0 or as the smallest code.
    """
    usable = scales >= np.float32(_TINY)
    prescale = jax.lax.select(
        scales > np.float32(2.0**64), jnp.full_like(scales, 2.0**-64), jnp.ones_like(scales)
    )
    r = 1 / jax.lax.select(usable, scales * prescale, jnp.ones_like(scales))
    r = jax.lax.bitcast_convert_type(_bits(r) + np.uint32(1), _F32)  # rounded up
    return prescale, jax.lax.select(usable, r, jnp.zeros_like(r))


def _uniform(bits: jax.Array) -> jax.Array:
    """Uniform float32 in [0, 1) from the top 24 of 32 random bits."""
    return (bits >> np.uint32(8)).astype(_F32) * np.float32(2.0**-24)


def value_bits(x: jax.Array, salt: int | jax.Array) -> jax.Array:
    """Random bits from the element's index, the salt and the bits of its value ``x``.

    For a statistic whose state has no update count (the momentum trace): the value
    changes from step to step, so its hash does too.
    """
    index_bits = _rounding.random_bits(x.shape, jnp.zeros((), jnp.int32), salt)
    raw = jax.lax.bitcast_convert_type(x.astype(_F32), jnp.uint32)
    h = (raw ^ index_bits) * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class LeafStorage(NamedTuple):
    """How one quantized leaf is stored: the format and the map's kind."""

    format: QuantizedFormat
    signed: bool


def store(
    x: jax.Array, storage: LeafStorage, count: jax.Array | None, salt: int | jax.Array
) -> QuantizedArray:
    """Quantizes ``x`` per ``storage``, drawing rounding bits from ``(index, count, salt)``.

    With ``count=None`` the bits come from :func:`value_bits`.
    """
    fmt = storage.format
    bits = None
    if fmt.stochastic_rounding:
        if count is None:
            bits = value_bits(x, salt)
        else:
            bits = _rounding.random_bits(x.shape, count, salt)
    return quantize(x, fmt, signed=storage.signed, bits=bits)
