"""Checks of hyperparameters, parameters and update trees, with messages that name the culprit.

Concrete values (Python numbers, concrete arrays) are checked when a transform is
built. Traced values (a schedule's output, or ``optax.inject_hyperparams`` under
``jax.jit``) cannot be inspected then; :func:`check_at_run_time` checks them when the
step runs, and raises from inside the compiled step through a host callback that is
only called when a value is out of range (see :func:`runtime_checks`).

Every message names the argument the way the user wrote it: a preset passes a
:class:`Naming` that maps the shared names (``decay``, ``eps``) to its own (``alpha``,
``rho``, ``epsilon``) and says which function was called.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from rmsprop_jax import _quantized


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a function's hyperparameters are named in its error messages.

    Attributes:
      caller: the function the user called (``"presets.pytorch"``), or ``""`` for the
        transform itself; messages then start with ``"`caller`: "``.
      names: the caller's own name of each shared argument name it renames, as pairs
        (``(("decay", "alpha"),)``); names not listed are reported unchanged.
    """

    caller: str = ""
    names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, caller: str, **names: str) -> Naming:
        """``Naming.of("presets.keras", decay="rho", eps="epsilon")``."""
        return cls(caller, tuple(sorted(names.items())))

    def __call__(self, name: str) -> str:
        """The caller's name for the shared argument ``name``."""
        return dict(self.names).get(name, name)

    @property
    def prefix(self) -> str:
        """``"`caller`: "``, or ``""`` for the transform itself."""
        return f"`{self.caller}`: " if self.caller else ""

    def message(self, name: str, text: str) -> str:
        """``"`caller`: `name` text"`` with the caller's name of the argument."""
        return f"{self.prefix}`{self(name)}` {text}"


_NAMING: contextvars.ContextVar[Naming] = contextvars.ContextVar("rmsprop_jax_naming")


def current_naming() -> Naming:
    """The naming in force: the default, or the one set by :func:`named_as` around a build."""
    return _NAMING.get(Naming())


@contextlib.contextmanager
def named_as(caller: str, **names: str) -> Generator[None, None, None]:
    """Within the block, transforms built report errors with the caller's names.

    ``with named_as("presets.keras", decay="rho", eps="epsilon"): ...``. Transforms read
    the naming when they are built and keep it for their run-time checks.
    """
    token = _NAMING.set(Naming.of(caller, **names))
    try:
        yield
    finally:
        _NAMING.reset(token)


class Interval(NamedTuple):
    """The allowed range of a numeric hyperparameter: ``[low, high]`` or ``[low, high)``."""

    low: float
    high: float = math.inf
    high_inclusive: bool = True

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"

    def contains(self, number: float) -> bool:
        """Whether a finite or NaN Python float lies in the interval (NaN never does)."""
        if self.high_inclusive:
            return self.low <= number <= self.high
        return self.low <= number < self.high

    def contains_traced(self, value: jax.Array) -> jax.Array:
        """:meth:`contains` for an array: a boolean array, False for NaN and infinities."""
        upper = value <= self.high if self.high_inclusive else value < self.high
        return jnp.isfinite(value) & (value >= self.low) & upper


UNIT = Interval(0.0, 1.0)  # decays
NON_NEGATIVE = Interval(0.0)  # eps, learning rates, initial_scale, weight decay
MOMENTUM = Interval(0.0, 1.0, high_inclusive=False)


def concrete_value(value: Any) -> float | None:
    """Returns ``value`` as a Python float, or ``None`` when it is traced."""
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_number(name: str, number: float, interval: Interval, naming: Naming) -> None:
    if math.isinf(number):
        raise ValueError(naming.message(name, f"must be finite, got {number!r}."))
    if not interval.contains(number):
        raise ValueError(naming.message(name, f"must be in {interval}, got {number!r}."))


def check_scalar(
    name: str,
    value: Any,
    interval: Interval,
    *,
    allow_schedule: bool = False,
    naming: Naming | None = None,
) -> None:
    """Checks a numeric hyperparameter is a scalar in ``interval``, when it is built.

    Args:
      name: the shared name of the argument (``naming`` turns it into the caller's).
      value: a Python number, a scalar array (possibly traced), or, where
        ``allow_schedule`` is true, a callable.
      interval: the allowed values.
      allow_schedule: whether a callable (a schedule) is accepted; its values are
        checked at run time by :func:`check_at_run_time`.
      naming: how the caller names its arguments.

    Raises:
      ValueError: the value is not a scalar, or is concrete and out of range.
    """
    naming = naming or current_naming()
    if callable(value):
        if allow_schedule:
            return
        raise ValueError(naming.message(name, f"must be a number, got the callable {value!r}."))
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.ndarray, np.generic, jax.Array)
    ):
        raise ValueError(naming.message(name, f"must be a number, got {value!r}."))
    if np.ndim(value) != 0:
        raise ValueError(
            naming.message(name, f"must be a scalar, got an array of shape {np.shape(value)}.")
        )
    number = concrete_value(value)
    if number is not None:
        _check_number(name, number, interval, naming)


