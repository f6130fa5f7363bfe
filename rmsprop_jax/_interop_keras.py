"""``keras.optimizers.RMSprop`` (Keras 3) state to and from that of :func:`presets.keras`.

Keras and the preset both put the learning rate inside the momentum buffer; Keras's
buffer is subtracted from the variable, the preset's trace is added to the parameter,
so one is the negative of the other. ``velocities`` and ``average_gradients`` are the
preset's ``nu`` and ``mu``; ``iterations`` its count. Keras keys its slots by variable
(``optimizer._get_variable_index``). Keras is imported inside the functions only, and
any backend works: values pass through NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

from rmsprop_jax import _interop_state as st
from rmsprop_jax import presets
from rmsprop_jax._interop_torch import Convert

# Options of Keras's base optimizer that change the update; the preset has none of them.
_UNSUPPORTED = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "gradient_accumulation_steps",
    "loss_scale_factor",
)


def _keras(caller: str) -> Any:
    try:
        import keras
    except ImportError as error:  # pragma: no cover - keras is in the test extra
        raise ImportError(f"`{caller}` needs Keras 3 (`pip install keras`).") from error
    return keras


def _numpy(keras: Any, x: Any) -> np.ndarray:
    """A Keras variable's (or tensor's) value as a NumPy array, on any backend."""
    return np.asarray(keras.ops.convert_to_numpy(getattr(x, "value", x)))


def _hyperparameters(keras: Any, caller: str, optimizer: Any) -> dict[str, Any]:
    if not isinstance(optimizer, keras.optimizers.RMSprop):
        kind = type(optimizer)
        raise TypeError(
            f"`{caller}`: `optimizer` must be a keras.optimizers.RMSprop, got "
            f"{kind.__module__}.{kind.__qualname__}."
        )
    for name in _UNSUPPORTED:
        value = getattr(optimizer, name, None)
        if value not in (None, False, 0, 0.0):
            raise ValueError(
                f"`{caller}`: the optimizer sets `{name}={value!r}`, which presets.keras does "
                "not reproduce, so the run could not continue exactly."
            )
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError(
            f"`{caller}`: the optimizer's learning rate is a schedule "
            f"({type(optimizer._learning_rate).__name__}); the transformation would use one "
            "constant rate and the runs would part at the next step. Assign the rate to "
            "continue with (optimizer.learning_rate = value) before converting."
        )
    return {
        "learning_rate": float(_numpy(keras, optimizer.learning_rate)),
        "rho": float(optimizer.rho),
        "momentum": float(optimizer.momentum),
        "epsilon": float(optimizer.epsilon),
        "centered": bool(optimizer.centered),
    }


def _described(kwargs: dict[str, Any]) -> str:
    return "presets.keras(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def _slots(
    keras: Any, caller: str, optimizer: Any, leaves: st.Leaves, keras_variables: Any
) -> list[int]:
    """The index of each leaf's variable among the optimizer's slots."""
    variables = st.match_structure(leaves, keras_variables, "keras_variables")
    indices = []
    seen: dict[int, str] = {}
    for path, variable in zip(leaves.paths, variables):
        if not isinstance(variable, keras.Variable):
            raise TypeError(
                f"`keras_variables` leaf {path} must be a keras.Variable, got "
                f"{type(variable).__name__}."
            )
        try:
            index = optimizer._get_variable_index(variable)
        except KeyError:
            raise ValueError(
                f"`keras_variables` leaf {path} ({variable.path}, shape {variable.shape}) is "
                "not a variable that `optimizer` was built for."
            ) from None
        if index in seen:
            raise ValueError(
                f"`keras_variables` leaves {seen[index]} and {path} are the same Keras "
                f"variable ({variable.path})."
            )
        seen[index] = path
        indices.append(index)
    tracked = len(optimizer._velocities)
    if len(set(indices)) != tracked:
        raise ValueError(
            f"`optimizer` tracks {tracked} variables and `keras_variables` names "
            f"{len(set(indices))} of them: the JAX run would not update the others."
        )
    return indices


def _not_built(caller: str) -> ValueError:
    return ValueError(
        f"`{caller}`: `optimizer` has not been built, so it has no state: Keras creates its "
        "velocities at the first apply_gradients (or optimizer.build(variables))."
    )


def _slot_lists(optimizer: Any, hyper: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's per-variable slot lists that hold state, by statistic name.

    ``velocities`` always; ``average_gradients`` when centered; ``momentums`` with momentum.
    """
    slots = {"nu": optimizer._velocities}
    if hyper["centered"]:
        slots["mu"] = optimizer._average_gradients
    if hyper["momentum"] > 0:
        slots["trace"] = optimizer._momentums
    return slots


