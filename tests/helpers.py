"""Shared test code: the float64 reference loop, shared configurations, module and worker loaders.

* :class:`ReferenceRmsprop` and :func:`reference`: the update rules of the docstrings of
  ``scale_by_rms``, ``scale_by_centered_rms``, ``bias_correction`` and ``rmsprop``, written
  again in float64 NumPy, independently of the library's code. Every test that compares
  the library with "the math" compares it with this loop.
* :data:`CONFIGS`: the transforms and flag combinations that the numerical tests run
  through (:class:`Config` builds each with given hyperparameters); :func:`tree_params`,
  :func:`tree_grads` and :func:`train`: a two-layer parameter tree and a jitted training
  loop, for the tests of rmsprop inside optax's combinators.
* :class:`Tf1Reference`: TF1's ``RMSPropOptimizer`` one step at a time in float64, its
  slots (``rms`` from 1, ``mg``, ``momentum`` with the learning rate inside) exposed,
  for the conversions of TF1 state.
* :data:`OPTAX_CONFIGS`: every flag combination that ``optax.rmsprop`` shares with
  ``rmsprop_jax.rmsprop`` (:data:`OPTAX_CONFIGS_SAME_FROM_STEP_0`: those whose first
  step is also the same), for the equivalence tests and the optax conversions.
* :func:`load_module`, :func:`run_worker`, :func:`worker_env`: files of ``tests/`` loaded by
  path, and worker scripts run in a fresh Python process (one whose JAX runtime has its own
  device count), which imports the same ``rmsprop_jax`` as the test process.
* :func:`import_from_repository`: the repository's top-level tools (``benchmarks/``), which
  the wheel leaves out, for a test that runs them from a clone.

``tests`` is not a package; pytest puts this folder on ``sys.path``, so test files and
worker scripts import this module as ``helpers``.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

TESTS = Path(__file__).resolve().parent
REPOSITORY = TESTS.parent

# --- the float64 reference ----------------------------------------------------------------


def per_step(value: Any, t: int) -> float:
    """A hyperparameter at (0-based) update ``t``: a constant, a sequence or a function of t."""
    if callable(value):
        return float(value(t))
    if isinstance(value, Sequence):
        return float(value[t])
    return float(value)


class ReferenceRmsprop:
    """RMSProp one step at a time in float64 (complex128 for complex leaves), on any tree.

    Written from the update rules in the docstrings: with :math:`\\rho` the decay and
    :math:`P_t = \\prod \\rho` the product of the decays applied,

    * ``nu = rho nu + (1 - rho) |g|^2`` (starting at ``initial_scale``),
      ``mu = rho mu + (1 - rho) g`` (starting at 0);
    * with ``bias_correction``, ``nu`` and ``mu`` are divided by ``1 - P_t`` (by 1 while
      ``P_t = 1``);
    * centered: the second moment is ``max(nu - |mu|^2, 0)``, except at a one-sample step
      (``rho = 0``, or the first update with bias correction), where it is ``nu``;
    * ``v = g / sqrt(second + eps)`` (``eps_in_sqrt``) or ``g / (sqrt(second) + eps)``, and
      0 where that denominator is 0;
    * with a learning rate ``eta``: ``-eta v``, or with momentum ``beta`` the buffer
      ``b = beta b - eta v`` and the update ``b`` (Nesterov: ``-eta v + beta b``); with
      ``learning_rate_in_momentum=False``, ``b = beta b + v`` and ``-eta b`` (Nesterov:
      ``-eta (v + beta b)``).

    The numeric hyperparameters given here are defaults (those of ``rmsprop_jax.rmsprop``);
    :meth:`step` and :meth:`scale` take per-step values.
    """

    def __init__(
        self,
        params: Any,
        *,
        decay: float = 0.9,
        eps: float = 1e-8,
        learning_rate: float | None = None,
        momentum: float | None = None,
        initial_scale: float = 0.0,
        centered: bool = False,
        eps_in_sqrt: bool = True,
        bias_correction: bool = False,
        nesterov: bool = False,
        learning_rate_in_momentum: bool = True,
    ):
        self.decay, self.eps = decay, eps
        self.learning_rate, self.momentum = learning_rate, momentum
        self.centered, self.eps_in_sqrt = centered, eps_in_sqrt
        self.bias_correction, self.nesterov = bias_correction, nesterov
        self.learning_rate_in_momentum = learning_rate_in_momentum
        leaves, self.treedef = jax.tree.flatten(params)
        dtypes = [np.complex128 if np.iscomplexobj(p) else np.float64 for p in leaves]
        self._nu = [np.full(np.shape(p), initial_scale, np.float64) for p in leaves]
        self._mu = [np.zeros(np.shape(p), d) for p, d in zip(leaves, dtypes)]
        self._buffer = [np.zeros_like(m) for m in self._mu]
        self.product = 1.0  # the product of the decays applied so far
        self.condition: Any = None  # per leaf, nu_hat / second moment at the last step

    @property
    def nu(self) -> Any:
        return self.treedef.unflatten(self._nu)

    @property
    def mu(self) -> Any:
        return self.treedef.unflatten(self._mu)

    def scale(self, grads: Any, *, decay: float | None = None, eps: float | None = None) -> Any:
        """The scaling transform alone: updates the moments and returns ``v``.

        Also sets :attr:`condition`: ``nu_hat / second`` per element, how many ulps the
        centered variance loses to cancellation (1 for the plain transform).
        """
        rho = float(self.decay if decay is None else decay)
        epsilon = float(self.eps if eps is None else eps)
        previous, self.product = self.product, self.product * rho
        correction = 1 - self.product if self.bias_correction and self.product < 1 else 1.0
        one_sample = rho == 0 or (self.bias_correction and previous == 1)
        out, condition = [], []
        for i, g in enumerate(self.treedef.flatten_up_to(grads)):
            g = np.asarray(g).astype(self._mu[i].dtype)
            self._nu[i] = rho * self._nu[i] + (1 - rho) * np.abs(g) ** 2
            self._mu[i] = rho * self._mu[i] + (1 - rho) * g
            nu_hat, mu_hat = self._nu[i] / correction, self._mu[i] / correction
            if self.centered and not one_sample:
                second = np.maximum(nu_hat - np.abs(mu_hat) ** 2, 0.0)
            else:
                second = nu_hat
            denom = np.sqrt(second + epsilon) if self.eps_in_sqrt else np.sqrt(second) + epsilon
            out.append(np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0))
            condition.append(nu_hat / np.maximum(second, 1e-300))
        self.condition = self.treedef.unflatten(condition)
        return self.treedef.unflatten(out)

    def step(
        self,
        grads: Any,
        *,
        decay: float | None = None,
        eps: float | None = None,
        learning_rate: float | None = None,
        momentum: float | None = None,
    ) -> Any:
        """One update: ``rmsprop``'s, or without a learning rate the scaling transform's ``v``."""
        v = self.scale(grads, decay=decay, eps=eps)
        learning_rate = self.learning_rate if learning_rate is None else learning_rate
        momentum = self.momentum if momentum is None else momentum
        if learning_rate is None:
            return v
        eta = float(learning_rate)
        v = self.treedef.flatten_up_to(v)
        if momentum is None:
            return self.treedef.unflatten([-eta * x for x in v])
        beta, out = float(momentum), []
        for i, x in enumerate(v):
            if self.learning_rate_in_momentum:
                self._buffer[i] = beta * self._buffer[i] - eta * x
                out.append(-eta * x + beta * self._buffer[i] if self.nesterov else self._buffer[i])
            else:
                self._buffer[i] = beta * self._buffer[i] + x
                out.append(
                    -eta * (x + beta * self._buffer[i] if self.nesterov else self._buffer[i])
                )
        return self.treedef.unflatten(out)


def reference(
    grads: Sequence[Any],
    *,
    decay: Any,
    eps: Any,
    learning_rate: Any = None,
    momentum: Any = None,
    **flags: Any,
) -> dict[str, list]:
    """:class:`ReferenceRmsprop` over a gradient sequence, from zero parameters.

    Hyperparameters may change per step (a sequence, or a function of the update index, 0
    at the first update); ``flags`` are the constructor's keyword arguments
    (``initial_scale``, ``centered``, ``eps_in_sqrt``, ``bias_correction``, ``nesterov``,
    ``learning_rate_in_momentum``). Without ``learning_rate`` the scaled gradient ``v`` is
    returned (the scaling transform alone); with it, ``rmsprop``'s update. Returns per-step
    lists: ``updates``, ``nu``, ``mu``, ``product`` and ``condition``.
    """
    loop = ReferenceRmsprop(grads[0], **flags)
    out: dict[str, list] = {k: [] for k in ("updates", "nu", "mu", "product", "condition")}
    for t, g in enumerate(grads):
        hyper = dict(decay=per_step(decay, t), eps=per_step(eps, t))
        if learning_rate is not None:
            hyper["learning_rate"] = per_step(learning_rate, t)
            if momentum is not None:
                hyper["momentum"] = per_step(momentum, t)
        out["updates"].append(loop.step(g, **hyper))
        out["nu"].append(loop.nu)
        out["mu"].append(loop.mu)
        out["product"].append(loop.product)
        out["condition"].append(loop.condition)
    return out


class Tf1Reference:
    """TF1 ``tf.compat.v1.train.RMSPropOptimizer`` in float64, one step at a time, on a tree.

    ``tensorflow/core/kernels/training_ops.cc``, ``ApplyRMSProp`` and
    ``ApplyCenteredRMSProp``; ``tensorflow/python/training/rmsprop.py`` makes the ``rms``
    slot with a ones initializer and ``momentum``, ``mg`` with zeros::

        rms <- rms + (g^2 - rms) (1 - decay)
        mg  <- mg + (g - mg) (1 - decay)                            (centered)
        mom <- momentum mom + lr g / sqrt(rms - mg^2 + epsilon)     (centered)
        mom <- momentum mom + lr g / sqrt(rms + epsilon)            (otherwise)
        var <- var - mom

    :attr:`slots` maps ``"rms"``, ``"mg"``, ``"momentum"`` to trees like the parameters;
    pass ``slots`` to start from another run's.
    """

    def __init__(
        self,
        params: Any,
        *,
        decay: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-10,
        centered: bool = False,
        slots: dict[str, Any] | None = None,
    ):
        self.decay, self.momentum, self.epsilon, self.centered = decay, momentum, epsilon, centered
        self.params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        if slots is None:
            slots = {
                "rms": jax.tree.map(np.ones_like, self.params),
                "mg": jax.tree.map(np.zeros_like, self.params),
                "momentum": jax.tree.map(np.zeros_like, self.params),
            }
        self.slots = {
            k: jax.tree.map(lambda x: np.asarray(x, np.float64), v) for k, v in slots.items()
        }

    def step(self, grads: Any, learning_rate: float) -> Any:
        """One ``apply_gradients``; returns the parameters after it."""
        rho, beta, eps, lr = self.decay, self.momentum, self.epsilon, float(learning_rate)

        def leaf(w, g, rms, mg, mom):
            g = np.asarray(g, np.float64)
            rms = rms + (g * g - rms) * (1 - rho)
            if self.centered:
                mg = mg + (g - mg) * (1 - rho)
                denominator = np.sqrt(rms - mg * mg + eps)
            else:
                denominator = np.sqrt(rms + eps)
            mom = beta * mom + lr * g / denominator
            return w - mom, rms, mg, mom

        mg = self.slots.get("mg", jax.tree.map(np.zeros_like, self.params))
        mom = self.slots.get("momentum", jax.tree.map(np.zeros_like, self.params))
        out = jax.tree.map(leaf, self.params, grads, self.slots["rms"], mg, mom)
        is_out = lambda x: isinstance(x, tuple)  # noqa: E731
        self.params, rms, mg, mom = (
            jax.tree.map(lambda o, i=i: o[i], out, is_leaf=is_out) for i in range(4)
        )
        self.slots = {"rms": rms, "mg": mg, "momentum": mom}
        return self.params


# --- gradients and runs ---------------------------------------------------------------------


def log_uniform(rng: np.random.Generator, low: float, high: float, shape) -> np.ndarray:
    """Random signs times magnitudes log-uniform in [low, high] (float64)."""
    magnitude = 10.0 ** rng.uniform(math.log10(low), math.log10(high), shape)
    return rng.choice([-1.0, 1.0], size=shape) * magnitude


def small_gradients(steps: int, shape=(6,), seed: int = 0) -> np.ndarray:
    """float32 gradients, log-uniform magnitudes in [0.01, 100], random signs."""
    rng = np.random.default_rng(seed)
    return log_uniform(rng, 1e-2, 1e2, (steps, *shape)).astype(np.float32)


def scan_updates(tx: optax.GradientTransformation, params: Any, grads: Any):
    """Applies ``tx`` to gradients stacked on a leading axis; returns stacked updates and states."""

    def step(state, g):
        updates, state = tx.update(g, state)
        return state, (updates, state)

    return jax.lax.scan(step, tx.init(params), grads)[1]


# --- a two-layer parameter tree and a jitted training loop ------------------------------------

TREE_SHAPES = {"dense": {"w": (3, 4), "b": (4,)}, "out": {"w": (4, 2), "b": (2,)}}
TREE_STEPS = 12
# float32 against float64 over a dozen steps: a few float32 ulps per step.
RTOL, ATOL = 2e-5, 1e-6
# The same arithmetic compiled into two different programs: an ulp or two.
ULPS = dict(rtol=1e-6, atol=1e-7)
# rmsprop's configurations for the runs on the tree: the plain one, and every statistic.
RMSPROP_CONFIGS = {
    "plain": dict(),
    "centered_momentum_bias": dict(centered=True, momentum=0.9, bias_correction=True, eps=1e-6),
}


def tree_params(seed: int = 0) -> Any:
    """float32 parameters of the shapes in ``TREE_SHAPES``, standard normal."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32),
        TREE_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def tree_grads(seed: int, steps: int = TREE_STEPS) -> list:
    """Gradients whose global norm ranges over 0.3 .. 100, so clipping triggers on some steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = 10.0 ** rng.uniform(-1.0, 1.3)
        out.append(
            jax.tree.map(
                lambda shape, s=scale: jnp.asarray(s * rng.normal(size=shape), jnp.float32),
                TREE_SHAPES,
                is_leaf=lambda x: isinstance(x, tuple),
            )
        )
    return out


def train(tx: optax.GradientTransformation, params: Any, grads: Sequence) -> tuple[list, ...]:
    """A jitted loop; returns the parameters, states and updates after each step."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    trajectory, states, updates = [], [], []
    for g in grads:
        params, state, u = step(params, state, g)
        trajectory.append(params)
        states.append(state)
        updates.append(u)
    return trajectory, states, updates


