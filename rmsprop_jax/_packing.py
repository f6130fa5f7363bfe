r"""Small leaves packed into one flat buffer per dtype, so many leaves step as a few kernels."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsprop_jax import _opaque

_NOT_PACKED = -1


@jax.tree_util.register_static
class PackLayout(NamedTuple):
    """Which buffer each leaf of the parameter tree went to; fixed by ``init``.

    Registered as a static pytree node (no array children): it is part of the state's
    tree structure, so it is known while tracing, and two states made for different
    trees have different structures. Being a NamedTuple of plain integers, it also
    goes through ``flax.serialization`` as it is.
    """

    groups: tuple[int, ...]
    """Per leaf, in flattening order: the index of its buffer, or -1 if it is not packed."""
    buffers: int
    """The number of buffers."""


class PackedTree(NamedTuple):
    """The tree the inner transformation sees: the packed buffers and the other leaves."""

    buffers: tuple[jax.Array, ...]
    """One flat buffer per dtype and placement: the small leaves raveled, in tree order."""
    unpacked: tuple[jax.Array, ...]
    """The leaves left as they are (larger than ``max_leaf_size``, sharded, or not
    floating-point), in tree order."""


class PackSmallLeavesState(NamedTuple):
    """State of :func:`pack_small_leaves`."""

    inner_state: optax.OptState
    """The inner transformation's state, for a :class:`PackedTree` of the parameters."""
    layout: PackLayout
    """Which leaves were packed into which buffer (static: no arrays)."""


def _placement(leaf: Any) -> Hashable | None:
    """Where a leaf lives, as a key that leaves sharing a buffer must share; None: sharded.

    A leaf whose sharding splits it over devices is never packed, so packing never moves
    a shard. A traced leaf (``init`` under ``jit``) shows its sharding only in JAX's
    explicit-sharding mode; otherwise it counts as unsharded.
    """
    if isinstance(leaf, jax.core.Tracer):
        spec = getattr(jax.typeof(leaf).sharding, "spec", None)
        if spec is not None and any(axis is not None for axis in spec):
            return None
        return "traced"
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return "host"
    if not sharding.is_fully_replicated:
        return None
    return tuple(sorted(device.id for device in sharding.device_set)), sharding.memory_kind


def _layout(leaves: Sequence[Any], max_leaf_size: int) -> PackLayout:
    """The layout of a tree: small floating-point leaves grouped by dtype and placement."""
    keys: dict[Hashable, int] = {}
    groups = []
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        placement = _placement(leaf)
        if (
            np.size(leaf) > max_leaf_size
            or placement is None
            or not jnp.issubdtype(dtype, jnp.inexact)
        ):
            groups.append(_NOT_PACKED)
        else:
            groups.append(keys.setdefault((jnp.dtype(dtype), placement), len(keys)))
    return PackLayout(tuple(groups), len(keys))


def _pack(leaves: Sequence[Any], layout: PackLayout, name: str) -> PackedTree:
    """``leaves`` as a :class:`PackedTree`: one concatenation per buffer."""
    members: list[list[jax.Array]] = [[] for _ in range(layout.buffers)]
    unpacked = []
    for leaf, group in zip(leaves, layout.groups, strict=True):
        if group == _NOT_PACKED:
            unpacked.append(leaf)
        else:
            members[group].append(jnp.asarray(leaf).reshape(-1))
    buffers = []
    for index, parts in enumerate(members):
        dtypes = sorted({str(part.dtype) for part in parts})
        if len(dtypes) > 1:
            raise ValueError(
                f"pack_small_leaves: the `{name}` packed into buffer {index} must share one "
                f"dtype (their parameters do), got {', '.join(dtypes)}."
            )
        buffers.append(lax.concatenate(parts, 0) if len(parts) > 1 else parts[0])
    return PackedTree(tuple(buffers), tuple(unpacked))