def from_keras(
    optimizer: Any, params: optax.Params, keras_variables: Any, convert: Convert | None
) -> tuple[optax.GradientTransformation, optax.OptState]:
    """See :func:`rmsprop_jax.interop.from_keras`."""
    keras = _keras("from_keras")
    hyper = _hyperparameters(keras, "from_keras", optimizer)
    if not optimizer.built:
        raise _not_built("from_keras")
    leaves = st.leaves_of(params)
    indices = _slots(keras, "from_keras", optimizer, leaves, keras_variables)
    slots = _slot_lists(optimizer, hyper)
    variables = st.match_structure(leaves, keras_variables, "keras_variables")
    statistics: dict[str, list[np.ndarray | None]] = {}
    for field, slot in slots.items():
        values: list[np.ndarray | None] = []
        for path, index, variable, leaf in zip(leaves.paths, indices, variables, leaves.values):
            array = _numpy(keras, slot[index])
            if field == "trace":
                array = -array  # Keras subtracts its buffer; the preset adds its trace
            out = array if convert is None else np.asarray(convert(array, variable, leaf))
            if out.shape != np.shape(leaf):
                raise ValueError(
                    f"`from_keras`: {field} of leaf {path} has shape {out.shape}, expected "
                    f"{np.shape(leaf)}."
                )
            values.append(out)
        statistics[field] = values
    count = int(_numpy(keras, optimizer.iterations))
    counters = [(count, st.total_weight(hyper["rho"], count))] * len(leaves.values)
    tx = presets.keras(**hyper)
    return tx, st.write(tx.init(params), leaves, statistics, counters)


def to_keras(
    opt_state: optax.OptState,
    optimizer: Any,
    params: optax.Params,
    keras_variables: Any,
    convert: Convert | None,
) -> None:
    """See :func:`rmsprop_jax.interop.to_keras`."""
    keras = _keras("to_keras")
    hyper = _hyperparameters(keras, "to_keras", optimizer)
    leaves = st.leaves_of(params)
    st.refuse_packed(opt_state, "to_keras")
    st.refuse_quantized(opt_state, "to_keras", "presets.keras")
    st.check_layout(opt_state, presets.keras(**hyper).init(params), _described(hyper))
    found = st.read(opt_state, leaves)
    variables = st.match_structure(leaves, keras_variables, "keras_variables")
    if not optimizer.built:
        optimizer.build(variables)
    indices = _slots(keras, "to_keras", optimizer, leaves, keras_variables)
    slots = _slot_lists(optimizer, hyper)
    writes = []
    for field, slot in slots.items():
        for path, index, variable, leaf, array in zip(
            leaves.paths, indices, variables, leaves.values, found.statistics[field]
        ):
            assert array is not None  # the layout was checked
            if field == "trace":
                array = -array
            out = array if convert is None else np.asarray(convert(array, variable, leaf))
            target = slot[index]
            if out.shape != tuple(target.shape):
                raise ValueError(
                    f"`to_keras`: {field} of leaf {path} has shape {out.shape}, the "
                    f"optimizer's slot {tuple(target.shape)}."
                )
            writes.append((target, out.astype(keras.backend.standardize_dtype(target.dtype))))
    for target, value in writes:  # written once every leaf converted
        target.assign(value)
    optimizer.iterations.assign(found.counts[0])
