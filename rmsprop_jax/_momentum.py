"""Heavy-ball and Nesterov momentum that follows the package's dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _numerics, _state, _validation
from rmsprop_jax._quantized import StateDType


def trace(
    decay: jax.typing.ArrayLike,
    *,
    nesterov: bool = False,
    trace_dtype: StateDType | None = None,
) -> optax.GradientTransformation:
    r"""Heavy-ball or Nesterov momentum, with statistics per the dtype policy.

    Keeps :math:`m_t = \beta m_{t-1} + v_t` and returns :math:`m_t`, or
    :math:`v_t + \beta m_t` with ``nesterov``.

    The arithmetic is that of ``optax.trace``; this version exists because optax
    keeps the trace in the parameter dtype (``float16`` for ``float16``
    parameters) and returns updates in the promoted dtype, while this package keeps
    statistics per its dtype policy and returns updates in the gradient dtype.
    The state is an ``optax.TraceState``.
    """
    naming = _validation.current_naming()
    _validation.check_scalar("momentum", decay, _validation.MOMENTUM)
    _validation.check_bool("nesterov", nesterov)
    trace_dtype = _validation.resolve_dtype("momentum_dtype", trace_dtype)

    def init_fn(params: optax.Params) -> optax.TraceState:
        return optax.TraceState(trace=_state.statistic(params, trace_dtype, real=False))

    def update_fn(
        updates: optax.Updates, state: optax.TraceState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.TraceState]:
        del params
        _validation.check_updates_match(updates, state.trace, "trace")
        _validation.check_at_run_time([("momentum", decay, _validation.MOMENTUM)], naming)

        def leaf(
            salts: jax.Array, v: jax.Array, m: _numerics.Stored
        ) -> tuple[jax.Array, _numerics.Stored]:
            dtype = _numerics.compute_dtype(v.dtype, m.dtype)
            v_wide = _numerics.widen(v, dtype)
            beta = jnp.asarray(decay, dtype).astype(v_wide.dtype)
            how = _numerics.storage(m, trace_dtype)
            new_m = v_wide + beta * _numerics.load(m, dtype, how)
            # No count in the state: bfloat16 rounds to nearest, quantized codes draw their
            # random bits from the values (_numerics.store). The update uses m as stored.
            stored_m, new_m = _numerics.store_and_reload(new_m, how, None, salts[0])
            update = v_wide + beta * new_m if nesterov else new_m
            # Without Nesterov the update is m as reloaded, within its dtype's range.
            in_range = not nesterov
            return _numerics.saturating_cast(update, v.dtype, in_range=in_range), stored_m

        updates, new_trace = _numerics.map_unzip(leaf, 2, updates, state.trace)
        return updates, optax.TraceState(trace=new_trace)

    return _state.transformation(init_fn, update_fn)
