r"""Numerical building blocks shared by every transform; each choice lives here once.

The rules these functions implement are public documentation: the dtype policy
(``docs/dtype-policy.md``: which dtype each statistic is stored and computed in, and
stochastic rounding of ``bfloat16`` state) and the finite-in, finite-out guarantees
(``docs/numerics.md``: saturation at the largest finite value, what a saturated
:math:`\nu` gives, the centered clamp, zero denominators, bias correction before any
sample, run-time checks of traced hyperparameters). Each function's docstring says
which rule it carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _opaque, _quantized, _rounding

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

# A state leaf as kept in the state: an array, or a quantized array (codes and scales).
Stored = jax.Array | _quantized.QuantizedArray
# How a leaf is stored: a dtype, or a quantized format with its map's kind.
Storage = np.dtype | _quantized.LeafStorage


def state_dtype(param_dtype: Any, requested: np.dtype | None, *, real: bool) -> np.dtype:
    """The dtype of a statistic of a parameter of dtype ``param_dtype``.

    Args:
      param_dtype: the parameter's dtype.
      requested: a resolved ``*_dtype`` argument, or ``None`` for the default.
      real: whether the statistic is real even for a complex parameter (``nu``).

    Returns:
      The dtype described in the module's dtype policy.
    """
    param_dtype = jnp.dtype(param_dtype)
    is_complex = jnp.issubdtype(param_dtype, jnp.complexfloating)
    precision = jnp.finfo(param_dtype).dtype  # the real dtype of the same precision
    if requested is not None:
        precision = requested
    elif precision in _HALF:
        precision = jnp.dtype(jnp.float32)
    if is_complex and not real:
        return complex_dtype(precision)
    return jnp.dtype(precision)


# The two helpers below pick dtypes by precision instead of calling
# ``jnp.result_type``/``jnp.promote_types``: those follow the user's promotion mode
# and refuse float16/bfloat16 with float32, or float32 with complex64, under
# ``jax_numpy_dtype_promotion="strict"``.


def complex_dtype(real_dtype: Any) -> np.dtype:
    """The complex dtype holding at least the precision of ``real_dtype``."""
    return jnp.dtype(jnp.complex128 if jnp.finfo(real_dtype).bits > 32 else jnp.complex64)


def compute_dtype(*dtypes: Any) -> np.dtype:
    """The real dtype the arithmetic of one leaf runs in (at least ``float32``)."""
    real = [jnp.dtype(jnp.float32), *(jnp.finfo(d).dtype for d in dtypes)]
    return jnp.dtype(max(real, key=lambda d: jnp.finfo(d).bits))


def widen(x: jax.Array, real_dtype: np.dtype) -> jax.Array:
    """Casts ``x`` to ``real_dtype``, or to its complex counterpart if ``x`` is complex."""
    if jnp.iscomplexobj(x):
        return x.astype(complex_dtype(real_dtype))
    return x.astype(real_dtype)


def select(pred: jax.typing.ArrayLike, on_true: Any, on_false: Any) -> jax.Array:
    """``jnp.where(pred, on_true, on_false)``, written with ``jax.lax``.

    ``on_true`` or ``on_false`` is an array; the other may be a Python number, and
    ``pred`` a scalar or an array of that shape. The helpers here run once per leaf, and
    ``jnp.where`` (like ``jnp.isinf``, ``jnp.copysign`` and ``jnp.clip``) traces as a
    nested ``jit`` per call: on a tree of 200 small leaves those nested calls made XLA's
    compilation of a plain step take 1.0 s instead of 0.57 s.
    """
    like = on_true if isinstance(on_true, jax.Array) else on_false
    shape, dtype = like.shape, like.dtype

    def full(x: Any, to: Any) -> jax.Array:
        x = jax.lax.convert_element_type(x, to)
        # full_like takes the layout (sharding) of the array branch, as select requires.
        return x if x.shape == shape else jax.lax.full_like(like, x, to)

    return jax.lax.select(full(pred, jnp.bool_), full(on_true, dtype), full(on_false, dtype))


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real for complex ``x``."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def ema(old: jax.Array, new: jax.Array, rho: jax.Array) -> jax.Array:
    r"""One step of an exponential moving average, :math:`\rho\,old + (1 - \rho)\,new`.

    With :math:`\rho = 1` the result is ``old`` exactly: a square that overflowed to
    infinity (saturated only when stored) would otherwise give :math:`0 \cdot \infty`,
    NaN.
    """
    if jnp.iscomplexobj(old):
        rho = rho.astype(old.dtype)  # a real rho times a complex mean is a promotion
    return select(rho == 1, old, rho * old + (1 - rho) * new)


def debias(moment: jax.Array, total_weight: jax.Array) -> jax.Array:
    r"""Bias correction :math:`m / w`, with :math:`w = 1 - \prod_i \rho_i`.

    Saturated at the range; the identity while :math:`w = 0` (no sample absorbed yet).
    """
    divisor = select(total_weight > 0, total_weight, 1).astype(moment.dtype)
    return clip_finite(moment / divisor)


def saturation_value(stored: Stored) -> float:
    """The value a saturated non-negative statistic has as reloaded: its storage's maximum.

    An array saturates at its own dtype's largest finite value; a quantized leaf at
    ``float32``'s, which is where its codes decode to at most.
    """
    if isinstance(stored, _quantized.QuantizedArray):
        return float(jnp.finfo(jnp.float32).max)
    return float(jnp.finfo(stored.dtype).max)


def is_saturated(stored: Stored, reloaded: jax.Array) -> jax.Array:
    """Whether a non-negative statistic sits at the largest finite value of its storage.

    ``stored`` is the statistic as stored and ``reloaded`` the same values widened
    (:func:`store_and_reload`): an array is saturated at its own dtype's maximum, a
    quantized one where it decodes to ``float32``'s (:func:`saturation_value`).
    """
    if isinstance(stored, _quantized.QuantizedArray):
        return reloaded >= jnp.asarray(saturation_value(stored), reloaded.dtype)
    return stored >= jnp.finfo(stored.dtype).max


def bounded_mean(mu: jax.Array, saturated_nu: float, total_weight: jax.Array) -> jax.Array:
    r""":math:`\mu` brought within :math:`|\mu| \le b = \sqrt{w\,\nu}` where :math:`\nu` saturated.

    The moving averages keep the bound :math:`|\mu|^2 \le w\,\nu` exactly
    (Cauchy-Schwarz over the samples' weights, which sum to
    :math:`w = 1 - \prod_i \rho_i`). A saturated :math:`\nu` has lost mass that
    :math:`\mu` still has; bringing :math:`\mu` back within the bound keeps the
    variances of later steps non-negative in exact arithmetic, instead of clamping them
    to zero (an update of :math:`g/\sqrt{\epsilon}`) until :math:`|\mu|^2` decays below
    :math:`\nu`. The caller uses the result only where :math:`\nu` saturated, where it
    is ``saturated_nu`` (:func:`saturation_value`), so the bound :math:`b` is one number
    per step: a real :math:`\mu` is clamped to :math:`[-b, b]` (an infinite one too), a
    complex one scaled to magnitude :math:`b` keeping its phase. No square root or
    division per element, which every step would pay for the rare saturated one.
    """
    real = jnp.finfo(mu.dtype).dtype
    bound = jnp.sqrt(total_weight.astype(real) * jnp.asarray(saturated_nu, real))
    if not jnp.iscomplexobj(mu):
        big = jax.lax.full_like(mu, bound)
        low = jax.lax.neg(big)
        return jax.lax.select(mu > big, big, jax.lax.select(mu < low, low, mu))
    mu = clip_finite(mu)
    magnitude = jnp.abs(mu)
    over = magnitude > bound
    scale = select(over, bound / select(over, magnitude, 1), 1)
    return mu * scale.astype(mu.dtype)


def variance(nu: jax.Array, mu: jax.Array) -> jax.Array:
    r"""The centered second moment :math:`\max(\nu - |\mu|^2, 0)`."""
    return jnp.maximum(nu - abs_sq(mu), 0)


def denominator(second_moment: jax.Array, eps: jax.Array, eps_in_sqrt: bool) -> jax.Array:
    r""":math:`\sqrt{v + \epsilon}` if ``eps_in_sqrt`` else :math:`\sqrt{v} + \epsilon`.

    With ``eps`` inside, :math:`v + \epsilon` is saturated at the largest finite value
    before the root, so a huge ``eps`` or a saturated :math:`v` never makes it infinite.
    (Outside, :math:`\sqrt{v} \le \sqrt{\max}` is far below half an ulp of the
    maximum, so :math:`\sqrt{v} + \epsilon` cannot overflow for a finite ``eps``.)
    """
    if eps_in_sqrt:
        return jnp.sqrt(jnp.minimum(second_moment + eps, jnp.finfo(second_moment.dtype).max))
    return jnp.sqrt(second_moment) + eps


def safe_divide(numerator: jax.Array, denom: jax.Array, *, nonzero: bool = False) -> jax.Array:
    r"""``numerator / denom``, zero where ``denom`` is exactly zero.

    The quotient may exceed the range (e.g. :math:`g/\epsilon` with a tiny ``eps``
    outside the root); callers return it through :func:`saturating_cast`.
    ``nonzero=True`` says that ``denom`` is known to have no zero, and leaves the test out.
    """
    denom = denom.astype(numerator.dtype)
    if nonzero:
        return numerator / denom
    positive = denom != 0
    return select(positive, numerator / select(positive, denom, 1), 0)


def root_quotient(
    numerator: jax.Array, second_moment: jax.Array, eps: jax.typing.ArrayLike, eps_in_sqrt: bool
) -> jax.Array:
    r"""``numerator`` over the :func:`denominator` of ``second_moment``, by :func:`safe_divide`.

    ``second_moment`` is never negative, so with a concrete ``eps`` of at least the
    smallest normal number of its dtype the denominator is at least
    :math:`\min(\sqrt{\epsilon}, \epsilon) > 0` and the zero test is left out (a
    subnormal ``eps`` does not count: XLA:CPU flushes subnormals to zero). A traced
    ``eps`` keeps the test.
    """
    dtype = second_moment.dtype
    # NumPy, not jnp: under jit jnp.asarray makes even a Python number a tracer.
    nonzero = not isinstance(eps, jax.core.Tracer) and bool(
        np.asarray(eps, dtype) >= jnp.finfo(dtype).tiny
    )
    denom = denominator(second_moment, jnp.asarray(eps, dtype), eps_in_sqrt)
    return safe_divide(numerator, denom, nonzero=nonzero)


def clip_finite(x: jax.Array) -> jax.Array:
    """Clips ``x`` (each part, if complex) to the finite range of its own dtype."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(clip_finite(x.real), clip_finite(x.imag))
    # Written as selects, not as ``jnp.clip`` or a min/max pair: XLA:CPU fused a clamp
    # between the momentum buffer and its two consumers badly, recomputing the buffer and
    # copying the old one (4.4x the step time of optax's momentum on a 4M-element vector;
    # min/max: 6.5x), while a select fuses into its neighbours. Two compares and two
    # selects are six instructions per leaf where ``|x| == inf`` and ``sign(x) * max`` took
    # seven; XLA's compile time follows the instruction count. NaN fails both compares.
    lax = jax.lax
    big = lax.full_like(x, jnp.finfo(x.dtype).max)
    low = lax.neg(big)
    return lax.select(x > big, big, lax.select(x < low, low, x))


