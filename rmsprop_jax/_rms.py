"""RMSProp's scaling by the root of a moving average of squared gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from rmsprop_jax import _numerics, _state, _validation
from rmsprop_jax._quantized import StateDType


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`; the same fields whatever the flags."""

    count: jax.Array
    """Shape ``()``, int32: updates applied so far."""
    total_weight: jax.Array
    r"""Shape ``()``, float32 (float64 with x64): the total weight of the averaged
    samples, :math:`1 - \prod_{i \le t} \rho_i` (0 at init), the bias correction's divisor."""
    nu: optax.Updates
    r"""Like the parameters, real, dtype per the dtype policy: the EMA of :math:`|g|^2`."""


def scale_by_rms(
    decay: optax.ScalarOrSchedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = True,
    initial_scale: jax.typing.ArrayLike = 0.0,
    bias_correction: bool = False,
    nu_dtype: StateDType | None = None,
) -> optax.GradientTransformation:
    r"""Divides each gradient by the root of a moving average of its square.

    With :math:`\rho_t` the ``decay`` of update :math:`t` and :math:`\epsilon`
    the ``eps``:

    .. math::

        \nu_0 &= \mathrm{initial\_scale}, \qquad
        \nu_t = \rho_t\, \nu_{t-1} + (1 - \rho_t)\, |g_t|^2, \\
        \hat\nu_t &= \begin{cases}
            \nu_t / (1 - \prod_{i \le t} \rho_i) & \text{if bias\_correction} \\
            \nu_t & \text{otherwise} \end{cases} \\
        u_t &= \frac{g_t}{\sqrt{\hat\nu_t + \epsilon}} \ \text{(eps\_in\_sqrt)}
        \qquad\text{or}\qquad u_t = \frac{g_t}{\sqrt{\hat\nu_t} + \epsilon}.

    The bias correction uses the running product of the decays actually applied,
    so it stays exact when ``decay`` is a schedule or is changed through
    ``optax.inject_hyperparams``; for a constant decay it is :math:`1 - \rho^t`.
    With ``initial_scale`` not zero the correction is the conventional one (the
    initial value's weight :math:`\prod_i \rho_i` is not subtracted), as in optax.

    Updates are returned without a learning rate or sign; chain
    ``optax.scale_by_learning_rate`` (or use :func:`rmsprop_jax.rmsprop`).
    Finite gradients give finite updates and state for every setting and magnitude,
    ``eps=0`` included (:ref:`finite-in-finite-out`); dtypes follow the
    :ref:`dtype-policy`.

    .. warning::
       Frameworks differ: PyTorch and Caffe put ``eps`` outside the root, Keras,
       TF1 and Lasagne inside; TF1 starts ``nu`` at 1. :mod:`rmsprop_jax.presets`
       sets these for you.

    Args:
      decay: :math:`\rho`, in [0, 1], or a schedule: a function of the number of
        updates already applied (0 at the first update) returning :math:`\rho_t`.
      eps: :math:`\epsilon \ge 0`.
      eps_in_sqrt: add ``eps`` inside the root (True) or to the root (False).
      initial_scale: :math:`\nu_0 \ge 0`.
      bias_correction: divide :math:`\nu_t` by :math:`1 - \prod_{i \le t} \rho_i`.
      nu_dtype: dtype of :math:`\nu`, or a :func:`rmsprop_jax.quantized` format;
        ``None`` applies the dtype policy.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ScaleByRmsState`.

    Raises:
      ValueError: a hyperparameter is out of range or not a scalar, or
        ``nu_dtype`` is not a floating dtype; at update time, when the updates do
        not have the structure and shapes of the state.

    References:
      Tieleman & Hinton, `Lecture 6.5 - rmsprop, COURSERA: Neural Networks
      for Machine Learning
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_,
      2012.

      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (bias correction).

    Example:
      With a unit gradient, ``decay=0.9`` and ``eps=0`` the first update is
      :math:`1/\sqrt{0.1} = 3.16227\ldots`:

      >>> import jax.numpy as jnp
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.scale_by_rms(decay=0.9, eps=0.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state)
      >>> print(f"{float(updates['w'][0]):.4f}")
      3.1623
    """
    naming = _validation.current_naming()
    _validation.check_scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction)
    nu_dtype = _validation.resolve_dtype("nu_dtype", nu_dtype)

    def init_fn(params: optax.Params) -> ScaleByRmsState:
        _validation.check_scaling_init(params, initial_scale, naming, "scale_by_rms")
        return ScaleByRmsState(
            **_state.initial_counters(),
            nu=_state.statistic(params, nu_dtype, real=True, fill=initial_scale),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByRmsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByRmsState]:
        del params
        _validation.check_updates_match(updates, state.nu, "nu")
        step = _state.advance(
            decay, state.count, state.total_weight, naming, [("eps", eps, _validation.NON_NEGATIVE)]
        )

        def leaf(
            salts: jax.Array, g: jax.Array, nu: _numerics.Stored
        ) -> tuple[jax.Array, _numerics.Stored]:
            dtype = _numerics.compute_dtype(g.dtype, nu.dtype)
            g_wide = _numerics.widen(g, dtype)
            how = _numerics.storage(nu, nu_dtype)
            new_nu = _numerics.ema(
                _numerics.load(nu, dtype, how), _numerics.abs_sq(g_wide), step.rho.astype(dtype)
            )
            stored_nu, new_nu = _numerics.store_and_reload(new_nu, how, step.count, salts[0])
            nu_hat = _numerics.debias(new_nu, step.total_weight) if bias_correction else new_nu
            update = _numerics.root_quotient(g_wide, nu_hat, eps, eps_in_sqrt)
            return _numerics.saturating_cast(update, g.dtype), stored_nu

        updates, nu = _numerics.map_unzip(leaf, 2, updates, state.nu)
        return updates, ScaleByRmsState(count=step.count, total_weight=step.total_weight, nu=nu)

    return _state.transformation(init_fn, update_fn)
