r"""RMSProp exactly as other frameworks and papers define it.

Each function takes the argument names and defaults of the implementation it
mirrors and returns an ``optax.GradientTransformation`` whose updates, applied
with ``optax.apply_updates``, reproduce that implementation's parameter
trajectory step by step (the learning-rate schedule included: a schedule here is
a function of the number of steps already taken, 0 at the first step).

The differences that matter, for a unit gradient at the first step:

=============  ==========  ======  =============  ========  =====================
preset         eps         nu_0    lr enters      centered  first step / lr
=============  ==========  ======  =============  ========  =====================
pytorch        outside     0       after buffer   optional  9.99999900
keras          inside      0       inside buffer  optional  3.16227608
tf1            inside      1       inside buffer  optional  0.99999999995
sonnet2        inside      0       inside buffer  optional  3.16227766
graves2013     inside      0       inside buffer  yes       4.58349249
dqn2015        inside      0       (no momentum)  yes       4.17028828
lasagne        inside      0       (no momentum)  no        3.16226185
caffe          outside     0       (no momentum)  no        9.99999900
=============  ==========  ======  =============  ========  =====================

One deliberate difference from every framework: a centered variance that
rounding makes negative is clamped at zero here, where the frameworks return NaN
(see :func:`rmsprop_jax.scale_by_centered_rms`).
"""

from __future__ import annotations

import jax
import optax

from rmsprop_jax import _validation
from rmsprop_jax._alias import learning_rate_and_momentum, scaling_transform
from rmsprop_jax._complex import split_real_and_imaginary

__all__ = ["caffe", "dqn2015", "graves2013", "keras", "lasagne", "pytorch", "sonnet2", "tf1"]