def saturating_cast(x: jax.Array, dtype: Any, *, in_range: bool = False) -> jax.Array:
    """Casts ``x`` to ``dtype``, saturating at the ends of ``dtype``'s finite range.

    A value beyond that range (an infinity included) becomes its largest finite value
    of the same sign; NaN stays.

    Every statistic and update leaves a transform through here (the saturation rule).
    ``in_range=True`` says that ``x`` already lies within its own dtype's finite range
    (a statistic as reloaded from storage, or such a value times a factor of magnitude
    at most 1, :func:`is_contraction`): a cast to that same dtype is then the identity
    and emits no clip (six instructions per leaf fewer for XLA to compile).
    """
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype:
        return x if in_range else clip_finite(x)
    if jnp.iscomplexobj(x):
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"cannot cast complex {x.dtype} to real {dtype}")
        real = jnp.finfo(dtype).dtype
        return jax.lax.complex(saturating_cast(x.real, real), saturating_cast(x.imag, real))
    if jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
        x = clip_magnitude(x, float(jnp.finfo(dtype).max))
    return x.astype(dtype)


def is_contraction(factor: Any) -> bool:
    """Whether ``factor`` is a concrete number of magnitude at most 1.

    The product of such a factor and a value within a dtype's finite range stays within
    it: the exact product is no larger in magnitude than the value, which is
    representable, and rounding is monotone. A traced factor (a schedule's value, an
    injected hyperparameter) is not known here, so it counts as not one.
    """
    if isinstance(factor, jax.core.Tracer) or np.ndim(factor) != 0:
        return False
    try:
        return bool(abs(complex(np.asarray(factor))) <= 1)
    except (TypeError, ValueError):
        return False


