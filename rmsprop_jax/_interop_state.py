"""Reading and writing the statistics of an RMSProp state, one parameter leaf at a time.

The converters of :mod:`rmsprop_jax.interop` build a transformation, initialise its
state and then write the other side's statistics into it. The state is a tree of
NamedTuples (``optax.chain``, ``optax.multi_transform``, the complex split of
``presets.pytorch``); this module finds the nodes that hold statistics
(:class:`rmsprop_jax.ScaleByRmsState`, :class:`rmsprop_jax.ScaleByCenteredRmsState`,
``optax.TraceState``, and ``optax.ScaleByScheduleState`` for a schedule's count) and
reads or replaces their leaves, whatever surrounds them.

A statistic is exchanged per parameter leaf as one NumPy array shaped like the
parameter: complex for a complex parameter whose statistic the state keeps as real and
imaginary parts (PyTorch's ``view_as_real``), and ``None`` where the leaf belongs to
another group of an ``optax.multi_transform`` (an ``optax.MaskedNode`` in the state).

Storage other than a plain dtype: a quantized statistic (a
:class:`rmsprop_jax.QuantizedArray`) is read by dequantizing it and written by quantizing
to the nearest code, given its :class:`rmsprop_jax.QuantizedFormat` (``formats``: the
codes do not record their map); the state of :func:`rmsprop_jax.pack_small_leaves`,
laid out by buffer rather than by parameter, is refused (:func:`refuse_packed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _numerics
from rmsprop_jax._centered import ScaleByCenteredRmsState
from rmsprop_jax._complex import _RealImaginary
from rmsprop_jax._packing import PackSmallLeavesState
from rmsprop_jax._quantized import QuantizedArray, QuantizedFormat, dequantize, quantize
from rmsprop_jax._rms import ScaleByRmsState

STATISTICS = ("nu", "mu", "trace")
# The argument of rmsprop_jax.rmsprop that sets each statistic's storage.
DTYPE_ARGUMENTS = {"nu": "nu_dtype", "mu": "mu_dtype", "trace": "momentum_dtype"}
Formats = Mapping[str, QuantizedFormat]  # statistic -> the format of its quantized leaves
_SCALING = (ScaleByRmsState, ScaleByCenteredRmsState)
_NODES = (*_SCALING, optax.TraceState, optax.ScaleByScheduleState)


class Leaves(NamedTuple):
    """The parameter leaves of a conversion, flattened once."""

    paths: list[str]  # jax.tree_util.keystr of each leaf
    values: list[Any]  # the JAX parameter leaves
    treedef: Any  # the parameters' tree structure


def leaves_of(params: optax.Params) -> Leaves:
    """The leaves of ``params`` with their paths; a ``ValueError`` for a tree without any."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("`params` has no leaves: there is nothing to convert.")
    return Leaves(
        [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef
    )


def match_structure(leaves: Leaves, other: Any, name: str) -> list[Any]:
    """The leaves of ``other`` at the positions of the parameters' leaves.

    Raises:
      ValueError: ``other`` does not have the structure of ``params``.
    """
    try:
        return leaves.treedef.flatten_up_to(other)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must have the tree structure of `params`: {error}".rstrip(".") + "."
        ) from None


def total_weight(decay: float, count: int) -> float:
    r""":math:`1 - \rho^t`, the ``total_weight`` of a state after ``count`` constant decays."""
    return 1.0 - float(decay) ** count


def layout(state: Any) -> str:
    """A short description of a state's layout: its statistic nodes and what they hold."""
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _NODES))
    names = [type(node).__name__ for node in nodes if isinstance(node, _NODES)]
    return "(" + ", ".join(names) + ")" if names else "(no RMSProp statistics)"


def check_layout(state: Any, expected: Any, what: str) -> None:
    """Raises a ``ValueError`` unless ``state`` has the tree structure of ``expected``."""
    if jax.tree.structure(state) != jax.tree.structure(expected):
        raise ValueError(
            f"`opt_state` does not have the layout of {what}: it holds {layout(state)}, "
            f"{what} holds {layout(expected)}. Was it made with other hyperparameters "
            "(centered, momentum, a schedule, other parameter groups) or other parameters?"
        )