def to_f64(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def in_rms_state(path: tuple, value: Any) -> bool:
    """For ``optax.tree_utils.tree_get``'s ``filtering``: a field of a scaling transform's state."""
    del value
    return path[-1].tuple_name in ("ScaleByRmsState", "ScaleByCenteredRmsState")


# --- configurations -------------------------------------------------------------------------

ALIAS_LEARNING_RATE = 0.5  # a Python float: see test_array_learning_rate_keeps_update_dtype


class Config(NamedTuple):
    """One transform and its static flags; numeric hyperparameters are given at build time."""

    kind: str  # "rms", "centered", "rms+bias_correction", "centered+bias_correction", "alias"
    eps_in_sqrt: bool = True
    bias_correction: bool = False
    centered: bool = False  # alias only
    nesterov: bool = False  # alias only
    learning_rate_in_momentum: bool = True  # alias only

    @property
    def id(self) -> str:
        parts = [self.kind, "in" if self.eps_in_sqrt else "out"]
        if self.bias_correction:
            parts.append("bc")
        if self.kind == "alias":
            parts += ["centered" if self.centered else "plain"]
            parts += ["nesterov" if self.nesterov else "heavy-ball"]
            parts += ["lr-in" if self.learning_rate_in_momentum else "lr-out"]
        return "-".join(parts)

    @property
    def is_centered(self) -> bool:
        return self.centered or self.kind.startswith("centered")

    def build(
        self, decay, eps, initial_scale=0.0, momentum=0.5, state_dtype=None
    ) -> optax.GradientTransformation:
        """The transform; ``state_dtype`` is passed as every ``*_dtype`` argument it has."""
        scaling = dict(eps_in_sqrt=self.eps_in_sqrt, initial_scale=initial_scale)
        scaling["nu_dtype"] = state_dtype
        if self.is_centered:
            scaling["mu_dtype"] = state_dtype
        if self.kind == "rms":
            return rmsprop_jax.scale_by_rms(
                decay, eps, bias_correction=self.bias_correction, **scaling
            )
        if self.kind == "centered":
            return rmsprop_jax.scale_by_centered_rms(
                decay, eps, bias_correction=self.bias_correction, **scaling
            )
        if self.kind.endswith("+bias_correction"):
            factory = {
                "rms": rmsprop_jax.scale_by_rms,
                "centered": rmsprop_jax.scale_by_centered_rms,
            }[self.kind.split("+")[0]]
            return optax.chain(factory(decay, eps, **scaling), rmsprop_jax.bias_correction(decay))
        assert self.kind == "alias"
        return rmsprop_jax.rmsprop(
            ALIAS_LEARNING_RATE,
            decay,
            eps,
            centered=self.centered,
            momentum=momentum,
            nesterov=self.nesterov,
            bias_correction=self.bias_correction,
            learning_rate_in_momentum=self.learning_rate_in_momentum,
            momentum_dtype=state_dtype,
            **scaling,
        )


# Every scaling transform and flag combination, both bias corrections, and the alias.
CONFIGS = [
    *(
        Config(kind, eps_in_sqrt=e, bias_correction=b)
        for kind, e, b in itertools.product(["rms", "centered"], [True, False], [False, True])
    ),
    Config("rms+bias_correction", eps_in_sqrt=False),
    Config("centered+bias_correction", eps_in_sqrt=True),
    Config("alias", eps_in_sqrt=True, bias_correction=False, centered=False, nesterov=False),
    Config("alias", eps_in_sqrt=False, bias_correction=True, centered=True, nesterov=True),
    Config(
        "alias",
        eps_in_sqrt=True,
        bias_correction=True,
        centered=False,
        nesterov=True,
        learning_rate_in_momentum=False,
    ),
    Config(
        "alias",
        eps_in_sqrt=False,
        bias_correction=False,
        centered=True,
        nesterov=False,
        learning_rate_in_momentum=False,
    ),
]

# Every flag combination optax.rmsprop shares with rmsprop_jax.rmsprop (the numeric
# hyperparameters are each test's): tests/test_transforms.py compares the two from step 0,
# tests/test_interop.py converts the state of one into the other's.
OPTAX_CONFIGS = [
    dict(centered=c, momentum=m, nesterov=n, eps_in_sqrt=e, initial_scale=s, bias_correction=b)
    for c, (m, n), e, s, b in itertools.product(
        [False, True],
        [(None, False), (0.9, False), (0.9, True)],
        [True, False],
        [0.0, 1.0],
        [False, True],
    )
]
# optax divides by sqrt(eps) at the first centered bias-corrected step (a documented
# difference; tests/test_centered.py compares those transforms from step 2 on).
OPTAX_CONFIGS_SAME_FROM_STEP_0 = [
    c for c in OPTAX_CONFIGS if not (c["centered"] and c["bias_correction"])
]


# --- modules, worker processes, the repository's tools ---------------------------------------


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """Imports a Python file by its path (``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name or f"_rmsprop_jax_tests_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a worker process.

    ``PYTHONPATH`` starts with the folder holding the ``rmsprop_jax`` this process imported
    (the installed package, or the source tree), so the worker tests the same package.
    ``devices`` gives the worker that many virtual CPU devices through ``XLA_FLAGS``, which
    must be set before JAX starts, hence the separate process.
    """
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = (
            f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        )
        env["JAX_PLATFORMS"] = "cpu"
    package_parent = str(Path(rmsprop_jax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def run_worker(worker: Path, *args: str, devices: int | None = None, timeout: int = 300) -> None:
    """Runs the script ``worker`` in a fresh process (:func:`worker_env`); fails if it fails."""
    proc = subprocess.run(
        [sys.executable, str(worker), *args],
        env=worker_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{worker.name} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")


def import_from_repository(name: str) -> ModuleType:
    """Imports ``name`` from the repository's top level (``benchmarks``: not in the wheel).

    The repository root is on ``sys.path`` for this import only, after ``rmsprop_jax`` is
    imported, so the imported tool uses the package under test, not the source tree's copy.
    """
    root = str(REPOSITORY)
    sys.path.insert(0, root)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(root)