def clip_magnitude(x: jax.Array, bound: float) -> jax.Array:
    """``x`` clipped to ``[-bound, bound]`` (``jnp.clip`` without its nested ``jit``)."""
    big = jax.lax.full_like(x, bound)
    return jax.lax.min(jax.lax.max(x, jax.lax.neg(big)), big)


def counter_dtype() -> np.dtype:
    """The dtype of scalar bookkeeping: float64 when x64 is enabled, else float32."""
    return jnp.dtype(jnp.result_type(float))


class DecayStep(NamedTuple):
    """The decay applied at one update and the bookkeeping around it."""

    rho: jax.Array  # the decay of this update, a scalar
    count: jax.Array  # updates applied including this one (int32)
    total_weight: jax.Array  # 1 - prod of all decays applied, this one included
    previous_total_weight: jax.Array  # the same before this update


def decay_step(
    decay: optax.ScalarOrSchedule,
    count: jax.Array,
    total_weight: jax.Array,
) -> DecayStep:
    r"""Evaluates ``decay`` (a number or a schedule of the updates already applied).

    The total weight of the moving average's samples, :math:`w_t = 1 - \prod_{i \le t}
    \rho_i`, is updated as :math:`w_t = \rho_t w_{t-1} + (1 - \rho_t)` instead of
    being computed from the product: :math:`1 - P` loses the relative precision of
    a small :math:`1 - P` (a relative error of 3e-5 at the second update with
    :math:`\rho = 0.999` in float32), the recursion does not.
    """
    rho = decay(count) if callable(decay) else decay
    rho = jnp.asarray(rho).astype(total_weight.dtype)
    return DecayStep(
        rho=rho,
        # optax annotates the result as any number; it is an array of ``count``'s dtype.
        count=cast(jax.Array, optax.safe_increment(count)),
        total_weight=rho * total_weight + (1 - rho),
        previous_total_weight=total_weight,
    )