class StepCountError(ValueError):
    """The leaves of one transformation do not share one step count."""


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _is_packed(x: Any) -> bool:
    return isinstance(x, PackSmallLeavesState)


def refuse_packed(state: Any, caller: str, name: str = "opt_state") -> None:
    """Raises a ``ValueError`` if ``state`` is or holds a :func:`pack_small_leaves` state."""
    if any(_is_packed(x) for x in jax.tree.leaves(state, is_leaf=_is_packed)):
        raise ValueError(
            f"`{caller}`: `{name}` is (or holds) the state of rmsprop_jax.pack_small_leaves, "
            "whose statistics are laid out by buffer, not by parameter, so they cannot be "
            "matched to the other side's per-parameter state. Convert the state of the "
            "transformation without pack_small_leaves (for an elementwise transformation "
            "the packing changes only the state's layout, not the run)."
        )


def quantized_statistics(state: Any) -> list[tuple[str, str]]:
    """``(statistic, path)`` of each quantized leaf of ``state``, in tree order."""
    found = []
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_quantized)[0]
    for path, leaf in flat:
        if _is_quantized(leaf):
            names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
            field = next((n for n in reversed(names) if n in STATISTICS), "a statistic")
            found.append((field, jax.tree_util.keystr(path)))
    return found


def refuse_quantized(state: Any, caller: str, target: str) -> None:
    """Raises a ``ValueError`` if ``state`` holds quantized statistics, which ``target`` lacks.

    The message says how to dequantize them first (exact for what is stored).
    """
    found = quantized_statistics(state)
    if found:
        field, path = found[0]
        raise ValueError(
            f"`{caller}`: `opt_state` holds quantized statistics (rmsprop_jax.QuantizedArray; "
            f"the first is {field} at {path}); {target} keeps floating-point statistics, and "
            "a QuantizedArray does not record its code map. Dequantize them first (exact for "
            "what is stored): jax.tree.map(lambda x: rmsprop_jax.dequantize(x, code_map) if "
            "isinstance(x, rmsprop_jax.QuantizedArray) else x, opt_state, is_leaf=lambda x: "
            "isinstance(x, rmsprop_jax.QuantizedArray)), with the format's code_map."
        )


def formats_of(kwargs: Mapping[str, Any]) -> dict[str, QuantizedFormat]:
    """The quantized formats among the ``*_dtype`` arguments of ``rmsprop_jax.rmsprop``."""
    return {
        field: kwargs[argument]
        for field, argument in DTYPE_ARGUMENTS.items()
        if isinstance(kwargs.get(argument), QuantizedFormat)
    }


def check_formats(state: Any, formats: Formats, caller: str) -> None:
    """Raises a ``ValueError`` naming the argument if a quantized leaf has no format."""
    for field, path in quantized_statistics(state):
        if field not in formats:
            argument = DTYPE_ARGUMENTS.get(field, "`*_dtype`")
            raise ValueError(
                f"`{caller}`: `opt_state` holds a quantized {field} at {path} "
                "(rmsprop_jax.QuantizedArray); pass the `"
                f"{argument}=rmsprop_jax.quantized(...)` it was made with, whose code map "
                "reads it."
            )


# --- writing -------------------------------------------------------------------------------


def _placed(array: jax.Array, template: Any) -> jax.Array:
    sharding = getattr(template, "sharding", None)
    return array if sharding is None else jax.device_put(array, sharding)


def _quantized_leaf(
    value: np.ndarray, template: QuantizedArray, path: str, field: str, fmt: QuantizedFormat | None
) -> QuantizedArray:
    """``value`` quantized to the nearest code of ``fmt``, placed like ``template``."""
    assert fmt is not None, "a quantized template is made from a format"
    if not np.all(np.isfinite(value)):
        raise ValueError(
            f"{field} of leaf {path}: {int(np.sum(~np.isfinite(value)))} non-finite values, "
            "which a quantized statistic cannot store."
        )
    signed = jnp.issubdtype(template.codes.dtype, jnp.signedinteger)
    # One rounding, to nearest: the smallest error (stochastic rounding pays off over
    # many small increments, not in a single conversion).
    stored = quantize(jnp.asarray(value, jnp.float32), fmt, signed=signed, bits=None)
    return QuantizedArray(
        _placed(stored.codes, template.codes), _placed(stored.scales, template.scales)
    )


