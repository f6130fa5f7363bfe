"""Checks of hyperparameters and update trees, with messages that name the culprit.

Concrete values (Python numbers, concrete arrays) are checked when a transform is
built. Traced values (``optax.inject_hyperparams`` under ``jax.jit``) cannot be
inspected, so only their shape is checked and their value is let through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
    """Returns ``value`` as a Python float, or ``None`` when it is traced."""
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
) -> None:
    """Checks a numeric hyperparameter is a scalar in ``[low, high]`` (or ``[low, high)``).

    Args:
      name: the argument's name, used in the error message.
      value: a Python number, a scalar array (possibly traced), or, where
        ``allow_schedule`` is true, a callable.
      low: smallest allowed value (inclusive).
      high: largest allowed value.
      high_inclusive: whether ``high`` itself is allowed.
      allow_schedule: whether a callable (a schedule) is accepted unchecked.

    Raises:
      ValueError: the value is not a scalar, or is concrete and out of range.
    """
    if callable(value):
        if allow_schedule:
            return
        raise ValueError(f"`{name}` must be a number, got the callable {value!r}.")
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.ndarray, np.generic, jax.Array)
    ):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got an array of shape {np.shape(value)}.")
    number = concrete_value(value)
    if number is None:
        return
    if not math.isfinite(number) and not math.isnan(number):
        raise ValueError(f"`{name}` must be finite, got {number!r}.")
    right = "]" if high_inclusive else ")"
    inside = low <= number <= high if high_inclusive else low <= number < high
    if not inside:
        raise ValueError(f"`{name}` must be in [{low:g}, {high:g}{right}, got {number!r}.")


def is_python_zero(value: Any) -> bool:
    """Whether ``value`` is a Python number equal to 0 (never true for an array)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def check_bool(name: str, value: Any) -> None:
    """Checks a flag is a Python bool (not an array, which would be traced)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def resolve_dtype(name: str, value: Any) -> np.dtype | None:
    """Turns a dtype argument (``None``, a dtype or its name) into a float dtype.

    Raises:
      ValueError: the value names no dtype, or a dtype that is not floating.
    """
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as error:
        raise ValueError(f"`{name}` must be a floating dtype, got {value!r}.") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating dtype, got {value!r} ({dtype}).")
    return dtype


def check_updates_match(updates: Any, moment: Any, field: str) -> None:
    """Checks an update tree has the structure and leaf shapes of a state tree.

    Raises:
      ValueError: showing both structures, or the first leaf whose shape differs.
    """
    updates_def = jax.tree.structure(updates)
    moment_def = jax.tree.structure(moment)
    if updates_def != moment_def:
        raise ValueError(
            f"The updates do not have the structure of the state's `{field}`.\n"
            f"  updates:       {updates_def}\n  state.{field}: {moment_def}"
        )
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, update), state_leaf in zip(paths, jax.tree.leaves(moment)):
        if jnp.shape(update) != jnp.shape(state_leaf):
            raise ValueError(
                f"The update at {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(update)} but the state's `{field}` there has shape "
                f"{jnp.shape(state_leaf)}; nothing is broadcast."
            )


Schedule = Callable[[jax.Array], jax.typing.ArrayLike]
