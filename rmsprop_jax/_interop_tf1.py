"""TF1 ``RMSPropOptimizer`` slots to and from the state of :func:`rmsprop_jax.presets.tf1`.

TF1 (``tensorflow/python/training/rmsprop.py``) keeps three slots per variable: ``rms``
(the average of squared gradients, started at 1: the preset's ``initial_scale=1``),
``mg`` (the average of gradients, centered only) and ``momentum`` (the buffer, with the
learning rate inside, subtracted from the variable). The preset puts the rate inside its
trace too and adds the trace to the parameter, so the trace is ``-momentum``. TF1's
RMSProp keeps no step count: a learning-rate schedule reads the ``global_step`` that the
training loop keeps, given here as ``step``. TensorFlow is not needed: the slots are
NumPy arrays (``optimizer.get_slot(var, "rms").numpy()``, ``sess.run`` of the slot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import optax

from rmsprop_jax import _interop_state as st
from rmsprop_jax import presets

# TF1 slot -> the statistic of the preset's state.
SLOTS = {"rms": "nu", "mg": "mu", "momentum": "trace"}


def _needed(kwargs: dict[str, Any]) -> list[str]:
    needed = ["rms"]
    needed += ["mg"] if kwargs.get("centered", False) else []
    needed += ["momentum"] if kwargs.get("momentum", 0.0) != 0 else []
    return needed


def from_tf1(
    slots: Mapping[str, Any], params: optax.Params, step: int | None, kwargs: dict[str, Any]
) -> Any:
    """See :func:`rmsprop_jax.interop.from_tf1`."""
    tx = presets.tf1(**kwargs)  # (a TypeError names a wrong argument)
    leaves = st.leaves_of(params)
    if not isinstance(slots, Mapping):
        raise TypeError(
            f"`from_tf1`: `slots` must be a mapping of slot names to trees, got "
            f"{type(slots).__name__}."
        )
    unknown = sorted(set(slots) - set(SLOTS))
    if unknown:
        raise ValueError(
            f"`from_tf1`: `slots` has {unknown}, which are not slots of TF1's "
            f"RMSPropOptimizer; they are {list(SLOTS)}."
        )
    if step is None and callable(kwargs.get("learning_rate")):
        raise ValueError(
            "`from_tf1`: a learning-rate schedule needs `step` (TF1's global_step at the "
            "switch); TF1's RMSProp slots hold no step count."
        )
    statistics: dict[str, list[np.ndarray | None]] = {}
    for name in _needed(kwargs):
        if name not in slots:
            raise ValueError(
                f"`from_tf1`: `slots` has no {name!r}, which the settings need "
                f"(centered={kwargs.get('centered', False)}, "
                f"momentum={kwargs.get('momentum', 0.0)})."
            )
        values = st.match_structure(leaves, slots[name], f"slots[{name!r}]")
        arrays: list[np.ndarray | None] = []
        for path, value, leaf in zip(leaves.paths, values, leaves.values):
            array = np.asarray(value)
            if array.shape != np.shape(leaf):
                raise ValueError(
                    f"`from_tf1`: slot {name!r} of leaf {path} has shape {array.shape}, "
                    f"the parameter {np.shape(leaf)}."
                )
            arrays.append(-array if name == "momentum" else array)  # TF1 subtracts it
        statistics[SLOTS[name]] = arrays
    # Without a step, the weight of a long run (read only by the centered saturation
    # rule; see interop.from_optax).
    decay = float(kwargs.get("decay", 0.9))
    count = None if step is None else int(np.asarray(step))  # (a NumPy or JAX scalar too)
    counter = (0, 1.0) if count is None else (count, st.total_weight(decay, count))
    counters = [counter] * len(leaves.values)
    return st.write(tx.init(params), leaves, statistics, counters)


def to_tf1(opt_state: Any, params: optax.Params, kwargs: dict[str, Any]) -> dict[str, Any]:
    """See :func:`rmsprop_jax.interop.to_tf1`."""
    tx = presets.tf1(**kwargs)
    leaves = st.leaves_of(params)
    st.refuse_packed(opt_state, "to_tf1")
    st.refuse_quantized(opt_state, "to_tf1", "presets.tf1")
    described = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    st.check_layout(opt_state, tx.init(params), f"presets.tf1({described})")
    found = st.read(opt_state, leaves)
    out: dict[str, Any] = {}
    for name in ("rms", "mg", "momentum"):
        if name == "mg" and not kwargs.get("centered", False):
            continue
        values = found.statistics[SLOTS[name]]
        if name == "momentum" and values[0] is None:
            # momentum=0: TF1 keeps a buffer that it multiplies by 0 (never read).
            values = [np.zeros(np.shape(leaf), np.asarray(leaf).dtype) for leaf in leaves.values]
        elif name == "momentum":
            values = [-np.asarray(v) for v in values]
        out[name] = leaves.treedef.unflatten([np.asarray(v) for v in values])
    return out