def _chain(
    learning_rate: optax.ScalarOrSchedule,
    decay: float | jax.Array,
    eps: jax.typing.ArrayLike,
    *,
    centered: bool,
    eps_in_sqrt: bool,
    momentum: jax.typing.ArrayLike | None = None,
    learning_rate_in_momentum: bool = True,
    initial_scale: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Every preset's chain: the scaling (never bias-corrected), the rate and the buffer.

    Called inside :func:`_validation.named_as`, so errors name the preset's arguments.
    """
    return optax.chain(
        scaling_transform(
            centered, decay, eps, eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale
        ),
        *learning_rate_and_momentum(
            learning_rate,
            momentum,
            nesterov=False,
            learning_rate_in_momentum=learning_rate_in_momentum,
            momentum_dtype=None,
        ),
    )


def pytorch(
    lr: optax.ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.RMSprop`` (``torch/optim/rmsprop.py``, PyTorch 2.13.0).

    .. math::

        g &\leftarrow \pm g + \lambda\theta, \qquad
        \nu_t = \alpha\nu_{t-1} + (1-\alpha) g^2, \qquad
        \mu_t = \alpha\mu_{t-1} + (1-\alpha) g \ \text{(centered)}, \\
        d_t &= \sqrt{\nu_t - \mu_t^2} + \epsilon \ \text{(centered) or }
        \sqrt{\nu_t} + \epsilon, \qquad
        b_t = \beta b_{t-1} + g/d_t, \qquad \theta \leftarrow \theta - \eta\, b_t,

    with :math:`-g` when ``maximize`` (the weight decay :math:`\lambda\theta` is
    added after the negation, as in PyTorch) and :math:`b_t = g/d_t` when
    ``momentum`` is 0. The learning rate multiplies the buffer, not its input.
    Complex parameters are treated as PyTorch does (``torch.view_as_real``): the
    real and imaginary parts are separate values with separate statistics, not
    :math:`|g|^2`.

    First step for a unit gradient with the defaults:
    :math:`\eta / (\sqrt{0.01} + 10^{-8}) = 9.999999\,\eta`.

    Args:
      lr: learning rate :math:`\eta`, or a schedule of the step count.
      alpha: smoothing constant of the averages.
      eps: added to the root, outside it.
      weight_decay: coupled L2 penalty :math:`\lambda`.
      momentum: :math:`\beta`; 0 keeps no buffer.
      centered: divide by the estimated variance.
      maximize: ascend instead of descend.

    Returns:
      An ``optax.GradientTransformation``; it needs ``params`` in ``update`` when
      ``weight_decay`` is not zero.

    References:
      `torch.optim.RMSprop
      <https://docs.pytorch.org/docs/2.13/generated/torch.optim.RMSprop.html>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.pytorch(lr=0.01)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -0.1000
    """
    with _validation.named_as("presets.pytorch", decay="alpha", learning_rate="lr"):
        _validation.check_bool("maximize", maximize)
        _validation.check_scalar("weight_decay", weight_decay, _validation.NON_NEGATIVE)
        per_real_value = _chain(
            lr,
            alpha,
            eps,
            centered=centered,
            eps_in_sqrt=False,
            momentum=momentum,
            learning_rate_in_momentum=False,
        )
    return optax.chain(
        optax.scale(-1.0) if maximize else optax.identity(),
        (
            optax.identity()
            if _validation.is_python_zero(weight_decay)
            else optax.add_decayed_weights(weight_decay)
        ),
        split_real_and_imaginary(per_real_value),
    )


def keras(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``keras.optimizers.RMSprop`` (``keras/src/optimizers/rmsprop.py``, Keras 3.15).

    .. math::

        \nu_t &= \rho\nu_{t-1} + (1-\rho) g^2, \qquad
        \mu_t = \rho\mu_{t-1} + (1-\rho) g \ \text{(centered)}, \\
        s_t &= \eta\, g / \sqrt{\nu_t - \mu_t^2 + \epsilon} \ \text{(centered) or }
        \eta\, g / \sqrt{\nu_t + \epsilon}, \\
        m_t &= \beta m_{t-1} + s_t, \qquad \theta \leftarrow \theta - m_t,

    and :math:`\theta \leftarrow \theta - s_t` when ``momentum`` is 0. The
    learning rate is inside the momentum buffer.

    First step for a unit gradient with the defaults:
    :math:`\eta / \sqrt{0.1 + 10^{-7}} = 3.162276\,\eta`.

    Args:
      learning_rate: :math:`\eta`, or a schedule of the step count.
      rho: discount of the averages.
      momentum: :math:`\beta`; 0 keeps no buffer.
      epsilon: added inside the root.
      centered: divide by the estimated variance.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      `keras.optimizers.RMSprop <https://keras.io/api/optimizers/rmsprop/>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.keras(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -3.1623
    """
    with _validation.named_as("presets.keras", decay="rho", eps="epsilon"):
        return _chain(
            learning_rate, rho, epsilon, centered=centered, eps_in_sqrt=True, momentum=momentum
        )


def tf1(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""TF1's ``tf.compat.v1.train.RMSPropOptimizer`` (TensorFlow 1.15 to 2.x).

    As written in ``tensorflow/python/training/rmsprop.py`` and the ``ApplyRMSProp`` /
    ``ApplyCenteredRMSProp`` kernels in ``tensorflow/core/kernels/training_ops.cc``:

    .. math::

        \nu_0 &= 1, \qquad \nu_t = \nu_{t-1} + (g^2 - \nu_{t-1})(1 - \rho), \qquad
        \mu_t = \mu_{t-1} + (g - \mu_{t-1})(1-\rho) \ \text{(centered)}, \\
        m_t &= \beta m_{t-1} + \eta\, g / \sqrt{\nu_t - \mu_t^2 + \epsilon}
        \ \text{(centered) or } \beta m_{t-1} + \eta\, g / \sqrt{\nu_t + \epsilon},
        \qquad \theta \leftarrow \theta - m_t.

    The accumulator starts at **one**, so early steps are much smaller than in
    PyTorch or Keras. The learning rate is inside the momentum buffer.

    First step for a unit gradient with the defaults:
    :math:`\eta / \sqrt{1 + 10^{-10}} = 0.99999999995\,\eta`.

    Args:
      learning_rate: :math:`\eta`, or a schedule of the step count (required, as in TF1).
      decay: discount of the averages.
      momentum: :math:`\beta`; 0 keeps no buffer (the same arithmetic as TF1's
        zero-momentum buffer).
      epsilon: added inside the root.
      centered: divide by the estimated variance.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      `tf.compat.v1.train.RMSPropOptimizer
      <https://www.tensorflow.org/api_docs/python/tf/compat/v1/train/RMSPropOptimizer>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.tf1(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -1.0000
    """
    with _validation.named_as("presets.tf1", eps="epsilon"):
        return _chain(
            learning_rate,
            decay,
            epsilon,
            centered=centered,
            eps_in_sqrt=True,
            momentum=momentum,
            initial_scale=1.0,
        )


def sonnet2(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sonnet 2's ``snt.optimizers.RMSProp`` (``sonnet/src/optimizers/rmsprop.py``, Sonnet 2.0).

    The update of :func:`tf1` (Sonnet's ``rmsprop_update`` writes the same
    arithmetic in TensorFlow ops) with the accumulator starting at **zero**.

    First step for a unit gradient with the defaults:
    :math:`\eta / \sqrt{0.1 + 10^{-10}} = 3.1622777\,\eta`.

    Args:
      learning_rate: :math:`\eta`, or a schedule of the step count.
      decay: discount of the averages.
      momentum: :math:`\beta`; 0 keeps no buffer.
      epsilon: added inside the root.
      centered: divide by the estimated variance.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      `Sonnet 2 optimizers <https://sonnet.readthedocs.io/en/latest/api.html#rmsprop>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.sonnet2(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -3.1623
    """
    with _validation.named_as("presets.sonnet2", eps="epsilon"):
        return _chain(
            learning_rate, decay, epsilon, centered=centered, eps_in_sqrt=True, momentum=momentum
        )


def graves2013(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    decay: float = 0.95,
    momentum: float = 0.9,
    epsilon: float = 1e-4,
) -> optax.GradientTransformationExtraArgs:
    r"""Graves (2013), eqs. (38)-(41): centered RMSProp with momentum.

    In the paper's symbols (:math:`\aleph` = ``decay`` 0.95, :math:`\beth` =
    ``momentum`` 0.9, :math:`\gimel` = ``learning_rate`` :math:`10^{-4}`,
    :math:`\daleth` = ``epsilon`` :math:`10^{-4}`), for a loss gradient
    :math:`\varepsilon`:

    .. math::

        n &= \aleph n + (1-\aleph)\varepsilon^2, \qquad
        g = \aleph g + (1-\aleph)\varepsilon, \\
        \Delta &= \beth\Delta - \gimel\, \varepsilon / \sqrt{n - g^2 + \daleth},
        \qquad w = w + \Delta.

    First step for a unit gradient with the defaults:
    :math:`\gimel / \sqrt{0.05 - 0.05^2 + 10^{-4}} = 4.5834925\,\gimel`.

    Args:
      learning_rate: :math:`\gimel`, or a schedule of the step count.
      decay: :math:`\aleph`.
      momentum: :math:`\beth`.
      epsilon: :math:`\daleth`, inside the root.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013, section 4.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.graves2013(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -4.5835
    """
    with _validation.named_as("presets.graves2013", eps="epsilon"):
        return _chain(
            learning_rate, decay, epsilon, centered=True, eps_in_sqrt=True, momentum=momentum
        )


def dqn2015(
    learning_rate: optax.ScalarOrSchedule = 2.5e-4,
    decay: float = 0.95,
    epsilon: float = 0.01,
) -> optax.GradientTransformationExtraArgs:
    r"""The centered RMSProp of the Nature DQN agent (Mnih et al. 2015).

    Extended Data Table 1 of the paper ("gradient momentum" and "squared gradient
    momentum" 0.95, "min squared gradient" 0.01, learning rate 0.00025) and the
    agent's Lua code (``dqn/NeuralQLearner.lua``, the ``g``/``g2`` update):

    .. math::

        g &= \rho g + (1-\rho)\nabla, \qquad g_2 = \rho g_2 + (1-\rho)\nabla^2, \qquad
        w = w - \eta\,\nabla / \sqrt{g_2 - g^2 + \epsilon}.

    No momentum. First step for a unit gradient with the defaults:
    :math:`\eta / \sqrt{0.05 - 0.05^2 + 0.01} = 4.1702883\,\eta`.

    Args:
      learning_rate: :math:`\eta`, or a schedule of the step count.
      decay: :math:`\rho`.
      epsilon: inside the root.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Mnih et al., `Human-level control through deep reinforcement learning
      <https://www.nature.com/articles/nature14236>`_, Nature 518, 2015.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.dqn2015(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -4.1703
    """
    with _validation.named_as("presets.dqn2015", eps="epsilon"):
        return _chain(learning_rate, decay, epsilon, centered=True, eps_in_sqrt=True)


def lasagne(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    epsilon: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Lasagne's ``lasagne.updates.rmsprop`` (``lasagne/updates.py``, Lasagne 0.2).

    .. math::

        a_t = \rho a_{t-1} + (1-\rho) g^2, \qquad
        \theta \leftarrow \theta - \eta\, g / \sqrt{a_t + \epsilon}.

    First step for a unit gradient with the defaults:
    :math:`\eta / \sqrt{0.1 + 10^{-6}} = 3.1622618\,\eta`.

    Args:
      learning_rate: :math:`\eta`, or a schedule of the step count.
      rho: discount of the average.
      epsilon: inside the root.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      `lasagne.updates.rmsprop
      <https://lasagne.readthedocs.io/en/latest/modules/updates.html#lasagne.updates.rmsprop>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.lasagne()
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -3.1623
    """
    with _validation.named_as("presets.lasagne", decay="rho", eps="epsilon"):
        return _chain(learning_rate, rho, epsilon, centered=False, eps_in_sqrt=True)


def caffe(
    base_lr: optax.ScalarOrSchedule,
    rms_decay: float = 0.99,
    delta: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Caffe's ``RMSPropSolver`` (``src/caffe/solvers/rmsprop_solver.cpp``, Caffe 1.0).

    .. math::

        h_t = \rho h_{t-1} + (1-\rho) g^2, \qquad
        \theta \leftarrow \theta - \eta\, g / (\sqrt{h_t} + \delta),

    with :math:`\rho` = ``rms_decay`` and :math:`\delta` = ``delta`` outside the
    root. Caffe's learning-rate policies and weight decay are separate solver
    settings: chain ``optax.add_decayed_weights`` before, or pass a schedule.

    First step for a unit gradient with the defaults:
    :math:`\eta / (\sqrt{0.01} + 10^{-8}) = 9.999999\,\eta`.

    Args:
      base_lr: :math:`\eta`, or a schedule of the step count.
      rms_decay: discount of the average.
      delta: added to the root.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      `Caffe solvers <https://caffe.berkeleyvision.org/tutorial/solver.html>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.caffe(base_lr=1.0)
      >>> updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
      >>> print(f"{float(updates[0]):.4f}")
      -10.0000
    """
    with _validation.named_as(
        "presets.caffe", decay="rms_decay", eps="delta", learning_rate="base_lr"
    ):
        return _chain(base_lr, rms_decay, delta, centered=False, eps_in_sqrt=False)
