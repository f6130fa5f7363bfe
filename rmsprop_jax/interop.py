r"""Move a running RMSProp optimizer between PyTorch, Keras, optax and rmsprop_jax.

Each ``from_*`` function returns a transformation and its state such that continuing
with ``tx.update`` reproduces what the other optimizer's next steps would have done, to
float32 rounding; each ``to_*`` function writes a state back, so that the other
optimizer continues the JAX run. The statistics are copied, not re-estimated, which is
what keeps a resumed run from the spike that a fresh optimizer gives (its
:math:`\nu` starts at zero, so its first steps are about :math:`\eta/\sqrt{1-\rho}`
whatever the gradient).

=============  ==============================  ============================================
function       transformation                  state copied
=============  ==============================  ============================================
from_torch     :func:`presets.pytorch` (one    ``square_avg`` -> ``nu``, ``grad_avg`` ->
               per param group)                ``mu``, ``momentum_buffer`` -> ``trace``,
                                               ``step`` -> ``count``
from_keras     :func:`presets.keras`           ``velocities`` -> ``nu``,
                                               ``average_gradients`` -> ``mu``,
                                               ``-momentums`` -> ``trace``,
                                               ``iterations`` -> ``count``
from_optax     :func:`rmsprop_jax.rmsprop`     ``nu``, ``mu``, ``trace``, ``count``
from_tf1       :func:`presets.tf1`             ``rms`` -> ``nu``, ``mg`` -> ``mu``,
                                               ``-momentum`` -> ``trace``
=============  ==============================  ============================================

No conversion here needs the learning rate: each transformation puts it where the
framework does (after the momentum buffer for PyTorch, inside it for Keras, optax and
TF1).
The transformation's learning rate is the optimizer's current rate, a constant, so the
continued runs agree as long as the rate stays the same on both sides. PyTorch and
Keras are imported only inside these functions; ``import rmsprop_jax.interop`` does not
import them.

**Storage.** The frameworks keep their statistics in the parameters' dtype, as
:func:`presets.pytorch` and :func:`presets.keras` do. :func:`from_optax` and
:func:`to_optax` also take the storage arguments of :func:`rmsprop_jax.rmsprop`
(``nu_dtype``, ``mu_dtype``, ``momentum_dtype``: a narrower float or
:func:`rmsprop_jax.quantized`), which only ``rmsprop_jax.rmsprop`` receives: reading such
a state widens or dequantizes it to ``float32``, exactly what is stored; writing one
rounds each value to the nearest value the storage holds (one rounding, so the run
continues within that error, not exactly). :func:`to_torch` and :func:`to_keras` refuse
quantized statistics, since a :class:`rmsprop_jax.QuantizedArray` does not record its
code map: dequantize them first (the message says how). The state of
:func:`rmsprop_jax.pack_small_leaves`, laid out by buffer rather than by parameter, is
refused by every function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from rmsprop_jax import _interop_keras, _interop_optax, _interop_tf1, _interop_torch

__all__ = [
    "from_keras",
    "from_optax",
    "from_tf1",
    "from_torch",
    "to_keras",
    "to_optax",
    "to_tf1",
    "to_torch",
]

Convert = Callable[[np.ndarray, Any, Any], Any]


def from_torch(
    optimizer: Any,
    params: optax.Params,
    torch_params: Any,
    *,
    convert: Convert | None = None,
) -> tuple[optax.GradientTransformation, optax.OptState]:
    r"""The transformation and state that continue a ``torch.optim.RMSprop`` run.

    The transformation is :func:`rmsprop_jax.presets.pytorch` with the hyperparameters
    of the param group (``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum``,
    ``centered``, ``maximize``); several groups become an ``optax.multi_transform``
    whose labels are ``"group0"``, ``"group1"``, ... (the group's index), one per group
    that holds a leaf. It needs ``params`` in ``update`` when a group has weight decay.

    Args:
      optimizer: a ``torch.optim.RMSprop`` that has stepped at least once.
      params: the JAX parameters, a pytree.
      torch_params: a pytree of the structure of ``params`` whose leaves are the
        corresponding ``torch.nn.Parameter`` objects, every parameter of ``optimizer``
        exactly once.
      convert: ``convert(array, torch_param, jax_leaf)`` maps a state tensor (as a NumPy
        array in PyTorch's layout) to the JAX leaf's layout, the way the weight itself is
        mapped (a ``Linear`` weight transposed into a Flax kernel, for instance). Default:
        the identity.

    Returns:
      ``(tx, opt_state)``: ``tx.update(grads, opt_state, params)`` then takes the step
      that ``optimizer.step()`` would take on the same gradients. The statistics keep
      the parameters' dtype, as PyTorch's do.

    Raises:
      TypeError: ``optimizer`` is not a ``torch.optim.RMSprop``, or a leaf of
        ``torch_params`` is not a tensor.
      ValueError: naming the leaf: a parameter is not in ``optimizer`` (or one of
        ``optimizer`` is not in ``torch_params``, or one is there twice), has no state
        yet, has a state that other settings made, or a converted statistic does not
        have the leaf's shape or kind (complex for a complex parameter, real for a real
        one); the parameters of one group do not share one step count.

    References:
      `torch.optim.RMSprop
      <https://docs.pytorch.org/docs/2.13/generated/torch.optim.RMSprop.html>`_;
      the state is ``optimizer.state[param]``.

    Example:
      Two steps in PyTorch, the third in JAX:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import torch
      >>> from rmsprop_jax import interop
      >>> weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> optimizer = torch.optim.RMSprop([weight], lr=0.1, momentum=0.9)
      >>> for _ in range(2):
      ...     weight.grad = 2 * weight.detach()
      ...     optimizer.step()
      >>> params = {"w": jnp.asarray(weight.detach().numpy())}
      >>> tx, state = interop.from_torch(optimizer, params, {"w": weight})
      >>> updates, state = tx.update({"w": 2 * params["w"]}, state, params)
      >>> weight.grad = 2 * weight.detach()
      >>> optimizer.step()
      >>> ours = optax.apply_updates(params, updates)["w"]
      >>> bool(jnp.allclose(ours, weight.detach().numpy(), rtol=1e-6))
      True
    """
    return _interop_torch.from_torch(optimizer, params, torch_params, convert)


def to_torch(
    opt_state: optax.OptState,
    optimizer: Any,
    params: optax.Params,
    torch_params: Any,
    *,
    convert: Convert | None = None,
) -> None:
    """Writes a JAX state into a ``torch.optim.RMSprop``, so that it continues the JAX run.

    The inverse of :func:`from_torch`: ``opt_state`` must have the layout of the
    transformation that :func:`from_torch` returns for ``optimizer``
    (:func:`rmsprop_jax.presets.pytorch` with its hyperparameters, or the
    ``optax.multi_transform`` labelled ``"group{index}"``). The hyperparameters
    themselves are not stored in the state: the optimizer's are used.

    Args:
      opt_state: the state of the JAX run.
      optimizer: the ``torch.optim.RMSprop`` to continue with; its state for the
        parameters is replaced.
      params: the JAX parameters.
      torch_params: as in :func:`from_torch`.
      convert: ``convert(array, torch_param, jax_leaf)`` maps a statistic (NumPy, in the
        JAX leaf's layout) to the torch parameter's layout. Default: the identity.

    Raises:
      TypeError: as in :func:`from_torch`.
      ValueError: ``opt_state`` does not have the layout the optimizer's settings give
        (another ``centered``, ``momentum``, or other groups), or a statistic's shape is
        not its parameter's, naming the leaf; ``opt_state`` holds quantized statistics
        (dequantize them first, exactly: the message gives the line) or is a
        :func:`rmsprop_jax.pack_small_leaves` state (convert the state of the
        transformation without it). Nothing is written then.

    References:
      `torch.optim.RMSprop
      <https://docs.pytorch.org/docs/2.13/generated/torch.optim.RMSprop.html>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> import torch
      >>> from rmsprop_jax import interop, presets
      >>> tx = presets.pytorch(lr=0.1, centered=True)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> _, state = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(params))
      >>> weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
      >>> optimizer = torch.optim.RMSprop([weight], lr=0.1, centered=True)
      >>> interop.to_torch(state, optimizer, params, {"w": weight})
      >>> optimizer.state[weight]["square_avg"]
      tensor([0.0025, 0.0025])
    """
    _interop_torch.to_torch(opt_state, optimizer, params, torch_params, convert)


def from_keras(
    optimizer: Any,
    params: optax.Params,
    keras_variables: Any,
    *,
    convert: Convert | None = None,
) -> tuple[optax.GradientTransformation, optax.OptState]:
    """The transformation and state that continue a ``keras.optimizers.RMSprop`` run.

    The transformation is :func:`rmsprop_jax.presets.keras` with the optimizer's
    ``rho``, ``momentum``, ``epsilon``, ``centered`` and current ``learning_rate``.
    Keras 3 on any backend.

    Args:
      optimizer: a built ``keras.optimizers.RMSprop`` (one that has applied gradients or
        was built for the variables). Options that presets.keras does not reproduce
        (``weight_decay``, clipping, EMA, gradient accumulation, loss scaling) and a
        learning-rate schedule raise a ``ValueError``.
      params: the JAX parameters.
      keras_variables: a pytree of the structure of ``params`` whose leaves are the
        corresponding ``keras.Variable`` objects (``model.trainable_variables``
        arranged like ``params``), every variable of ``optimizer`` exactly once.
      convert: ``convert(array, variable, jax_leaf)`` maps a slot (NumPy, in Keras's
        layout) to the JAX leaf's layout. Default: the identity (Keras's ``Dense`` and
        ``Conv2D`` kernels already have Flax's layout).

    Returns:
      ``(tx, opt_state)``, continuing the optimizer's run; the statistics keep the
      parameters' dtype, as Keras's slots do.

    Raises:
      TypeError: ``optimizer`` is not a ``keras.optimizers.RMSprop``, or a leaf of
        ``keras_variables`` is not a ``keras.Variable``.
      ValueError: the optimizer is not built or has options the preset lacks; a variable
        is not one of the optimizer's (or one of the optimizer's is missing, or one is
        there twice); a slot's shape is not its leaf's, naming the leaf.

    References:
      `keras.optimizers.RMSprop <https://keras.io/api/optimizers/rmsprop/>`_.
    """
    return _interop_keras.from_keras(optimizer, params, keras_variables, convert)


def to_keras(
    opt_state: optax.OptState,
    optimizer: Any,
    params: optax.Params,
    keras_variables: Any,
    *,
    convert: Convert | None = None,
) -> None:
    """Writes a JAX state into a ``keras.optimizers.RMSprop``, so that it continues the run.

    The inverse of :func:`from_keras`. ``opt_state`` must have the layout of
    :func:`rmsprop_jax.presets.keras` with the optimizer's settings; an optimizer that
    is not built yet is built for the variables of ``keras_variables``.

    Args:
      opt_state: the state of the JAX run.
      optimizer: the ``keras.optimizers.RMSprop`` to continue with.
      params: the JAX parameters.
      keras_variables: as in :func:`from_keras`.
      convert: ``convert(array, variable, jax_leaf)`` maps a statistic (NumPy, in the
        JAX leaf's layout) to the variable's layout. Default: the identity.

    Raises:
      TypeError: as in :func:`from_keras`.
      ValueError: as in :func:`from_keras`; ``opt_state`` does not have the layout
        the optimizer's settings give, holds quantized statistics, or is a
        :func:`rmsprop_jax.pack_small_leaves` state (as in :func:`to_torch`). Nothing is
        written then.

    References:
      `keras.optimizers.RMSprop <https://keras.io/api/optimizers/rmsprop/>`_.
    """
    _interop_keras.to_keras(opt_state, optimizer, params, keras_variables, convert)


def from_optax(optax_state: optax.OptState, params: optax.Params, **rmsprop_kwargs: Any) -> Any:
    """The state of :func:`rmsprop_jax.rmsprop` that continues an ``optax.rmsprop`` run.

    ``rmsprop_jax.rmsprop(**rmsprop_kwargs)`` with this state continues what
    ``optax.rmsprop(**rmsprop_kwargs)`` would have done with ``optax_state``, for every
    argument the two share (``learning_rate``, ``decay``, ``eps``, ``initial_scale``,
    ``eps_in_sqrt``, ``centered``, ``momentum``, ``nesterov``, ``bias_correction``).

    ``nu_dtype``, ``mu_dtype`` and ``momentum_dtype`` may be added; they go to
    ``rmsprop_jax.rmsprop`` only. A statistic stored in a narrower dtype or
    :func:`rmsprop_jax.quantized` is then rounded to the nearest value it can hold
    (nearest code, not stochastically: one rounding has the smallest error), so the
    continued run is not exact: it differs by that rounding (at most :math:`2^{-8}` of
    each value in ``bfloat16``, :math:`2^{-4}` in the default quantized map; see
    :ref:`quantized-state`), which stays far below the jump of a fresh optimizer state.

    optax keeps a step count only with ``bias_correction`` or a learning-rate schedule,
    the two cases whose updates need one. Without either, the count restarts at 0 and
    ``total_weight`` is set to 1, the value of a long run, which only the saturation
    rule of the centered variance reads (see :doc:`numerics`).

    Args:
      optax_state: the state of ``optax.rmsprop(**rmsprop_kwargs)``.
      params: the parameters.
      **rmsprop_kwargs: the arguments of both optimizers, and the storage arguments of
        ``rmsprop_jax.rmsprop``.

    Returns:
      The state of ``rmsprop_jax.rmsprop(**rmsprop_kwargs)``.

    Raises:
      TypeError: an argument that is neither shared nor a storage argument, or no
        ``learning_rate``.
      ValueError: ``optax_state`` does not have the layout of
        ``optax.rmsprop(**rmsprop_kwargs)`` for ``params`` (naming the mismatched leaf
        when only a shape differs), or is a :func:`rmsprop_jax.pack_small_leaves` state;
        ``centered=True, bias_correction=True`` with a count of 0, where optax's first
        step differs (see :func:`rmsprop_jax.scale_by_centered_rms`); a non-finite value
        for a quantized statistic, naming the leaf.

    References:
      `optax.rmsprop
      <https://optax.readthedocs.io/en/latest/api/optimizers.html#optax.rmsprop>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import rmsprop_jax
      >>> from rmsprop_jax import interop
      >>> kwargs = dict(learning_rate=0.1, momentum=0.9, centered=True)
      >>> params, grads = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
      >>> theirs = optax.rmsprop(**kwargs)
      >>> _, optax_state = theirs.update(grads, theirs.init(params))
      >>> state = interop.from_optax(optax_state, params, **kwargs)
      >>> print(state[0].nu.round(4), state[0].mu.round(4))
      [0.025 0.025] [0.05 0.05]
    """
    return _interop_optax.from_optax(optax_state, params, rmsprop_kwargs)


def to_optax(opt_state: optax.OptState, params: optax.Params, **rmsprop_kwargs: Any) -> Any:
    """The state of ``optax.rmsprop`` that continues a :func:`rmsprop_jax.rmsprop` run.

    The inverse of :func:`from_optax`, for the same arguments. Statistics stored in a
    narrower dtype are widened to optax's, and quantized ones dequantized with the code
    map of their format (pass the ``nu_dtype``, ``mu_dtype`` or ``momentum_dtype`` the
    state was made with): exact for what is stored, so optax continues what
    ``rmsprop_jax.rmsprop`` with ``float32`` state would do from those values.

    Args:
      opt_state: the state of ``rmsprop_jax.rmsprop(**rmsprop_kwargs)``.
      params: the parameters.
      **rmsprop_kwargs: the arguments of both optimizers, and the storage arguments of
        ``rmsprop_jax.rmsprop``.

    Returns:
      The state of ``optax.rmsprop(**rmsprop_kwargs)``.

    Raises:
      TypeError: as in :func:`from_optax`.
      ValueError: ``opt_state`` does not have the layout of
        ``rmsprop_jax.rmsprop(**rmsprop_kwargs)``, a statistic's shape is not its
        parameter's, or the centered, bias-corrected state has a count of 0; a quantized
        statistic without its format among the arguments (naming the argument); a
        :func:`rmsprop_jax.pack_small_leaves` state.

    References:
      `optax.rmsprop
      <https://optax.readthedocs.io/en/latest/api/optimizers.html#optax.rmsprop>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsprop_jax
      >>> from rmsprop_jax import interop
      >>> tx = rmsprop_jax.rmsprop(learning_rate=0.1, centered=True)
      >>> params = jnp.array([1.0, -2.0])
      >>> _, state = tx.update(jnp.array([0.5, 0.5]), tx.init(params))
      >>> scaling, _, _ = interop.to_optax(state, params, learning_rate=0.1, centered=True)
      >>> print(type(scaling).__name__, scaling.mu.round(4))
      ScaleByRStdDevState [0.05 0.05]
    """
    return _interop_optax.to_optax(opt_state, params, rmsprop_kwargs)


def from_tf1(
    slots: Mapping[str, Any], params: optax.Params, *, step: int | None = None, **tf1_kwargs: Any
) -> Any:
    r"""The state of :func:`rmsprop_jax.presets.tf1` that continues a TF1 RMSProp run.

    ``presets.tf1(**tf1_kwargs)`` with this state continues what
    ``tf.compat.v1.train.RMSPropOptimizer(**tf1_kwargs)`` would do with ``slots``.
    TensorFlow is not needed: the slots are NumPy arrays, read from the optimizer with
    ``optimizer.get_slot(var, name)`` (or from a checkpoint, where they are named
    ``<var>/RMSProp``, ``<var>/RMSProp_1`` for ``momentum`` and ``<var>/RMSProp_2`` for
    ``mg``, in TF1's order of creation).

    .. warning::
       TF1 starts ``rms`` at **one**, not zero; the preset does too
       (``initial_scale=1``), so the slot is copied as it is. The ``momentum`` slot holds
       the learning rate (TF1 multiplies the rate in before adding to the buffer) and is
       subtracted from the variable; the preset adds its trace, so the trace is
       ``-momentum``, and the run continues exactly only while the rate stays the
       same on both sides.

    Args:
      slots: ``{"rms": tree, "momentum": tree, "mg": tree}``, each tree with the
        structure of ``params`` and NumPy arrays of its leaves' shapes; ``mg`` is needed
        when ``centered``, ``momentum`` when the momentum is not 0 (otherwise it is
        ignored: TF1 multiplies it by 0).
      params: the parameters.
      step: TF1's ``global_step`` at the switch: the count of the state, which a
        learning-rate schedule reads. Without it the count starts at 0 (a schedule is
        then refused), which the update does not otherwise read.
      **tf1_kwargs: the arguments of :func:`rmsprop_jax.presets.tf1` (those of TF1's
        ``RMSPropOptimizer``: ``learning_rate``, ``decay``, ``momentum``, ``epsilon``,
        ``centered``).

    Returns:
      The state of ``presets.tf1(**tf1_kwargs)``.

    Raises:
      TypeError: an argument that presets.tf1 does not have, or ``slots`` is not a
        mapping.
      ValueError: a slot the settings need is missing, a slot is not TF1's, a slot's
        tree does not have the structure of ``params`` or a shape differs (naming the
        leaf); a schedule without ``step``.

    References:
      `tf.compat.v1.train.RMSPropOptimizer
      <https://www.tensorflow.org/api_docs/python/tf/compat/v1/train/RMSPropOptimizer>`_.

    Example:
      One TF1 step (``rms`` from 1) written in NumPy, the next step in JAX:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from rmsprop_jax import interop, presets
      >>> g = np.array([0.5, -2.0], np.float32)
      >>> rms = 1.0 + (g * g - 1.0) * 0.1
      >>> mom = 0.01 * g / np.sqrt(rms + 1e-10)
      >>> params = {"w": jnp.array([1.0, 1.0]) - mom}
      >>> kwargs = dict(learning_rate=0.01, momentum=0.9)
      >>> state = interop.from_tf1({"rms": {"w": rms}, "momentum": {"w": mom}}, params, **kwargs)
      >>> print(state[0].nu["w"], state[2].trace["w"].round(5))
      [0.925 1.3  ] [-0.0052   0.01754]
    """
    return _interop_tf1.from_tf1(slots, params, step, tf1_kwargs)


def to_tf1(opt_state: optax.OptState, params: optax.Params, **tf1_kwargs: Any) -> dict[str, Any]:
    """The TF1 RMSProp slots that continue a :func:`rmsprop_jax.presets.tf1` run.

    The inverse of :func:`from_tf1`: assign each array to its slot
    (``optimizer.get_slot(var, name).assign(array)``) and ``global_step`` to the
    state's count.

    Args:
      opt_state: the state of ``presets.tf1(**tf1_kwargs)``.
      params: the parameters.
      **tf1_kwargs: the arguments of :func:`rmsprop_jax.presets.tf1`.

    Returns:
      ``{"rms": tree, "momentum": tree}``, and ``"mg"`` when ``centered``: NumPy arrays
      shaped like ``params``. With a momentum of 0 the preset keeps no buffer and
      ``momentum`` is zeros (TF1 multiplies it by 0).

    Raises:
      TypeError: an argument that presets.tf1 does not have.
      ValueError: ``opt_state`` does not have the layout of ``presets.tf1(**tf1_kwargs)``
        (another ``centered`` or ``momentum``, or other parameters), holds quantized
        statistics, or is a :func:`rmsprop_jax.pack_small_leaves` state.

    References:
      `tf.compat.v1.train.RMSPropOptimizer
      <https://www.tensorflow.org/api_docs/python/tf/compat/v1/train/RMSPropOptimizer>`_.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import interop, presets
      >>> tx = presets.tf1(learning_rate=0.01, centered=True)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> _, state = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(params))
      >>> slots = interop.to_tf1(state, params, learning_rate=0.01, centered=True)
      >>> print(slots["rms"]["w"].round(4), slots["mg"]["w"].round(4))
      [0.925 0.925] [0.05 0.05]
    """
    return _interop_tf1.to_tf1(opt_state, params, tf1_kwargs)
