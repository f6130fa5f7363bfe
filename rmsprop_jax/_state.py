"""What the transforms keep in their state, and how it starts and advances.

The RMS transforms and :func:`rmsprop_jax.bias_correction` keep the same two counters
first in their state (:class:`Counters`) and advance them the same way
(:func:`advance`); every statistic (``nu``, ``mu``, a momentum trace) starts as a tree
like the parameters in the dtype of the dtype policy (:func:`statistic`). Every
transform is returned through :func:`transformation`, which types its update by its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypedDict, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _numerics, _quantized, _validation


class Counters(TypedDict):
    """The counters at the head of :class:`rmsprop_jax.ScaleByRmsState` and its siblings."""

    count: jax.Array  # shape (), int32: updates applied so far
    total_weight: jax.Array  # shape (), counter dtype: 1 - prod of the decays applied


def initial_counters() -> Counters:
    """The counters before any update: ``count`` 0 and ``total_weight`` 0."""
    return Counters(
        count=jnp.zeros([], jnp.int32),
        total_weight=jnp.zeros([], _numerics.counter_dtype()),
    )


def advance(
    decay: optax.ScalarOrSchedule,
    count: jax.Array,
    total_weight: jax.Array,
    naming: _validation.Naming,
    checks: Sequence[tuple[str, Any, _validation.Interval]] = (),
) -> _numerics.DecayStep:
    """The decay of this update and the counters after it (:func:`_numerics.decay_step`).

    The decay (a schedule's value, or the number itself) is checked at run time with the
    other hyperparameters in ``checks`` (:func:`_validation.check_at_run_time`).
    """
    step = _numerics.decay_step(decay, count, total_weight)
    rho = step.rho if callable(decay) else decay
    _validation.check_at_run_time([("decay", rho, _validation.UNIT), *checks], naming)
    return step


def statistic(
    params: optax.Params,
    requested: np.dtype | _quantized.QuantizedFormat | None,
    *,
    real: bool,
    fill: jax.typing.ArrayLike = 0.0,
) -> optax.Updates:
    """A tree like ``params``, every leaf ``fill``, stored as the dtype policy says.

    Args:
      params: the parameters.
      requested: a resolved ``*_dtype`` argument (a dtype or a quantized format), or
        ``None`` for the default.
      real: whether the statistic is real even for a complex parameter (``nu``, which
        is also non-negative: a quantized ``nu`` uses the unsigned map).
      fill: the initial value.

    Returns:
      The initial statistic (see :func:`_numerics.state_dtype`); a leaf that the quantized
      format applies to is a :class:`rmsprop_jax.QuantizedArray`, the others keep the
      dtype the policy gives by default.
    """
    quantized = requested if isinstance(requested, _quantized.QuantizedFormat) else None
    dtype_requested = requested if not isinstance(requested, _quantized.QuantizedFormat) else None

    def leaf(param: jax.Array) -> _numerics.Stored:
        param_dtype = jnp.result_type(param)
        dtype = _numerics.state_dtype(param_dtype, dtype_requested, real=real)
        complex_values = jnp.issubdtype(dtype, jnp.complexfloating)
        if quantized is not None and quantized.applies_to(
            jnp.shape(param), complex_values=complex_values
        ):
            values = jnp.full_like(param, fill, dtype=jnp.float32)
            how = _quantized.LeafStorage(quantized, signed=not real)
            return _numerics.store(values, how, None, 0)
        return jnp.full_like(param, fill, dtype=dtype)

    return jax.tree.map(leaf, params)


_State = TypeVar("_State", bound=optax.OptState)
_State_co = TypeVar("_State_co", bound=optax.OptState, covariant=True)


class InitFn(Protocol[_State_co]):
    """``optax.TransformInitFn`` returning a state of type ``_State_co``."""

    def __call__(self, params: optax.Params) -> _State_co: ...


class UpdateFn(Protocol[_State]):
    """``optax.TransformUpdateFn`` taking and returning a state of type ``_State``."""

    def __call__(
        self, updates: optax.Updates, state: _State, params: optax.Params | None = None
    ) -> tuple[optax.Updates, _State]: ...


def transformation(
    init_fn: InitFn[_State], update_fn: UpdateFn[_State]
) -> optax.GradientTransformation:
    """``optax.GradientTransformation(init_fn, update_fn)``, with ``update_fn`` typed by its state.

    optax's ``TransformUpdateFn`` protocol takes any tree (``optax.OptState``) as the state,
    so an update annotated with its own state type does not match it, although that is
    the only state it is given (the one ``init_fn`` returns). Here the checker sees that
    ``init_fn`` and ``update_fn`` agree on the state's type, and the cast is the one place
    that tells it the pair makes an optax transformation.
    """
    return optax.GradientTransformation(init_fn, cast(optax.TransformUpdateFn, update_fn))
