"""Centered RMSProp: scaling by the root of a moving estimate of the gradient's variance."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from rmsprop_jax import _numerics, _state, _validation
from rmsprop_jax._quantized import StateDType


class ScaleByCenteredRmsState(NamedTuple):
    """State of :func:`scale_by_centered_rms`; the same fields whatever the flags."""

    count: jax.Array
    """Shape ``()``, int32: updates applied so far."""
    total_weight: jax.Array
    r"""Shape ``()``, float32 (float64 with x64): the total weight of the averaged
    samples, :math:`1 - \prod_{i \le t} \rho_i` (0 at init), the bias correction's divisor."""
    mu: optax.Updates
    """Like the parameters (complex stays complex), dtype per the dtype policy: EMA of g."""
    nu: optax.Updates
    r"""Like the parameters, real, dtype per the dtype policy: the EMA of :math:`|g|^2`."""


def scale_by_centered_rms(
    decay: optax.ScalarOrSchedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = True,
    initial_scale: jax.typing.ArrayLike = 0.0,
    bias_correction: bool = False,
    mu_dtype: StateDType | None = None,
    nu_dtype: StateDType | None = None,
) -> optax.GradientTransformation:
    r"""Divides each gradient by the root of a moving estimate of its variance.

    With :math:`\rho_t` the ``decay`` of update :math:`t`, :math:`P_t =
    \prod_{i \le t} \rho_i` and :math:`\epsilon` the ``eps``:

    .. math::

        \mu_t &= \rho_t\, \mu_{t-1} + (1 - \rho_t)\, g_t, \qquad \mu_0 = 0, \\
        \nu_t &= \rho_t\, \nu_{t-1} + (1 - \rho_t)\, |g_t|^2, \qquad
        \nu_0 = \mathrm{initial\_scale}, \\
        (\hat\mu_t, \hat\nu_t) &= \begin{cases}
            (\mu_t, \nu_t) / (1 - P_t) & \text{if bias\_correction} \\
            (\mu_t, \nu_t) & \text{otherwise} \end{cases} \\
        \sigma^2_t &= \begin{cases}
            \hat\nu_t & \text{if the estimate holds one sample} \\
            \max(\hat\nu_t - |\hat\mu_t|^2,\ 0) & \text{otherwise} \end{cases} \\
        u_t &= \frac{g_t}{\sqrt{\sigma^2_t + \epsilon}} \ \text{(eps\_in\_sqrt)}
        \qquad\text{or}\qquad u_t = \frac{g_t}{\sqrt{\sigma^2_t} + \epsilon}.

    **The clamp.** In floating point :math:`\hat\nu_t - |\hat\mu_t|^2` comes out
    negative when gradients are nearly constant; the root of a negative number is
    NaN in PyTorch, Keras and optax. Here the variance is clamped at zero.

    **One sample.** The estimate holds a single gradient sample, so that
    :math:`\hat\nu_t - |\hat\mu_t|^2 = 0` whatever the gradient, when the newest
    gradient's weight is 1: at the first update with ``bias_correction`` (where
    optax divides by :math:`\sqrt{\epsilon}`, a factor :math:`10^4` for the default
    ``eps``), and at every update whose decay is 0. On those updates the
    uncentered second moment :math:`\hat\nu_t` takes the variance's place, which
    bounds the update by :math:`|u_t| \le 1` elementwise (for ``initial_scale=0``),
    as for :func:`scale_by_rms`. Without bias correction the zero
    initialisation of :math:`\mu` already gives a positive estimate,
    :math:`\rho_1(1 - \rho_1) g_1^2`, at the first update.

    Finite gradients give finite updates and state for every setting and magnitude,
    ``eps=0`` included (:ref:`finite-in-finite-out`); dtypes follow the
    :ref:`dtype-policy`.

    .. warning::
       With a constant gradient the variance is 0 and the update is
       :math:`g/\sqrt{\epsilon}`: the centered variant needs a larger ``eps`` than
       the plain one (Graves 2013 uses :math:`10^{-4}`, the DQN agent 0.01).

    Args:
      decay: :math:`\rho`, in [0, 1], or a schedule: a function of the number of
        updates already applied (0 at the first update) returning :math:`\rho_t`.
      eps: :math:`\epsilon \ge 0`.
      eps_in_sqrt: add ``eps`` inside the root (True) or to the root (False).
      initial_scale: :math:`\nu_0 \ge 0`.
      bias_correction: divide both moments by :math:`1 - P_t`.
      mu_dtype: dtype of :math:`\mu`, or a :func:`rmsprop_jax.quantized` format;
        ``None`` applies the dtype policy.
      nu_dtype: dtype of :math:`\nu`, or a :func:`rmsprop_jax.quantized` format;
        ``None`` applies the dtype policy.

    Returns:
      An ``optax.GradientTransformation`` whose state is
      :class:`ScaleByCenteredRmsState`.

    Raises:
      ValueError: a hyperparameter is out of range or not a scalar, or a dtype
        argument is not a floating dtype; at update time, when the updates do not
        have the structure and shapes of the state.

    References:
      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013, eqs. (38)-(41).

      Mnih et al., `Human-level control through deep reinforcement learning
      <https://www.nature.com/articles/nature14236>`_, Nature 518, 2015.

    Example:
      Gradients 1 then 3 with ``decay=0.5``, ``eps=0``: :math:`\mu_2 = 1.75`,
      :math:`\nu_2 = 4.75`, variance :math:`4.75 - 1.75^2 = 1.6875`, so the second
      update is :math:`3/\sqrt{1.6875} = 2.3094\ldots`:

      >>> import jax.numpy as jnp
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.scale_by_centered_rms(decay=0.5, eps=0.0)
      >>> state = tx.init(jnp.zeros(1))
      >>> _, state = tx.update(jnp.array([1.0]), state)
      >>> updates, state = tx.update(jnp.array([3.0]), state)
      >>> print(f"{float(updates[0]):.4f}")
      2.3094
    """
    naming = _validation.current_naming()
    _validation.check_scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction)
    mu_dtype = _validation.resolve_dtype("mu_dtype", mu_dtype)
    nu_dtype = _validation.resolve_dtype("nu_dtype", nu_dtype)

    def init_fn(params: optax.Params) -> ScaleByCenteredRmsState:
        _validation.check_scaling_init(params, initial_scale, naming, "scale_by_centered_rms")
        return ScaleByCenteredRmsState(
            **_state.initial_counters(),
            mu=_state.statistic(params, mu_dtype, real=False),
            nu=_state.statistic(params, nu_dtype, real=True, fill=initial_scale),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByCenteredRmsState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, ScaleByCenteredRmsState]:
        del params
        _validation.check_updates_match(updates, state.nu, "nu")
        step = _state.advance(
            decay, state.count, state.total_weight, naming, [("eps", eps, _validation.NON_NEGATIVE)]
        )
        one_sample = step.rho == 0
        if bias_correction:
            one_sample = one_sample | (step.previous_total_weight == 0)

        def leaf(
            salts: jax.Array, g: jax.Array, mu: _numerics.Stored, nu: _numerics.Stored
        ) -> tuple[jax.Array, _numerics.Stored, _numerics.Stored]:
            dtype = _numerics.compute_dtype(g.dtype, mu.dtype, nu.dtype)
            g_wide = _numerics.widen(g, dtype)
            rho = step.rho.astype(dtype)
            mu_how, nu_how = _numerics.storage(mu, mu_dtype), _numerics.storage(nu, nu_dtype)
            new_mu = _numerics.ema(_numerics.load(mu, dtype, mu_how), g_wide, rho)
            new_nu = _numerics.ema(_numerics.load(nu, dtype, nu_how), _numerics.abs_sq(g_wide), rho)
            stored_nu, new_nu = _numerics.store_and_reload(new_nu, nu_how, step.count, salts[0])
            # Where nu saturated, its true value, and so the variance, is unknown: this
            # step divides by nu (an upper bound of the variance), and mu is brought back
            # within the bound the averages keep, so later variances stay meaningful
            # (the saturation rule in _numerics).
            saturated = _numerics.is_saturated(stored_nu, new_nu)
            new_mu = _numerics.select(
                saturated,
                _numerics.bounded_mean(
                    new_mu, _numerics.saturation_value(stored_nu), step.total_weight
                ),
                new_mu,
            )
            stored_mu, new_mu = _numerics.store_and_reload(new_mu, mu_how, step.count, salts[1])
            mu_hat, nu_hat = new_mu, new_nu
            uncentered = one_sample | saturated
            if bias_correction:
                mu_hat = _numerics.debias(new_mu, step.total_weight)
                nu_hat = _numerics.debias(new_nu, step.total_weight)
            second_moment = _numerics.select(uncentered, nu_hat, _numerics.variance(nu_hat, mu_hat))
            update = _numerics.root_quotient(g_wide, second_moment, eps, eps_in_sqrt)
            return (
                _numerics.saturating_cast(update, g.dtype),
                stored_mu,
                stored_nu,
            )

        updates, mu, nu = _numerics.map_unzip(leaf, 3, updates, state.mu, state.nu)
        return updates, ScaleByCenteredRmsState(
            count=step.count, total_weight=step.total_weight, mu=mu, nu=nu
        )

    return _state.transformation(init_fn, update_fn)