def _unpack(packed: PackedTree, layout: PackLayout, like: Sequence[Any]) -> list[jax.Array]:
    """The leaves of a :class:`PackedTree`, shaped like ``like``; the inverse of :func:`_pack`.

    Each packed leaf is a ``lax.dynamic_slice`` of its buffer at an offset given by
    :func:`_opaque.runtime_values`, so leaves of one shape share one compiled kernel.
    """
    ends = [0] * layout.buffers
    starts = []
    for leaf, group in zip(like, layout.groups, strict=True):
        if group != _NOT_PACKED:
            starts.append(ends[group])
            ends[group] += int(np.size(leaf))
    for index, (buffer, end) in enumerate(zip(packed.buffers, ends, strict=True)):
        if buffer.shape != (end,):
            raise ValueError(
                f"pack_small_leaves: buffer {index} of the inner updates has shape "
                f"{buffer.shape}, the packed leaves need ({end},)."
            )
    if max(ends, default=0) >= np.iinfo(np.int32).max:
        raise ValueError(
            "pack_small_leaves: a buffer of 2**31 or more elements; lower `max_leaf_size`."
        )
    offsets = iter(_opaque.runtime_values([np.int32(start) for start in starts]))
    unpacked = iter(packed.unpacked)
    out = []
    for leaf, group in zip(like, layout.groups, strict=True):
        if group == _NOT_PACKED:
            out.append(next(unpacked))
        else:
            size, shape = int(np.size(leaf)), np.shape(leaf)
            out.append(
                lax.dynamic_slice(packed.buffers[group], (next(offsets),), (size,)).reshape(shape)
            )
    return out


