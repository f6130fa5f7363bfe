"""States of ``optax.rmsprop`` to and from those of :func:`rmsprop_jax.rmsprop`.

The two build the same chain for the arguments they share: a scaling transform, the
learning rate (inside the momentum buffer in both), and an optional ``optax.trace``. The
statistics are the same numbers; only the containers differ. optax keeps a step count
in the scaling state only with ``bias_correction`` and in the learning rate's state only
for a schedule; this library keeps one in every scaling state.

rmsprop_jax.rmsprop may also store its statistics otherwise (``nu_dtype``, ``mu_dtype``,
``momentum_dtype``: a narrower float, or a quantized format); optax keeps them in the
parameters' dtype. Those arguments go to rmsprop_jax.rmsprop only: reading such a state
widens (or dequantizes) it, exactly; writing one rounds to the storage.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _interop_state as st
from rmsprop_jax._alias import rmsprop

# The arguments of optax.rmsprop, all of which rmsprop_jax.rmsprop has with the same meaning.
SHARED = (
    "learning_rate",
    "decay",
    "eps",
    "initial_scale",
    "eps_in_sqrt",
    "centered",
    "momentum",
    "nesterov",
    "bias_correction",
)
# The storage of rmsprop_jax.rmsprop's statistics (optax keeps its state in the parameters'
# dtype): passed to rmsprop_jax.rmsprop only.
STORAGE = tuple(st.DTYPE_ARGUMENTS.values())


def _check_kwargs(caller: str, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(SHARED) - set(STORAGE))
    if unknown:
        raise TypeError(
            f"`{caller}`: {', '.join(f'`{k}`' for k in unknown)} is not an argument that "
            f"optax.rmsprop and rmsprop_jax.rmsprop share; the shared ones are {list(SHARED)}, "
            f"and rmsprop_jax.rmsprop's state storage {list(STORAGE)} may be added."
        )
    if "learning_rate" not in kwargs:
        raise TypeError(f"`{caller}`: `learning_rate` is required (both optimizers need it).")


def _described(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))


def _check_first_step(caller: str, kwargs: dict[str, Any], count: int | None) -> None:
    """Optax's centered, bias-corrected first step differs; a state past it converts exactly."""
    if kwargs.get("centered", False) and kwargs.get("bias_correction", False) and count == 0:
        raise ValueError(
            f"`{caller}`: with centered=True and bias_correction=True the first step of "
            "optax.rmsprop differs from rmsprop_jax.rmsprop's (optax divides by sqrt(eps)); "
            "a state with count 0 cannot continue the same run on the other side. Convert "
            "after at least one step."
        )


def _optax_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in SHARED}


def _optax_template(kwargs: dict[str, Any], params: optax.Params) -> Any:
    # optax computes decay**count with an int count and float decay: standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return optax.rmsprop(**_optax_kwargs(kwargs)).init(params)


def _check_shapes(state: Any, template: Any, name: str) -> None:
    """Leaf by leaf, the shapes of ``state`` against those of ``template`` (same structure)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, leaf), expected in zip(flat, jax.tree.leaves(template)):
        if np.shape(leaf) != np.shape(expected):
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, "
                f"expected {np.shape(expected)} (the shape the parameters give)."
            )


def from_optax(optax_state: Any, params: optax.Params, kwargs: dict[str, Any]) -> Any:
    """See :func:`rmsprop_jax.interop.from_optax`."""
    _check_kwargs("from_optax", kwargs)
    leaves = st.leaves_of(params)
    st.refuse_packed(optax_state, "from_optax", "optax_state")
    template = _optax_template(kwargs, params)
    what = f"optax.rmsprop({_described(_optax_kwargs(kwargs))})"
    if jax.tree.structure(optax_state) != jax.tree.structure(template):
        raise ValueError(
            f"`optax_state` does not have the layout of {what}: it is "
            f"{jax.tree.structure(optax_state)}, expected {jax.tree.structure(template)}. "
            "Was it made with other arguments or other parameters?"
        )
    _check_shapes(optax_state, template, "optax_state")
    scaling, scale, trace = optax_state
    count = scaling.count if "count" in scaling._fields else None
    if count is None and isinstance(scale, optax.ScaleByScheduleState):
        count = scale.count
    count = None if count is None else int(np.asarray(count))
    _check_first_step("from_optax", kwargs, count)
    # Without bias correction or a schedule optax keeps no count, and the update needs
    # none: the count restarts at 0 with the weight of a long run (see the docstring).
    counters = (
        (0, 1.0) if count is None else (count, st.total_weight(kwargs.get("decay", 0.9), count))
    )
    statistics = {"nu": leaves.treedef.flatten_up_to(scaling.nu)}
    if "mu" in scaling._fields:
        statistics["mu"] = leaves.treedef.flatten_up_to(scaling.mu)
    if isinstance(trace, optax.TraceState):  # (unused by a zero momentum)
        statistics["trace"] = leaves.treedef.flatten_up_to(trace.trace)
    statistics = {k: [np.asarray(v) for v in vs] for k, vs in statistics.items()}
    ours = rmsprop(**kwargs).init(params)
    counts = [counters] * len(leaves.values)
    return st.write(ours, leaves, statistics, counts, st.formats_of(kwargs))


def to_optax(opt_state: Any, params: optax.Params, kwargs: dict[str, Any]) -> Any:
    """See :func:`rmsprop_jax.interop.to_optax`."""
    _check_kwargs("to_optax", kwargs)
    leaves = st.leaves_of(params)
    st.refuse_packed(opt_state, "to_optax")
    formats = st.formats_of(kwargs)
    st.check_formats(opt_state, formats, "to_optax")
    st.check_layout(
        opt_state, rmsprop(**kwargs).init(params), f"rmsprop_jax.rmsprop({_described(kwargs)})"
    )
    found = st.read(opt_state, leaves, formats)
    count = found.counts[0]
    _check_first_step("to_optax", kwargs, count)
    scaling, scale, trace = _optax_template(kwargs, params)
    scaling = scaling._replace(
        nu=st.replace_statistic(scaling.nu, leaves, found.statistics["nu"], "nu")
    )
    if "mu" in scaling._fields:
        scaling = scaling._replace(
            mu=st.replace_statistic(scaling.mu, leaves, found.statistics["mu"], "mu")
        )
    if "count" in scaling._fields:
        scaling = scaling._replace(count=jnp.asarray(count, jnp.int32))
    if isinstance(scale, optax.ScaleByScheduleState):
        scale = scale._replace(count=jnp.asarray(count, jnp.int32))
    if isinstance(trace, optax.TraceState) and found.statistics["trace"][0] is not None:
        # (optax keeps a buffer for momentum=0, this library none: it starts at zero,
        # which a zero momentum never reads.)
        trace = trace._replace(
            trace=st.replace_statistic(trace.trace, leaves, found.statistics["trace"], "trace")
        )
    return (scaling, scale, trace)