def check_scaling(
    decay: Any, eps: Any, initial_scale: Any, eps_in_sqrt: Any, bias_correction: Any
) -> None:
    """The build-time checks of the arguments that the two RMS scaling transforms share.

    Raises:
      ValueError: from :func:`check_scalar` or :func:`check_bool`, in argument order.
    """
    check_scalar("decay", decay, UNIT, allow_schedule=True)
    check_scalar("eps", eps, NON_NEGATIVE)
    check_scalar("initial_scale", initial_scale, NON_NEGATIVE)
    check_bool("eps_in_sqrt", eps_in_sqrt)
    check_bool("bias_correction", bias_correction)


def check_scaling_init(
    params: optax.Params, initial_scale: Any, naming: Naming, transform: str
) -> None:
    """The checks that the two RMS scaling transforms share when their state is made.

    Every parameter leaf must be floating or complex (:func:`check_params_inexact`, which
    names the caller, else ``transform``), and a traced ``initial_scale`` must be
    non-negative (:func:`check_at_run_time`).
    """
    check_params_inexact(params, naming.caller or transform)
    check_at_run_time([("initial_scale", initial_scale, NON_NEGATIVE)], naming)


# --- run-time checks ------------------------------------------------------------------------

_runtime_checks_enabled = True


def runtime_checks_enabled() -> bool:
    """Whether :func:`check_at_run_time` adds its check to the steps traced from now on."""
    return _runtime_checks_enabled


@contextlib.contextmanager
def _restore(previous: bool) -> Generator[None, None, None]:
    global _runtime_checks_enabled
    try:
        yield
    finally:
        _runtime_checks_enabled = previous


def runtime_checks(enabled: bool) -> contextlib.AbstractContextManager[None]:
    r"""Turns the run-time range checks of traced hyperparameters on or off.

    A hyperparameter that is known when a transform is built is checked then. One that
    is only known when the step runs (the output of a schedule, or a value set through
    ``optax.inject_hyperparams`` and traced by ``jax.jit``) is checked inside the
    compiled step: a decay outside :math:`[0, 1]`, a momentum outside :math:`[0, 1)`, a
    negative ``eps``, learning rate or ``initial_scale``, or any NaN or infinite value
    makes the step raise an error that names the hyperparameter and the value (under
    ``jax.jit`` a ``jax.errors.JaxRuntimeError`` whose message contains the
    ``ValueError``'s). The check costs a few scalar comparisons and a conditional per
    transform and step; its host callback runs only when a value is out of range.

    The switch is read when a step is traced: it applies to functions traced (jitted)
    after it is set. It is on by default. Called as a function it sets the switch;
    used as a context manager it restores the previous setting on exit.

    With the checks off, an out-of-range traced value goes through unchecked and the
    arithmetic does what it does with that value: a decay above 1 or a negative learning
    rate gives steps of the wrong size or sign, and a NaN or infinite hyperparameter
    gives NaN updates and state. Turn the checks off only to compare or to profile.

    Args:
      enabled: whether steps traced from now on check their traced hyperparameters.

    Returns:
      A context manager that restores the previous setting on exit (it need not be used).

    Example:
      >>> import rmsprop_jax
      >>> with rmsprop_jax.runtime_checks(False):
      ...     print(rmsprop_jax.runtime_checks_enabled())
      False
      >>> print(rmsprop_jax.runtime_checks_enabled())
      True
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"`enabled` must be True or False, got {enabled!r}.")
    global _runtime_checks_enabled
    previous, _runtime_checks_enabled = _runtime_checks_enabled, enabled
    return _restore(previous)


# ``any`` over every element and every ``vmap`` batch row at once, unbatched: the
# run-time check branches on it, so that under ``vmap`` (a hyperparameter sweep) the
# conditional stays a conditional instead of becoming a select that calls the host
# callback on every step.
_any_over_batch_p = Primitive("rmsprop_jax_any_over_batch")
_any_over_batch_p.def_impl(lambda x: jnp.any(x))
_any_over_batch_p.def_abstract_eval(lambda x: jax.core.ShapedArray((), jnp.dtype(bool)))
batching.primitive_batchers[_any_over_batch_p] = lambda args, dims: (
    _any_over_batch_p.bind(args[0]),
    None,
)
mlir.register_lowering(
    _any_over_batch_p, mlir.lower_fun(lambda x: jnp.any(x), multiple_results=False)
)


def check_at_run_time(
    checks: Sequence[tuple[str, Any, Interval]], naming: Naming | None = None
) -> None:
    """Checks hyperparameter values computed in a step, once they are known.

    Concrete values (an eager step) are checked at once. Traced ones are checked when
    the compiled step runs, if :func:`runtime_checks` is on: one conditional for all of
    them, whose host callback raises the ``ValueError`` of the first value out of range.

    Args:
      checks: ``(name, value, interval)`` triples, ``value`` a scalar (or, under
        ``vmap``, a batch of them).
      naming: how the caller names its arguments.

    Raises:
      ValueError: a concrete value is out of range (a traced one raises when the step
        runs).
    """
    naming = naming or current_naming()
    traced = []
    for name, value, interval in checks:
        number = concrete_value(value) if np.ndim(value) == 0 else None
        if number is not None:
            _check_number(name, number, interval, naming)
        else:
            traced.append((name, jnp.asarray(value), interval))
    if not traced or not _runtime_checks_enabled:
        return
    bad = jnp.stack([~interval.contains_traced(v).all() for _, v, interval in traced])

    def report(*values: np.ndarray) -> None:
        for (name, _, interval), value in zip(traced, values):
            for number in np.asarray(value, np.float64).reshape(-1):
                _check_number(name, float(number), interval, naming)

    def fail() -> None:
        jax.debug.callback(report, *(v for _, v, _ in traced))

    jax.lax.cond(_any_over_batch_p.bind(bad), fail, lambda: None)


# --- other arguments ------------------------------------------------------------------------


def is_python_zero(value: Any) -> bool:
    """Whether ``value`` is a Python number equal to 0 (never true for an array)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def check_bool(name: str, value: Any, naming: Naming | None = None) -> None:
    """Checks a flag is a Python bool (not an array, which would be traced)."""
    naming = naming or current_naming()
    if not isinstance(value, bool):
        raise ValueError(naming.message(name, f"must be True or False, got {value!r}."))