def _leaves_of(tree: Any, treedef: Any, name: str) -> list[Any]:
    """The leaves of ``tree`` flattened like the updates, or an error naming ``name``."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"pack_small_leaves: `{name}` must have the structure of the updates: {error}"
        ) from None


def _check_count(leaves: Sequence[Any], layout: PackLayout, name: str) -> None:
    """An error naming ``name`` unless there is one leaf per entry of the layout."""
    if len(leaves) != len(layout.groups):
        raise ValueError(
            f"pack_small_leaves: `{name}` has {len(leaves)} leaves, the state was made "
            f"for a tree of {len(layout.groups)}."
        )


def pack_small_leaves(
    inner: optax.GradientTransformation, *, max_leaf_size: int = 1024
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` on small leaves packed into one flat buffer per dtype.

    With :math:`P` the packing of a tree (each floating-point leaf of at most
    ``max_leaf_size`` elements raveled into the buffer of its dtype and placement, in
    tree order; every other leaf passed as it is) and :math:`P^{-1}` its inverse:

    .. math::

        (v_t, s_t) = \mathrm{inner.update}\big(P(g_t),\ s_{t-1},\ P(\theta_{t-1})\big),
        \qquad u_t = P^{-1}(v_t).

    For an elementwise ``inner`` (every transform of this library, and most of optax)
    the updates are the same as ``inner``'s on the tree itself: only the layout of the
    state changes. A tree of thousands of small leaves then steps as a few kernels
    instead of one per leaf, and its state is a few buffers. Unlike ``optax.flatten``:
    large leaves stay as they are (no copy of the big matrices each step); each dtype
    gets its own buffer (no promotion of ``bfloat16`` leaves to ``float32``); a leaf
    sharded over several devices is never packed, and leaves on different devices are
    never packed together, so packing adds no communication.

    .. warning::
       The state is laid out by buffer, not by parameter: a checkpoint of it restores
       only into ``pack_small_leaves`` with the same ``max_leaf_size`` on the same tree,
       and ``optax.tree.get(state, "nu")`` returns a :class:`PackedTree`. With
       stochastically rounded ``bfloat16`` state, the random bits follow the packed
       layout, so the trajectory differs from the unpacked one by rounding noise.
       Wrappers that need the parameters' tree structure (``optax.masked``,
       ``optax.multi_transform``) go outside ``pack_small_leaves``, not inside.

    Args:
      inner: the transformation to run on the packed tree.
      max_leaf_size: the largest number of elements of a packed leaf. Packing copies
        the gradients into the buffers and the updates out of them, which pays while a
        leaf is small enough for the work of one kernel per leaf to dominate; on 2 CPU
        cores a plain step on equal leaves packed took 0.85-0.95x the unpacked time up
        to 2,048 elements, 1.06x at 4,096 and 2.9x at 16,384 (``benchmarks/packing.py``),
        hence the default.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments reach ``inner``)
      whose state is :class:`PackSmallLeavesState`.

    Raises:
      TypeError: ``max_leaf_size`` is not an integer.
      ValueError: ``max_leaf_size`` is negative; or, at update, the updates or
        parameters do not have the tree structure the state was made for.

    References:
      NVIDIA Apex, ``multi_tensor_apply`` (`apex/multi_tensor_apply
      <https://github.com/NVIDIA/apex/tree/master/apex/multi_tensor_apply>`_), and
      PyTorch's ``foreach`` optimizer implementations (`torch.optim
      <https://pytorch.org/docs/stable/optim.html#algorithms>`_), which batch many
      small tensors into one kernel launch; ``optax.flatten``
      (`optax docs <https://optax.readthedocs.io/en/latest/api/combining_optimizers.html>`_),
      which packs every leaf into one vector.

    Example:
      >>> import jax.numpy as jnp
      >>> import rmsprop_jax
      >>> tx = rmsprop_jax.pack_small_leaves(rmsprop_jax.rmsprop(0.1), max_leaf_size=4)
      >>> params = {"b": jnp.zeros(3), "s": jnp.zeros(()), "w": jnp.zeros((4, 4))}
      >>> state = tx.init(params)
      >>> [x.shape for x in state.inner_state[0].nu.buffers]  # b and s in one buffer
      [(4,)]
      >>> grads = {"b": jnp.ones(3), "s": jnp.ones(()), "w": jnp.ones((4, 4))}
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["s"], updates["w"].shape
      (Array(-0.3162277, dtype=float32), (4, 4))
    """
    if isinstance(max_leaf_size, bool) or not isinstance(max_leaf_size, (int, np.integer)):
        raise TypeError(f"`max_leaf_size` must be an integer, got {max_leaf_size!r}.")
    if max_leaf_size < 0:
        raise ValueError(f"`max_leaf_size` must be >= 0, got {max_leaf_size}.")
    max_leaf_size = int(max_leaf_size)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> PackSmallLeavesState:
        leaves = jax.tree.leaves(params)
        layout = _layout(leaves, max_leaf_size)
        return PackSmallLeavesState(inner.init(_pack(leaves, layout, "params")), layout)

    def update_fn(
        updates: optax.Updates,
        state: PackSmallLeavesState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PackSmallLeavesState]:
        layout = state.layout
        leaves, treedef = jax.tree.flatten(updates)
        _check_count(leaves, layout, "updates")
        packed_params = None
        if params is not None:
            packed_params = _pack(_leaves_of(params, treedef, "params"), layout, "params")
        packed, inner_state = inner.update(
            _pack(leaves, layout, "updates"), state.inner_state, packed_params, **extra_args
        )
        if not isinstance(packed, PackedTree):
            raise TypeError(
                "pack_small_leaves: the inner transformation must return updates with the "
                f"structure it was given (a PackedTree), got {type(packed).__name__}."
            )
        new_leaves = _unpack(packed, layout, leaves)
        return treedef.unflatten(new_leaves), PackSmallLeavesState(inner_state, layout)

    # The state type is this wrapper's own; see _state.transformation for the cast.
    return optax.GradientTransformationExtraArgs(
        init_fn, cast(optax.TransformUpdateExtraArgsFn, update_fn)
    )
