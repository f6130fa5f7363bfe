"""``torch.optim.RMSprop`` state to and from the state of :func:`rmsprop_jax.presets.pytorch`.

The preset puts the learning rate where PyTorch does (after the momentum buffer), so the
buffer, ``square_avg`` and ``grad_avg`` are the same numbers on both sides; only their
layout (``convert``) and container change. PyTorch keys its state by parameter and keeps
a step count per parameter; the preset keeps one count per param group.
PyTorch is imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optax

from rmsprop_jax import _interop_state as st
from rmsprop_jax import presets

Convert = Callable[[np.ndarray, Any, Any], Any]

# torch state key -> the statistic of the preset's state.
_KEYS = {"square_avg": "nu", "grad_avg": "mu", "momentum_buffer": "trace"}


def _torch(caller: str) -> Any:
    try:
        import torch
    except ImportError as error:  # pragma: no cover - torch is in the test extra
        raise ImportError(f"`{caller}` needs PyTorch (`pip install torch`).") from error
    return torch


class _Layout(NamedTuple):
    """Which param group each leaf's torch parameter is in, and the groups' hyperparameters."""

    torch_leaves: list[Any]
    group_of_leaf: list[int]
    hyperparameters: dict[int, dict[str, Any]]  # group index -> presets.pytorch kwargs


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": float(group["lr"]),
        "alpha": float(group["alpha"]),
        "eps": float(group["eps"]),
        "weight_decay": float(group["weight_decay"]),
        "momentum": float(group["momentum"]),
        "centered": bool(group["centered"]),
        "maximize": bool(group["maximize"]),
    }


def _layout(
    torch: Any, caller: str, optimizer: Any, leaves: st.Leaves, torch_params: Any
) -> _Layout:
    if not isinstance(optimizer, torch.optim.RMSprop):
        kind = type(optimizer)
        raise TypeError(
            f"`{caller}`: `optimizer` must be a torch.optim.RMSprop, got "
            f"{kind.__module__}.{kind.__qualname__}."
        )
    torch_leaves = st.match_structure(leaves, torch_params, "torch_params")
    where = {}
    for g, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            where[id(p)] = (g, j)
    seen: dict[int, str] = {}
    groups = []
    for path, p in zip(leaves.paths, torch_leaves):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"`torch_params` leaf {path} must be a torch parameter, got {type(p).__name__}."
            )
        if id(p) not in where:
            raise ValueError(
                f"`torch_params` leaf {path} (shape {tuple(p.shape)}) is not a parameter of "
                "`optimizer`: it is in none of its param groups."
            )
        if id(p) in seen:
            raise ValueError(
                f"`torch_params` leaves {seen[id(p)]} and {path} are the same torch parameter."
            )
        seen[id(p)] = path
        groups.append(where[id(p)][0])
    for p_id, (g, j) in where.items():
        if p_id not in seen:
            shape = tuple(optimizer.param_groups[g]["params"][j].shape)
            raise ValueError(
                f"`optimizer` param group {g} holds a parameter (index {j}, shape {shape}) "
                "that `torch_params` does not: the JAX run would not update it."
            )
    hyper = {g: _hyperparameters(optimizer.param_groups[g]) for g in sorted(set(groups))}
    return _Layout(torch_leaves, groups, hyper)


def _described(layout: _Layout) -> str:
    def one(kwargs: dict[str, Any]) -> str:
        return "presets.pytorch(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"

    if len(layout.hyperparameters) == 1:
        return one(next(iter(layout.hyperparameters.values())))
    return (
        "optax.multi_transform({"
        + ", ".join(f"'group{g}': {one(kw)}" for g, kw in layout.hyperparameters.items())
        + "})"
    )


def transformation(layout: _Layout, leaves: st.Leaves) -> optax.GradientTransformation:
    """The preset of the one group, or a ``multi_transform`` labelled ``group{index}``."""
    if len(layout.hyperparameters) == 1:
        return presets.pytorch(**next(iter(layout.hyperparameters.values())))
    return optax.multi_transform(
        {f"group{g}": presets.pytorch(**kw) for g, kw in layout.hyperparameters.items()},
        leaves.treedef.unflatten([f"group{g}" for g in layout.group_of_leaf]),
    )


def _converted(
    convert: Convert | None, array: np.ndarray, p: Any, leaf: Any, shape: tuple, what: str
) -> np.ndarray:
    out = array if convert is None else np.asarray(convert(array, p, leaf))
    if out.shape != shape:
        hint = "" if convert is not None else "; pass `convert` to map it as the weight is mapped"
        raise ValueError(f"{what} has shape {out.shape}, expected {shape}{hint}.")
    return out


def from_torch(
    optimizer: Any, params: optax.Params, torch_params: Any, convert: Convert | None
) -> tuple[optax.GradientTransformation, optax.OptState]:
    """See :func:`rmsprop_jax.interop.from_torch`."""
    torch = _torch("from_torch")
    leaves = st.leaves_of(params)
    layout = _layout(torch, "from_torch", optimizer, leaves, torch_params)
    n = len(leaves.values)
    statistics: dict[str, list[np.ndarray | None]] = {k: [None] * n for k in st.STATISTICS}
    counters: list[tuple[int, float] | None] = []
    for i, (path, p, leaf) in enumerate(zip(leaves.paths, layout.torch_leaves, leaves.values)):
        hyper = layout.hyperparameters[layout.group_of_leaf[i]]
        state = optimizer.state.get(p, {})
        if "square_avg" not in state:
            raise ValueError(
                f"`from_torch`: leaf {path}: `optimizer` holds no state for its parameter yet "
                "(PyTorch creates it at the first optimizer.step() in which the parameter has "
                "a gradient). Step the optimizer first, or start from tx.init(params)."
            )
        needed = ["square_avg"]
        needed += ["grad_avg"] if hyper["centered"] else []
        needed += ["momentum_buffer"] if hyper["momentum"] != 0 else []
        for key in needed:
            if state.get(key) is None:
                raise ValueError(
                    f"`from_torch`: leaf {path}: the optimizer's state has no {key!r}, which "
                    f"its param group's settings (centered={hyper['centered']}, "
                    f"momentum={hyper['momentum']}) need: it came from other settings."
                )
            array = state[key].detach().cpu().resolve_conj().numpy()
            statistics[_KEYS[key]][i] = _converted(
                convert, array, p, leaf, np.shape(leaf), f"`from_torch`: {key} of leaf {path}"
            )
        step = int(float(state["step"]))
        counters.append((step, st.total_weight(hyper["alpha"], step)))
    tx = transformation(layout, leaves)
    try:
        opt_state = st.write(tx.init(params), leaves, statistics, counters)
    except ValueError as error:
        hint = (
            " (PyTorch skips a parameter without a gradient; a JAX run updates every leaf at "
            "every step.)"
            if isinstance(error, st.StepCountError)
            else ""
        )
        raise ValueError(f"`from_torch`: {error}{hint}") from None
    return tx, opt_state


def to_torch(
    opt_state: optax.OptState,
    optimizer: Any,
    params: optax.Params,
    torch_params: Any,
    convert: Convert | None,
) -> None:
    """See :func:`rmsprop_jax.interop.to_torch`."""
    torch = _torch("to_torch")
    leaves = st.leaves_of(params)
    layout = _layout(torch, "to_torch", optimizer, leaves, torch_params)
    st.refuse_packed(opt_state, "to_torch")
    st.refuse_quantized(opt_state, "to_torch", "presets.pytorch")
    expected = transformation(layout, leaves).init(params)
    st.check_layout(opt_state, expected, _described(layout))
    found = st.read(opt_state, leaves)
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    new_states = []
    for i, (path, p, leaf) in enumerate(zip(leaves.paths, layout.torch_leaves, leaves.values)):
        group = optimizer.param_groups[layout.group_of_leaf[i]]
        step_device = p.device if group.get("capturable", False) else torch.device("cpu")
        state: dict[str, Any] = {
            "step": torch.tensor(float(found.counts[i]), dtype=scalar_dtype, device=step_device)
        }
        for key, field in _KEYS.items():
            array = found.statistics[field][i]
            if array is None:
                continue
            array = _converted(
                convert, array, p, leaf, tuple(p.shape), f"`to_torch`: {field} of leaf {path}"
            )
            state[key] = torch.from_numpy(np.array(array)).to(p.device, p.dtype)
        new_states.append((p, state))
    for p, state in new_states:  # written once every leaf converted
        optimizer.state[p] = state