def map_unzip(
    fn: Callable[..., tuple[Any, ...]], n_outputs: int, tree: Any, *rest: Any
) -> tuple[Any, ...]:
    """Calls ``fn(salts, leaf, *rest_leaves)`` per leaf of ``tree``; returns ``n_outputs`` trees.

    ``salts`` is a uint32 array of two salts for :func:`store`'s random bits, the mixed
    bits of ``2 * i`` and ``2 * i + 1`` for the ``i``-th leaf of ``tree``'s flattening.

    While tracing, ``fn`` runs under a nested ``jax.jit``: it is traced once per distinct
    leaf signature (shapes and dtypes), and every leaf calls that one function. A tree
    of many leaves of a few shapes then traces and lowers in a time that grows with the
    number of shapes, not of leaves: on 300 small leaves of 6 shapes, with the ``lax``
    helpers above, a plain step's lowering went from 0.77 s to 0.30 s and a centered
    step's from 2.2 s to 0.38 s.
    Eagerly ``fn`` is called directly (a nested ``jit`` would compile on every call).
    """
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(other) for other in rest]
    tracing = any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
    call = jax.jit(fn) if tracing else fn
    salts = [
        np.asarray([_rounding.mixed_salt(2 * i), _rounding.mixed_salt(2 * i + 1)], np.uint32)
        for i in range(len(leaves))
    ]
    if tracing:
        # Scalars, not the pairs: XLA folds a pair through the lax.cond of runtime_values.
        flat = iter(_opaque.runtime_values([bits for pair in salts for bits in pair]))
        salts = [jnp.stack([first, second]) for first, second in zip(flat, flat)]
    outputs = [call(salt, *args) for salt, args in zip(salts, zip(leaves, *others))]
    columns = list(zip(*outputs)) if outputs else [()] * n_outputs
    return tuple(treedef.unflatten(list(column)) for column in columns)