def resolve_dtype(name: str, value: Any) -> np.dtype | _quantized.QuantizedFormat | None:
    """Resolves a ``*_dtype`` argument: ``None``, a dtype or its name, or a quantized format.

    Returns:
      ``None``, a floating ``np.dtype``, or the :class:`rmsprop_jax.QuantizedFormat` given.

    Raises:
      ValueError: the value names no dtype, or a dtype that is not floating.
    """
    if value is None or isinstance(value, _quantized.QuantizedFormat):
        return value
    try:
        dtype = jnp.dtype(value)
    except TypeError as error:
        raise ValueError(
            f"`{name}` must be a floating dtype or `rmsprop_jax.quantized(...)`, got {value!r}."
        ) from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating dtype or `rmsprop_jax.quantized(...)`, "
            f"got {value!r} ({dtype})."
        )
    return dtype


def check_params_inexact(params: optax.Params, transform: str) -> None:
    """Checks every parameter leaf is floating or complex, naming the first that is not.

    Raises:
      TypeError: naming the leaf's path and dtype, and how to leave such leaves out.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`{transform}` optimizes floating and complex parameters only, but the "
                f"parameter at {jax.tree_util.keystr(path) or '(the root)'} has dtype "
                f"{dtype}. Leave such leaves out of the optimizer, e.g. with "
                "`optax.masked(tx, mask)` (mask False there) or "
                "`optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)`."
            )


def check_updates_match(updates: Any, moment: Any, field: str) -> None:
    """Checks an update tree has the structure and leaf shapes of a state tree.

    Raises:
      ValueError: showing both structures, or the first leaf whose shape differs.
    """
    # A quantized leaf (codes and scales) stands for one array of the parameter's shape.
    quantized = _quantized.is_quantized
    updates_def = jax.tree.structure(updates)
    moment_def = jax.tree.structure(moment, is_leaf=quantized)
    if updates_def != moment_def:
        raise ValueError(
            f"The updates do not have the structure of the state's `{field}`.\n"
            f"  updates:       {updates_def}\n  state.{field}: {moment_def}"
        )
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, update), state_leaf in zip(paths, jax.tree.leaves(moment, is_leaf=quantized)):
        state_shape = state_leaf.shape if quantized(state_leaf) else jnp.shape(state_leaf)
        if jnp.shape(update) != state_shape:
            raise ValueError(
                f"The update at {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(update)} but the state's `{field}` there has shape "
                f"{state_shape}; nothing is broadcast."
            )