def _as_leaf(
    value: np.ndarray, template: Any, path: str, field: str, fmt: QuantizedFormat | None = None
) -> Any:
    """``value`` in the dtype, kind (real/complex split) and placement of ``template``."""
    if isinstance(template, QuantizedArray):
        return _quantized_leaf(value, template, path, field, fmt)
    if isinstance(template, _RealImaginary):
        if not np.iscomplexobj(value):
            raise ValueError(
                f"{field} of leaf {path}: the state keeps real and imaginary parts of a "
                f"complex parameter, got a real array of dtype {value.dtype}."
            )
        return _RealImaginary(
            _as_leaf(np.real(value), template.real, path, field),
            _as_leaf(np.imag(value), template.imaginary, path, field),
        )
    if np.iscomplexobj(value) and not jnp.iscomplexobj(template):
        raise ValueError(
            f"{field} of leaf {path}: got a complex array of dtype {value.dtype} for a real "
            f"statistic of dtype {template.dtype}."
        )
    return _placed(jnp.asarray(value, dtype=template.dtype), template)


def replace_statistic(
    tree: Any,
    leaves: Leaves,
    values: Sequence[np.ndarray | None] | None,
    field: str,
    fmt: QuantizedFormat | None = None,
) -> Any:
    """``tree`` (a statistic like the parameters) with ``values`` in place of its leaves."""
    templates = leaves.treedef.flatten_up_to(tree)
    out = []
    for i, template in enumerate(templates):
        if isinstance(template, optax.MaskedNode):
            out.append(template)
            continue
        value = None if values is None else values[i]
        if value is None:
            raise ValueError(f"no {field} was given for leaf {leaves.paths[i]}.")
        out.append(_as_leaf(value, template, leaves.paths[i], field, fmt))
    return leaves.treedef.unflatten(out)


def _node_counters(
    tree: Any, leaves: Leaves, counts: Sequence[tuple[int, float] | None]
) -> tuple[int, float]:
    """The ``(count, total_weight)`` shared by the leaves a node holds (not masked)."""
    templates = leaves.treedef.flatten_up_to(tree)
    held = [i for i, t in enumerate(templates) if not isinstance(t, optax.MaskedNode)]
    found: set[tuple[int, float]] = set()
    for i in held:
        counter = counts[i]
        if counter is not None:
            found.add(counter)
    if len(found) != 1:
        shown = ", ".join(f"{leaves.paths[i]}: {counts[i]}" for i in held)
        raise StepCountError(
            "the leaves of one transformation must share one step count, got " + shown + "."
        )
    return found.pop()


def write(
    state: Any,
    leaves: Leaves,
    statistics: Mapping[str, Sequence[np.ndarray | None]],
    counters: Sequence[tuple[int, float] | None],
    formats: Formats | None = None,
) -> Any:
    """``state`` with its statistics and counters replaced.

    Args:
      state: an initialised state (its leaves give dtypes and placement).
      leaves: the parameters.
      statistics: ``"nu"``, ``"mu"``, ``"trace"`` -> one array (or ``None`` where
        masked) per parameter leaf, already shaped like it.
      counters: per parameter leaf, ``(count, total_weight)``.
      formats: the format of each statistic whose leaves ``state`` stores quantized;
        the values are rounded to the nearest code.

    Returns:
      The new state; a schedule's count is set to the count of the leaves it serves.
    """
    count_dtype = jnp.int32
    weight_dtype = _numerics.counter_dtype()
    formats = formats or {}

    def replaced(tree: Any, field: str) -> Any:
        return replace_statistic(tree, leaves, statistics.get(field), field, formats.get(field))

    def node(x: Any) -> Any:
        if isinstance(x, _SCALING):
            count, weight = _node_counters(x.nu, leaves, counters)
            counts = dict(
                count=jnp.asarray(count, count_dtype),
                total_weight=jnp.asarray(weight, weight_dtype),
            )
            nu = replaced(x.nu, "nu")
            if isinstance(x, ScaleByCenteredRmsState):
                return ScaleByCenteredRmsState(**counts, mu=replaced(x.mu, "mu"), nu=nu)
            return ScaleByRmsState(**counts, nu=nu)
        if isinstance(x, optax.TraceState):
            return x._replace(trace=replaced(x.trace, "trace"))
        return x

    state = jax.tree.map(node, state, is_leaf=lambda x: isinstance(x, _NODES))
    # A schedule's count follows the scaling transform's count (one per chain).
    scaling_counts = {
        int(x.count)
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _SCALING))
        if isinstance(x, _SCALING)
    }

    def schedule(x: Any) -> Any:
        if isinstance(x, optax.ScaleByScheduleState):
            if len(scaling_counts) != 1:
                raise ValueError(
                    f"a learning-rate schedule needs one step count, got {sorted(scaling_counts)}."
                )
            return x._replace(count=jnp.asarray(next(iter(scaling_counts)), jnp.int32))
        return x

    return jax.tree.map(schedule, state, is_leaf=lambda x: isinstance(x, _NODES))