def storage(leaf: Stored, requested: Any) -> Storage:
    """How a state leaf is stored: its dtype, or its quantized format and map.

    ``requested`` is the transform's resolved ``*_dtype`` argument; for a quantized leaf it
    is the :class:`rmsprop_jax.QuantizedFormat` that made it, and the leaf's code dtype
    says which map (``int8``: signed).
    """
    if isinstance(leaf, _quantized.QuantizedArray):
        if not isinstance(requested, _quantized.QuantizedFormat):
            raise TypeError(
                f"a quantized state leaf needs a quantized `*_dtype` format, got {requested!r}"
            )
        signed = jnp.issubdtype(leaf.codes.dtype, jnp.signedinteger)
        return _quantized.LeafStorage(requested, signed)
    return jnp.dtype(leaf.dtype)


def load(stored: Stored, dtype: Any, how: Storage) -> jax.Array:
    """A stored statistic as a ``dtype`` array (:func:`widen`, or decoding a quantized one).

    ``how`` is the leaf's :func:`storage`.
    """
    if isinstance(stored, _quantized.QuantizedArray):
        assert isinstance(how, _quantized.LeafStorage)
        return _quantized.dequantize(stored, how.format.code_map).astype(dtype)
    return widen(stored, dtype)


def store_and_reload(
    x: jax.Array, how: Storage, count: jax.Array | None, salt: int | jax.Array
) -> tuple[Stored, jax.Array]:
    """:func:`store` ``x``; returns the stored value and that value back in ``x``'s dtype.

    Transforms compute the update from the second (see the dtype policy).
    """
    stored = store(x, how, count, salt)
    return stored, load(stored, jnp.finfo(x.dtype).dtype, how)


def store(x: jax.Array, how: Storage, count: jax.Array | None, salt: int | jax.Array) -> Stored:
    """Casts a statistic to its storage (a dtype, or a quantized format).

    ``bfloat16`` storage is stochastically rounded (see :mod:`rmsprop_jax._rounding`)
    with random bits drawn from ``(element index, count, salt)`` (``salt`` as in
    :func:`_rounding.random_bits`), so that small
    increments of a moving average survive on average; every other storage dtype
    is a :func:`saturating_cast` (round to nearest). A statistic whose state has no
    update count (``count=None``: the momentum trace) is rounded to nearest in
    ``bfloat16``. Quantized storage (:mod:`rmsprop_jax._quantized`) saturates at the
    ``float32`` range and rounds its codes as its format says; without a count its random
    bits come from the values' own bits.
    """
    if isinstance(how, _quantized.LeafStorage):
        return _quantized.store(clip_finite(x), how, count, salt)
    dtype = jnp.dtype(how)
    if (
        count is not None
        and dtype == jnp.dtype(jnp.bfloat16)
        and not jnp.iscomplexobj(x)
        and x.dtype != dtype
    ):
        bits = _rounding.random_bits(x.shape, count, salt)
        return _rounding.stochastic_round_bfloat16(x, bits)
    return saturating_cast(x, dtype)
