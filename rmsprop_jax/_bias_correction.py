"""Bias correction of the second moment as a transformation of its own."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _numerics, _state, _validation


class BiasCorrectionState(NamedTuple):
    """State of :func:`bias_correction`."""

    count: jax.Array
    """Shape ``()``, int32: updates applied so far."""
    total_weight: jax.Array
    r"""Shape ``()``, float32 (float64 with x64): the total weight of the averaged
    samples, :math:`1 - \prod_{i \le t} \rho_i` (0 at init), the bias correction's divisor."""


def bias_correction(decay: optax.ScalarOrSchedule = 0.9) -> optax.GradientTransformation:
    r"""Multiplies updates by :math:`\sqrt{1 - \prod_{i \le t} \rho_i}`.

    Placed in a chain after :func:`scale_by_rms` or :func:`scale_by_centered_rms`
    (built without ``bias_correction``) and given the same ``decay``, it applies
    the bias correction of the second moment to their updates:

    .. math::

        u_t = \sqrt{1 - P_t}\; v_t, \qquad P_t = \prod_{i \le t} \rho_i
        \quad (= \rho^t \text{ for a constant decay}),

    where :math:`v_t` is the incoming update. For :func:`scale_by_rms` it relates
    to the ``bias_correction=True`` flag as follows:

    * with ``eps = 0`` the two are equal:
      :math:`\sqrt{1-P_t}\, g/\sqrt{\nu_t} = g/\sqrt{\nu_t/(1-P_t)}`;
    * for any ``eps`` they are equal once ``eps`` is rescaled ("epsilon hat",
      Kingma & Ba, section 2): the chain with ``eps`` equals the flag with
      :math:`\hat\epsilon_t = \epsilon/\sqrt{1-P_t}` when ``eps`` is outside the
      root, and with :math:`\hat\epsilon_t = \epsilon/(1-P_t)` when it is inside.

    After :func:`scale_by_centered_rms` it is **not** the flag: the chain gives
    :math:`g/\sqrt{(\nu_t - |\mu_t|^2)/(1-P_t)}`, while the flag debiases both
    moments, :math:`g/\sqrt{\nu_t/(1-P_t) - |\mu_t|^2/(1-P_t)^2}`; the two agree
    only as :math:`P_t \to 0`.

    Args:
      decay: the :math:`\rho` of the transform it corrects, in [0, 1], or a
        schedule of the number of updates already applied.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`BiasCorrectionState`.
      Before any sample is absorbed (:math:`P_t = 1`) the factor is 1.

    Raises:
      ValueError: ``decay`` is out of range or not a scalar.

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014, section 2 and algorithm 1.

    Example:
      With ``eps=0`` the chain equals the flag; at the first update with a unit
      gradient both are :math:`\sqrt{0.1}/\sqrt{0.1} = 1`:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rmsprop_jax
      >>> tx = optax.chain(
      ...     rmsprop_jax.scale_by_rms(decay=0.9, eps=0.0),
      ...     rmsprop_jax.bias_correction(decay=0.9),
      ... )
      >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> print(updates)
      [1. 1.]
    """
    naming = _validation.current_naming()
    _validation.check_scalar("decay", decay, _validation.UNIT, allow_schedule=True)

    def init_fn(params: optax.Params) -> BiasCorrectionState:
        del params
        return BiasCorrectionState(**_state.initial_counters())

    def update_fn(
        updates: optax.Updates,
        state: BiasCorrectionState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, BiasCorrectionState]:
        del params
        step = _state.advance(decay, state.count, state.total_weight, naming)
        # sqrt(w) = 1 / sqrt(debias(1, w)): the no-sample rule lives in debias.
        factor = jax.lax.rsqrt(
            _numerics.debias(jnp.ones_like(step.total_weight), step.total_weight)
        )

        def scale(update: jax.Array) -> jax.Array:
            dtype = _numerics.compute_dtype(update.dtype)
            wide = _numerics.widen(update, dtype)
            wide = wide * factor.astype(wide.dtype)
            return _numerics.saturating_cast(wide, update.dtype)

        return jax.tree.map(scale, updates), BiasCorrectionState(
            count=step.count, total_weight=step.total_weight
        )

    return _state.transformation(init_fn, update_fn)
