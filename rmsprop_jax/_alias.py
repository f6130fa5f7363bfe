"""The ``rmsprop`` alias: a scaling transform, a learning rate and optional momentum."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _momentum, _numerics, _state, _validation
from rmsprop_jax._centered import scale_by_centered_rms
from rmsprop_jax._quantized import StateDType
from rmsprop_jax._rms import scale_by_rms


def _scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (a number, an array or a schedule).

    The arithmetic and state of ``optax.scale_by_learning_rate``; rewritten because
    optax multiplies by an *array* learning rate (as ``optax.inject_hyperparams``
    passes it) without a cast, which promotes 16-bit and complex updates. Here the
    product is taken in the widened dtype and cast back (saturating) to the
    update's dtype, per the dtype policy.
    """
    naming = _validation.current_naming()

    def scale(updates: optax.Updates, eta: jax.typing.ArrayLike) -> optax.Updates:
        _validation.check_at_run_time([("learning_rate", eta, _validation.NON_NEGATIVE)], naming)

        def leaf(update: jax.Array) -> jax.Array:
            wide = _numerics.widen(update, _numerics.compute_dtype(update.dtype))
            product = wide * (-jnp.asarray(eta).astype(wide.dtype))
            # The updates come from this package's transforms, which saturate them: within
            # range, so a learning rate of at most 1 keeps the product within range.
            in_range = _numerics.is_contraction(eta)
            return _numerics.saturating_cast(product, update.dtype, in_range=in_range)

        return jax.tree.map(leaf, updates)

    if callable(learning_rate):
        schedule = learning_rate

        def init_scheduled(params: optax.Params) -> optax.ScaleByScheduleState:
            del params
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

        def update_scheduled(
            updates: optax.Updates,
            state: optax.ScaleByScheduleState,
            params: optax.Params | None = None,
        ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
            del params
            eta = schedule(state.count)
            state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
            return scale(updates, eta), state

        return _state.transformation(init_scheduled, update_scheduled)

    constant = learning_rate

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        return scale(updates, constant), state

    return _state.transformation(init_fn, update_fn)


def scaling_transform(
    centered: bool,
    decay: optax.ScalarOrSchedule,
    eps: jax.typing.ArrayLike,
    *,
    eps_in_sqrt: bool,
    initial_scale: jax.typing.ArrayLike = 0.0,
    bias_correction: bool = False,
    nu_dtype: StateDType | None = None,
    mu_dtype: StateDType | None = None,
) -> optax.GradientTransformation:
    """The head of every RMSProp chain: the centered or the plain scaling transform.

    :func:`scale_by_centered_rms` if ``centered``, else :func:`scale_by_rms` (which has no
    ``mu_dtype``).
    """
    _validation.check_bool("centered", centered)
    factory = (
        functools.partial(scale_by_centered_rms, mu_dtype=mu_dtype) if centered else scale_by_rms
    )
    return factory(
        decay,
        eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        bias_correction=bias_correction,
        nu_dtype=nu_dtype,
    )


def learning_rate_and_momentum(
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike | None,
    *,
    nesterov: bool,
    learning_rate_in_momentum: bool,
    momentum_dtype: StateDType | None,
) -> list[optax.GradientTransformation]:
    """The tail of every RMSProp chain: ``-learning_rate`` and the momentum buffer.

    With ``learning_rate_in_momentum`` the buffer accumulates ``lr * v`` (optax,
    TF1, Keras, Graves); otherwise it accumulates ``v`` and the learning rate
    multiplies the buffer (PyTorch). The two differ once the learning rate changes
    over time. ``momentum=None`` or a Python ``0``/``0.0`` allocates no buffer
    (as the frameworks do); a momentum given as an array (e.g. by
    ``optax.inject_hyperparams``) always has one, so the state's layout never
    depends on a traced value. Errors use the naming in force
    (:func:`_validation.named_as`).
    """
    _validation.check_scalar(
        "learning_rate", learning_rate, _validation.NON_NEGATIVE, allow_schedule=True
    )
    _validation.check_bool("nesterov", nesterov)
    _validation.check_bool("learning_rate_in_momentum", learning_rate_in_momentum)
    scale = _scale_by_learning_rate(learning_rate)
    if momentum is None or _validation.is_python_zero(momentum):
        if nesterov:
            raise ValueError(
                f"{_validation.current_naming().prefix}`nesterov=True` needs a `momentum`, "
                f"got momentum={momentum!r}."
            )
        return [scale]
    buffer = _momentum.trace(momentum, nesterov=nesterov, trace_dtype=momentum_dtype)
    return [scale, buffer] if learning_rate_in_momentum else [buffer, scale]


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: optax.ScalarOrSchedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    centered: bool = False,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    eps_in_sqrt: bool = True,
    initial_scale: jax.typing.ArrayLike = 0.0,
    bias_correction: bool = False,
    learning_rate_in_momentum: bool = True,
    nu_dtype: StateDType | None = None,
    mu_dtype: StateDType | None = None,
    momentum_dtype: StateDType | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp with every common variant behind flags.

    The chain is :func:`scale_by_rms` (or :func:`scale_by_centered_rms` when
    ``centered``), then the learning rate :math:`\eta_t` and, when ``momentum``
    is given, a momentum buffer with :math:`\beta` = ``momentum``:

    .. math::

        v_t &= g_t / \sqrt{\hat\nu_t + \epsilon} \quad\text{(see the scaling transforms)}, \\
        m_t &= \beta\, m_{t-1} + \eta_t v_t, \qquad
        \Delta\theta_t = -m_t
        \quad\text{(learning\_rate\_in\_momentum, the default)}, \\
        m_t &= \beta\, m_{t-1} + v_t, \qquad
        \Delta\theta_t = -\eta_t m_t \quad\text{(otherwise, as in PyTorch)}.

    With ``nesterov`` the step uses :math:`v_t + \beta m_t` (times
    :math:`\eta_t` where it applies) in place of :math:`m_t`. Without momentum
    :math:`\Delta\theta_t = -\eta_t v_t`.

    For every configuration that ``optax.rmsprop`` has (the defaults here match
    its defaults and its learning-rate placement) the trajectories agree to
    float32 rounding, except where optax returns NaN (a negative centered
    variance) and at the first step of ``centered=True, bias_correction=True``,
    which optax scales by :math:`1/\sqrt{\epsilon}`; see
    :func:`scale_by_centered_rms`.

    Args:
      learning_rate: :math:`\eta \ge 0`, or an optax schedule of the step count.
      decay: :math:`\rho` in [0, 1], or a schedule (see :func:`scale_by_rms`).
      eps: :math:`\epsilon \ge 0`.
      centered: divide by the variance instead of the second moment.
      momentum: :math:`\beta` in [0, 1), or ``None`` for no momentum buffer.
      nesterov: Nesterov momentum (needs ``momentum``).
      eps_in_sqrt: ``eps`` inside the root (True) or added to it (False).
      initial_scale: initial value of :math:`\nu`, :math:`\ge 0`.
      bias_correction: divide the moments by :math:`1 - \prod_{i \le t} \rho_i`.
      learning_rate_in_momentum: where :math:`\eta_t` enters, as above.
      nu_dtype: dtype of :math:`\nu`; ``None`` applies the :ref:`dtype-policy`.
      mu_dtype: dtype of :math:`\mu` (centered only).
      momentum_dtype: dtype of the momentum buffer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``).

    Raises:
      ValueError: a hyperparameter is out of range, not a scalar, or of the
        wrong type; ``nesterov`` without ``momentum``; ``mu_dtype`` without
        ``centered``.

    References:
      Tieleman & Hinton, `Lecture 6.5 - rmsprop
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013.

    Example:
      Minimise :math:`\theta^2` for a few steps:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.rmsprop(learning_rate=0.1, momentum=0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(20):
      ...     grads = jax.grad(lambda p: jnp.sum(p**2))(params)
      ...     updates, state = tx.update(grads, state)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.all(jnp.abs(params) < 0.5))
      True
    """
    with _validation.named_as("rmsprop"):
        if not centered and mu_dtype is not None:
            raise ValueError(
                f"`rmsprop`: `mu_dtype` applies only with `centered=True`, got {mu_dtype!r}."
            )
        scaling = scaling_transform(
            centered,
            decay,
            eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            bias_correction=bias_correction,
            nu_dtype=nu_dtype,
            mu_dtype=mu_dtype,
        )
        tail = learning_rate_and_momentum(
            learning_rate,
            momentum,
            nesterov=nesterov,
            learning_rate_in_momentum=learning_rate_in_momentum,
            momentum_dtype=momentum_dtype,
        )
    return optax.chain(scaling, *tail)