# --- reading -------------------------------------------------------------------------------


def _as_array(leaf: Any, path: str, field: str, fmt: QuantizedFormat | None) -> np.ndarray:
    if isinstance(leaf, QuantizedArray):
        if fmt is None:  # (the converters check this first, naming the argument)
            raise ValueError(f"{field} of leaf {path} is quantized; no format was given.")
        return np.asarray(dequantize(leaf, fmt.code_map))  # exact: float32 holds each value
    if isinstance(leaf, _RealImaginary):
        real, imaginary = np.asarray(leaf.real), np.asarray(leaf.imaginary)
        return real + 1j * imaginary.astype(real.dtype)
    return np.asarray(leaf)


class Read(NamedTuple):
    """The statistics and counts of a state, per parameter leaf."""

    statistics: dict[str, list[np.ndarray | None]]  # "nu", "mu", "trace"
    counts: list[int]  # the count of the scaling transform holding each leaf


def read(state: Any, leaves: Leaves, formats: Formats | None = None) -> Read:
    """The statistics of ``state`` per parameter leaf (see :func:`write`).

    A quantized leaf is dequantized with the code map of its statistic's format in
    ``formats`` (``float32``, exactly the values stored).

    Raises:
      ValueError: a leaf is held by no scaling transform or by several, or a statistic's
        shape is not its parameter's.
    """
    n = len(leaves.values)
    formats = formats or {}
    statistics: dict[str, list[np.ndarray | None]] = {k: [None] * n for k in STATISTICS}
    counts: list[int | None] = [None] * n
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _NODES))
    for x in nodes:
        if not isinstance(x, (*_SCALING, optax.TraceState)):
            continue
        if isinstance(x, optax.TraceState):
            fields, node_count = {"trace": x.trace}, None
        else:
            fields, node_count = {"nu": x.nu}, int(np.asarray(x.count))
            if isinstance(x, ScaleByCenteredRmsState):
                fields["mu"] = x.mu
        for field, tree in fields.items():
            for i, leaf in enumerate(leaves.treedef.flatten_up_to(tree)):
                if isinstance(leaf, optax.MaskedNode):
                    continue
                if statistics[field][i] is not None:
                    raise ValueError(f"leaf {leaves.paths[i]} has two {field} statistics.")
                array = _as_array(leaf, leaves.paths[i], field, formats.get(field))
                if array.shape != np.shape(leaves.values[i]):
                    raise ValueError(
                        f"{field} of leaf {leaves.paths[i]} has shape {array.shape}, "
                        f"the parameter {np.shape(leaves.values[i])}."
                    )
                statistics[field][i] = array
                if field == "nu":
                    counts[i] = node_count
    for i, count in enumerate(counts):
        if count is None:
            raise ValueError(f"`opt_state` holds no RMSProp statistics for leaf {leaves.paths[i]}.")
    return Read(statistics, cast(list[int], counts))
