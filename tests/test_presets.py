"""Every preset against the implementation it mirrors, step by step.

Three kinds of evidence:

* ``pytorch`` and ``keras``: the parameter trajectories of the real
  ``torch.optim.RMSprop`` and ``keras.optimizers.RMSprop``, stored in
  ``tests/golden/*.npz`` by ``tests/golden/make_golden.py``, and the same
  configurations run live when PyTorch / Keras are importable (CI installs both).
* ``tf1``, ``sonnet2``, ``graves2013``, ``dqn2015``, ``lasagne``, ``caffe``:
  float64 NumPy loops written from the published update equations (quoted next
  to each loop), independently of the library.
* The "first step for a unit gradient" factor that each preset's docstring (and
  the module's table) states, against a closed form computed here.

Trajectories are compared leaf by leaf after scaling each leaf by a power of two
close to its largest magnitude (exact in floating point), with a relative
tolerance and an absolute one relative to that scale: float32 rounding of a
parameter is relative to the parameter's size, not to the size of the update.
The worst relative differences are collected and printed by the last test
(``pytest -s`` or ``-rP`` shows them).
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TESTS, load_module

from rmsprop_jax import presets

make_golden = load_module(TESTS / "golden" / "make_golden.py")
STEPS = make_golden.STEPS

# Against the frameworks (float32 against float32, different rounding order).
FRAMEWORK_RTOL = 1e-5
# Against the float64 reference loops (float32 against float64).
REFERENCE_RTOL = 2e-5
# Absolute tolerance, relative to the largest magnitude of the leaf's trajectory.
ATOL_FRACTION = 1e-6

LEARNING_RATE_NAME = {
    name: next(iter(inspect.signature(getattr(presets, name)).parameters))
    for name in presets.__all__
}

# preset -> source ("golden", "live", "reference") -> [configurations, *worst Differences]
WORST: dict[str, dict[str, list]] = collections.defaultdict(
    lambda: collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
)

Tree = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Running a preset: one jitted scan per preset and configuration structure
# ----------------------------------------------------------------------------


@functools.cache
def _trajectory_fn(name: str, static: tuple, traced_names: tuple, scheduled: bool) -> Callable:
    """A jitted run of ``presets.<name>`` over a whole gradient sequence.

    Booleans and zeros (which decide the state's layout) are static; the other
    hyperparameters are traced Python floats (weakly typed float32, the value
    the preset would get from the same Python float), so that configurations
    differing only in their values share one compilation.
    """
    preset = getattr(presets, name)

    def run(values, rates, params, grads):
        kwargs = dict(static) | dict(zip(traced_names, values))
        if scheduled:
            # The schedule of the step count: rates[t] at the t-th update (0-based).
            kwargs[LEARNING_RATE_NAME[name]] = lambda count: rates[count]
        tx = preset(**kwargs)

        def step(carry, g):
            p, state = carry
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
            return (p, state), p

        _, trajectory = jax.lax.scan(step, (params, tx.init(params)), grads)
        return trajectory

    return jax.jit(run)


def run_preset(
    name: str, kwargs: dict[str, Any], rates: np.ndarray | None, params: Tree, grads: list[Tree]
) -> Tree:
    """Leaf -> ``(STEPS + 1, *shape)``: ``params`` and the parameters after each update."""
    static = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool) or v == 0))
    traced = sorted((k, float(v)) for k, v in kwargs.items() if k not in dict(static))
    fn = _trajectory_fn(name, static, tuple(k for k, _ in traced), rates is not None)
    stacked = {k: np.stack([tree[k] for tree in grads]) for k in params}
    table = np.zeros(STEPS, np.float32) if rates is None else np.asarray(rates, np.float32)
    trajectory = fn(tuple(v for _, v in traced), table, params, stacked)
    return {k: np.concatenate([params[k][None], np.asarray(trajectory[k])]) for k in params}


# ----------------------------------------------------------------------------
# Comparing trajectories
# ----------------------------------------------------------------------------


def _scale(leaf: np.ndarray) -> float:
    """A power of two at least the leaf's largest magnitude (dividing by it is exact)."""
    largest = float(np.max(np.abs(leaf)))
    return 2.0 ** math.ceil(math.log2(largest)) if largest > 0 else 1.0


class Differences(NamedTuple):
    """How far one trajectory is from another, leaf by leaf, worst case."""

    relative: float  # |ours - theirs| / |theirs| over entries >= 10% of their leaf's scale
    absolute: float  # |ours - theirs| / scale of the leaf, over all entries
    used: float  # the largest fraction of the tolerance used (the test passes at <= 1)


def differences(ours: Tree, theirs: Tree, rtol: float) -> Differences:
    """The worst :class:`Differences` of ``ours`` from ``theirs`` under ``rtol``."""
    relative = absolute = used = 0.0
    for k in theirs:
        scale = _scale(theirs[k])
        a = np.asarray(ours[k], np.complex128)
        b = np.asarray(theirs[k], np.complex128)
        diff, size = np.abs(a - b), np.abs(b)
        sizable = size >= 0.1 * scale  # where the relative part of the tolerance governs
        if np.any(sizable):
            relative = max(relative, float(np.max(diff[sizable] / size[sizable])))
        absolute = max(absolute, float(np.max(diff)) / scale)
        used = max(used, float(np.max(diff / (rtol * size + ATOL_FRACTION * scale))))
    return Differences(relative, absolute, used)


def assert_trajectories_close(
    ours: Tree, theirs: Tree, *, rtol: float, preset: str, source: str, label: str
) -> None:
    """Checks ``|ours - theirs| <= rtol |theirs| + ATOL_FRACTION * scale``, leaf by leaf."""
    assert set(ours) == set(theirs)
    found = differences(ours, theirs, rtol)
    record = WORST[preset][source]
    record[0] += 1
    record[1:] = [max(old, new) for old, new in zip(record[1:], found)]
    ours_scaled, theirs_scaled = {}, {}
    for k in theirs:
        scale = _scale(theirs[k])
        theirs_scaled[k] = np.asarray(theirs[k]) / scale
        ours_scaled[k] = np.asarray(ours[k]).astype(theirs_scaled[k].dtype) / scale
    chex.assert_trees_all_close(
        ours_scaled,
        theirs_scaled,
        rtol=rtol,
        atol=ATOL_FRACTION,
        custom_message=f"{preset} vs {source} [{label}]: {found}",
    )


# ----------------------------------------------------------------------------
# Golden files
# ----------------------------------------------------------------------------

TORCH_CASES, TORCH_VERSIONS = make_golden.read_golden(make_golden.PYTORCH_FILE)
KERAS_CASES, KERAS_VERSIONS = make_golden.read_golden(make_golden.KERAS_FILE)
FRAMEWORK_PRESET = {"torch": "pytorch", "keras": "keras"}


def _golden_params(cases, *, nan: bool):
    return [
        pytest.param(case, id=case[0]["name"])
        for case in cases
        if case[0].get("expect_nan", False) == nan
    ]


def test_golden_files_match_the_script():
    """The committed files hold the script's configurations, gradients and start points."""
    torch_configs = [case[0] for case in TORCH_CASES]
    assert torch_configs == [*make_golden.TORCH_CONFIGS, make_golden.TORCH_NAN_CONFIG]
    assert [case[0] for case in KERAS_CASES] == make_golden.KERAS_CONFIGS
    for config, grads, trajectory in TORCH_CASES + KERAS_CASES:
        chex.assert_trees_all_equal(grads, make_golden.make_gradients(config))
        chex.assert_trees_all_equal(
            {k: v[0] for k, v in trajectory.items()}, make_golden.make_params(config)
        )
    assert TORCH_VERSIONS["torch"].startswith("2.13.0")
    assert KERAS_VERSIONS["keras_backend"] == "jax"


@pytest.mark.slow
@pytest.mark.parametrize("case", _golden_params(TORCH_CASES, nan=False))
def test_pytorch_golden(case):
    config, grads, golden = case
    params = {k: v[0] for k, v in golden.items()}
    ours = run_preset(
        "pytorch", config["kwargs"], make_golden.learning_rates(config), params, grads
    )
    assert_trajectories_close(
        ours, golden, rtol=FRAMEWORK_RTOL, preset="pytorch", source="golden", label=config["name"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", _golden_params(KERAS_CASES, nan=False))
def test_keras_golden(case):
    config, grads, golden = case
    params = {k: v[0] for k, v in golden.items()}
    ours = run_preset("keras", config["kwargs"], make_golden.learning_rates(config), params, grads)
    assert_trajectories_close(
        ours, golden, rtol=FRAMEWORK_RTOL, preset="keras", source="golden", label=config["name"]
    )


@pytest.mark.parametrize("case", _golden_params(TORCH_CASES, nan=True))
def test_pytorch_golden_nan_where_preset_is_finite(case):
    """A constant gradient: PyTorch's centered variance rounds below zero (NaN)."""
    config, grads, golden = case
    assert any(np.isnan(v).any() for v in golden.values()), "the golden run should hold NaN"
    params = {k: v[0] for k, v in golden.items()}
    ours = run_preset("pytorch", config["kwargs"], None, params, grads)
    chex.assert_tree_all_finite(ours)


# ----------------------------------------------------------------------------
# Live runs of the frameworks
# ----------------------------------------------------------------------------


def _import_keras() -> Any:
    """Keras on the JAX backend, or a skip; ``KERAS_BACKEND`` is set before the import."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()!r}, not the JAX backend")
    return keras


def _live(framework: str, config: dict[str, Any]) -> None:
    if framework == "torch":
        pytest.importorskip("torch")
        runner = make_golden.torch_trajectory
    else:
        _import_keras()
        runner = make_golden.keras_trajectory
    grads, params = make_golden.make_gradients(config), make_golden.make_params(config)
    theirs = runner(config, params, grads)
    preset = FRAMEWORK_PRESET[framework]
    ours = run_preset(preset, config["kwargs"], make_golden.learning_rates(config), params, grads)
    assert_trajectories_close(
        ours, theirs, rtol=FRAMEWORK_RTOL, preset=preset, source="live", label=config["name"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", make_golden.TORCH_CONFIGS, ids=lambda c: c["name"])
def test_pytorch_live(config):
    _live("torch", config)


@pytest.mark.slow
@pytest.mark.parametrize("config", make_golden.KERAS_CONFIGS, ids=lambda c: c["name"])
def test_keras_live(config):
    _live("keras", config)


@pytest.mark.slow
def test_pytorch_live_centered_nan_where_preset_is_finite():
    pytest.importorskip("torch")
    config = make_golden.TORCH_NAN_CONFIG
    grads, params = make_golden.make_gradients(config), make_golden.make_params(config)
    theirs = make_golden.torch_trajectory(config, params, grads)
    assert any(np.isnan(v).any() for v in theirs.values())
    chex.assert_tree_all_finite(run_preset("pytorch", config["kwargs"], None, params, grads))


# ----------------------------------------------------------------------------
# float64 reference loops from the published equations
# ----------------------------------------------------------------------------


def _run_reference(init, step, grads: list[Tree], params: Tree, rates: list[float]) -> Tree:
    """Drives a per-leaf float64 update rule ``step(w, g, state, lr) -> (w, state)``."""
    out = {}
    for k, w0 in params.items():
        w = w0.astype(np.float64)
        state = init(w)
        history = [w]
        for t, tree in enumerate(grads):
            w, state = step(w, tree[k].astype(np.float64), state, rates[t])
            history.append(w)
        out[k] = np.stack(history)
    return out


def tf1_reference(
    grads,
    params,
    rates,
    *,
    decay=0.9,
    momentum=0.0,
    epsilon=1e-10,
    centered=False,
    lr_outside_buffer=False,
):
    """TF1 ``tf.compat.v1.train.RMSPropOptimizer``.

    ``tensorflow/core/kernels/training_ops.cc``, functors ``ApplyRMSProp`` and
    ``ApplyCenteredRMSProp``::

        ms  <- ms + (grad^2 - ms) * (1 - rho)
        mg  <- mg + (grad - mg) * (1 - rho)                  (centered)
        mom <- momentum * mom + lr * grad / sqrt(ms - mg^2 + epsilon)   (centered)
        mom <- momentum * mom + lr * grad / sqrt(ms + epsilon)          (otherwise)
        var <- var - mom

    ``tensorflow/python/training/rmsprop.py`` creates the ``rms`` slot (ms) with
    a ones initializer, ``momentum`` and ``mg`` with zeros. TF1 keeps the
    momentum buffer even when ``momentum`` is 0.

    ``lr_outside_buffer`` swaps in PyTorch's placement (``mom <- momentum * mom +
    grad / sqrt(...)``, ``var <- var - lr * mom``): not TF1, a negative control.
    """

    def init(w):
        return np.ones_like(w), np.zeros_like(w), np.zeros_like(w)

    def step(w, g, state, lr):
        ms, mg, mom = state
        ms = ms + (g * g - ms) * (1 - decay)
        if centered:
            mg = mg + (g - mg) * (1 - decay)
            denominator = np.sqrt(ms - mg * mg + epsilon)
        else:
            denominator = np.sqrt(ms + epsilon)
        if lr_outside_buffer:
            mom = momentum * mom + g / denominator
            return w - lr * mom, (ms, mg, mom)
        mom = momentum * mom + lr * g / denominator
        return w - mom, (ms, mg, mom)

    return _run_reference(init, step, grads, params, rates)


def sonnet2_reference(
    grads, params, rates, *, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False
):
    """Sonnet 2 ``snt.optimizers.RMSProp`` (``sonnet/src/optimizers/rmsprop.py``).

    ``rmsprop_update``, with ``ms``, ``mg`` and ``mom`` created as zeros
    (``utils.variable_like``)::

        ms  <- update^2 * (1 - decay) + ms * decay
        mg  <- update * (1 - decay) + mg * decay                          (centered)
        mom <- mu * mom + learning_rate * update * rsqrt(ms - mg^2 + epsilon)  (centered)
        mom <- mu * mom + learning_rate * update * rsqrt(ms + epsilon)         (otherwise)
        parameter <- parameter - mom
    """

    def init(w):
        return np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)

    def step(w, g, state, lr):
        ms, mg, mom = state
        ms = g * g * (1 - decay) + ms * decay
        if centered:
            mg = g * (1 - decay) + mg * decay
            denominator = ms - mg * mg + epsilon
        else:
            denominator = ms + epsilon
        mom = momentum * mom + lr * g / np.sqrt(denominator)
        return w - mom, (ms, mg, mom)

    return _run_reference(init, step, grads, params, rates)


def graves2013_reference(
    grads, params, rates, *, decay=0.95, momentum=0.9, epsilon=1e-4, lr_outside_buffer=False
):
    """Graves (2013), "Generating Sequences With Recurrent Neural Networks", eqs. (38)-(41).

    With e the loss gradient, aleph = decay, beth = momentum, gimel = lr,
    daleth = epsilon::

        n     <- aleph n + (1 - aleph) e^2                        (38)
        g     <- aleph g + (1 - aleph) e                          (39)
        Delta <- beth Delta - gimel e / sqrt(n - g^2 + daleth)    (40)
        w     <- w + Delta                                        (41)

    ``lr_outside_buffer``: the negative control, as in ``tf1_reference``.
    """

    def init(w):
        return np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)

    def step(w, e, state, lr):
        n, g, delta = state
        n = decay * n + (1 - decay) * e * e
        g = decay * g + (1 - decay) * e
        if lr_outside_buffer:
            delta = momentum * delta - e / np.sqrt(n - g * g + epsilon)
            return w + lr * delta, (n, g, delta)
        delta = momentum * delta - lr * e / np.sqrt(n - g * g + epsilon)
        return w + delta, (n, g, delta)

    return _run_reference(init, step, grads, params, rates)


def dqn2015_reference(grads, params, rates, *, decay=0.95, epsilon=0.01):
    """Mnih et al. (2015), Nature DQN; ``dqn/NeuralQLearner.lua`` (``qLearnMinibatch``).

    The Lua code, with dw accumulated by backpropagating the TD errors (minus the
    loss gradient), 0.95 the decay and 0.01 the epsilon::

        g  <- 0.95 g  + 0.05 dw
        g2 <- 0.95 g2 + 0.05 dw^2
        w  <- w + lr * dw / sqrt(g2 - g^2 + 0.01)

    In terms of the loss gradient d = -dw (g changes sign, g2 and g^2 do not)::

        g  <- decay g  + (1 - decay) d
        g2 <- decay g2 + (1 - decay) d^2
        w  <- w - lr * d / sqrt(g2 - g^2 + epsilon)
    """

    def init(w):
        return np.zeros_like(w), np.zeros_like(w)

    def step(w, d, state, lr):
        g, g2 = state
        g = decay * g + (1 - decay) * d
        g2 = decay * g2 + (1 - decay) * d * d
        return w - lr * d / np.sqrt(g2 - g * g + epsilon), (g, g2)

    return _run_reference(init, step, grads, params, rates)


def lasagne_reference(grads, params, rates, *, rho=0.9, epsilon=1e-6):
    """``lasagne.updates.rmsprop`` (``lasagne/updates.py``, Lasagne 0.2)::

    accu_new = rho * accu + (1 - rho) * grad ** 2
    param    = param - learning_rate * grad / sqrt(accu_new + epsilon)
    """

    def init(w):
        return np.zeros_like(w)

    def step(w, g, accu, lr):
        accu = rho * accu + (1 - rho) * g * g
        return w - lr * g / np.sqrt(accu + epsilon), accu

    return _run_reference(init, step, grads, params, rates)


def caffe_reference(grads, params, rates, *, rms_decay=0.99, delta=1e-8):
    """Caffe ``RMSPropSolver::ComputeUpdateValue`` (``src/caffe/solvers/rmsprop_solver.cpp``).

    With ``diff`` the gradient and ``local_rate`` the learning rate (times the
    layer's ``lr_mult``, 1 here)::

        history = rms_decay * history + (1 - rms_decay) * diff^2
        diff    = local_rate * diff / (sqrt(history) + delta)

    then ``Net::Update``: ``data = data - diff``.
    """

    def init(w):
        return np.zeros_like(w)

    def step(w, g, history, lr):
        history = rms_decay * history + (1 - rms_decay) * g * g
        return w - lr * g / (np.sqrt(history) + delta), history

    return _run_reference(init, step, grads, params, rates)


REFERENCES = {
    "tf1": tf1_reference,
    "sonnet2": sonnet2_reference,
    "graves2013": graves2013_reference,
    "dqn2015": dqn2015_reference,
    "lasagne": lasagne_reference,
    "caffe": caffe_reference,
}

_TF_CONFIGS = [
    ({"learning_rate": 0.01}, None),
    ({"learning_rate": 0.01, "momentum": 0.9}, None),
    ({"learning_rate": 0.01, "centered": True}, None),
    (
        {"learning_rate": 0.003, "decay": 0.8, "momentum": 0.5, "epsilon": 1e-6, "centered": True},
        None,
    ),
    ({"momentum": 0.9}, 0.02),
    ({"momentum": 0.9, "centered": True}, 0.01),
]
# preset -> [(the preset's kwargs, peak of the learning-rate schedule or None)]
REFERENCE_CONFIGS = {
    "tf1": _TF_CONFIGS,
    "sonnet2": _TF_CONFIGS,
    "graves2013": [
        ({}, None),
        ({"learning_rate": 1e-3, "momentum": 0.0}, None),
        ({"learning_rate": 3e-3, "decay": 0.9, "momentum": 0.5, "epsilon": 1e-3}, None),
        ({}, 1e-3),
    ],
    "dqn2015": [
        ({}, None),
        ({"learning_rate": 1e-3, "decay": 0.9, "epsilon": 1e-3}, None),
        ({}, 1e-3),
    ],
    "lasagne": [
        ({}, None),
        ({"learning_rate": 0.01, "rho": 0.5, "epsilon": 1e-3}, None),
        ({}, 0.05),
    ],
    "caffe": [
        ({"base_lr": 0.01}, None),
        ({"base_lr": 0.01, "rms_decay": 0.9, "delta": 1e-4}, None),
        ({}, 0.01),
    ],
}


def _reference_inputs(seed: int, peak: float | None):
    """Gradients, zero initial parameters (none of these presets reads them), rates."""
    config = {"seed": seed, "leaves": "real", "gradients": "random", "schedule": None}
    if peak is not None:
        config["schedule"] = {"peak": peak}
    grads = make_golden.make_gradients(config)
    params = {k: np.zeros(shape, dtype) for k, (shape, dtype) in make_golden.REAL_LEAVES.items()}
    return grads, params, make_golden.learning_rates(config)


def _reference_cases():
    cases = [(name, *case) for name, configs in REFERENCE_CONFIGS.items() for case in configs]
    for seed, (name, kwargs, peak) in enumerate(cases, start=5000):
        label = ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
        if peak is not None:
            label = f"schedule,{label}"
        yield pytest.param(name, kwargs, peak, seed, id=f"{name}:{label}")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs", "peak", "seed"), list(_reference_cases()))
def test_reference_loop(name, kwargs, peak, seed):
    grads, params, rates = _reference_inputs(seed, peak)
    ours = run_preset(name, kwargs, rates, params, grads)
    hyper = dict(kwargs)
    lr = hyper.pop(LEARNING_RATE_NAME[name], None)
    if lr is None:
        lr = inspect.signature(getattr(presets, name)).parameters[LEARNING_RATE_NAME[name]].default
    per_step = [float(r) for r in rates] if rates is not None else [float(lr)] * STEPS
    theirs = REFERENCES[name](grads, params, per_step, **hyper)
    assert_trajectories_close(
        ours, theirs, rtol=REFERENCE_RTOL, preset=name, source="reference", label=str(kwargs)
    )


@pytest.mark.parametrize("name", ["tf1", "graves2013"])
def test_schedule_enters_inside_the_momentum_buffer(name):
    """With a schedule and momentum, the placement of the learning rate shows.

    The preset matches the reference with the learning rate inside the buffer
    and misses, by far more than the tolerance, the one with it outside.
    (PyTorch's outside placement is covered by the golden schedule configs.)
    """
    kwargs, peak = {"momentum": 0.9}, 0.02
    grads, params, rates = _reference_inputs(7, peak)
    ours = run_preset(name, kwargs, rates, params, grads)
    per_step = [float(r) for r in rates]
    inside = REFERENCES[name](grads, params, per_step, momentum=0.9)
    outside = REFERENCES[name](grads, params, per_step, momentum=0.9, lr_outside_buffer=True)
    assert_trajectories_close(
        ours, inside, rtol=REFERENCE_RTOL, preset=name, source="reference", label="schedule"
    )
    assert differences(ours, outside, REFERENCE_RTOL).used > 100


# ----------------------------------------------------------------------------
# "First step for a unit gradient"
# ----------------------------------------------------------------------------

# Independent closed forms, with each preset's defaults, of |first update| / lr for
# a unit gradient: the first average of g^2 = 1 is (1 - decay) (TF1: decay * 1 +
# (1 - decay) = 1), the first average of g is (1 - decay).
FIRST_STEP = {
    "pytorch": 1 / (math.sqrt(1 - 0.99) + 1e-8),
    "keras": 1 / math.sqrt((1 - 0.9) + 1e-7),
    "tf1": 1 / math.sqrt(1.0 + 1e-10),
    "sonnet2": 1 / math.sqrt((1 - 0.9) + 1e-10),
    "graves2013": 1 / math.sqrt((1 - 0.95) - (1 - 0.95) ** 2 + 1e-4),
    "dqn2015": 1 / math.sqrt((1 - 0.95) - (1 - 0.95) ** 2 + 0.01),
    "lasagne": 1 / math.sqrt((1 - 0.9) + 1e-6),
    "caffe": 1 / (math.sqrt(1 - 0.99) + 1e-8),
}

_DOC_CLAIM = re.compile(
    r"First step for a unit gradient with the defaults:\s*:math:`[^`]*=\s*([0-9.]+)\\,"
)


def _table_claims() -> dict[str, str]:
    """``preset -> "first step / lr"`` from the table in the module docstring."""
    claims = {}
    for line in presets.__doc__.splitlines():
        fields = line.split()
        if fields and fields[0] in presets.__all__:
            claims[fields[0]] = fields[-1]
    return claims


def _matches(claim: str, value: float) -> bool:
    """Whether ``claim`` is ``value`` rounded to the digits it shows."""
    decimals = len(claim.split(".")[1]) if "." in claim else 0
    return f"{value:.{decimals}f}" == claim


@pytest.mark.parametrize("name", sorted(FIRST_STEP))
def test_first_step_for_a_unit_gradient(name):
    preset = getattr(presets, name)
    lr_name = LEARNING_RATE_NAME[name]
    default = inspect.signature(preset).parameters[lr_name].default
    lr = 1.0 if default is inspect.Parameter.empty else default
    tx = preset(**{lr_name: lr})
    params = jnp.zeros(3, jnp.float32)
    updates, _ = tx.update(jnp.ones(3, jnp.float32), tx.init(params), params)
    chex.assert_trees_all_close(
        updates / jnp.float32(lr), jnp.full(3, -FIRST_STEP[name], jnp.float32), rtol=1e-6
    )
    claimed = _DOC_CLAIM.findall(preset.__doc__)
    assert len(claimed) == 1, f"no single first-step claim in presets.{name}'s docstring"
    assert _matches(claimed[0], FIRST_STEP[name]), (name, claimed[0], FIRST_STEP[name])
    table = _table_claims()[name]
    assert _matches(table, FIRST_STEP[name]), (name, table, FIRST_STEP[name])


def test_table_lists_every_preset():
    assert sorted(_table_claims()) == sorted(presets.__all__) == sorted(FIRST_STEP)


# ----------------------------------------------------------------------------
# Report (keep last)
# ----------------------------------------------------------------------------


def test_report_worst_differences():
    """Prints, per preset and source, the configurations compared and the worst differences.

    ``relative``: over entries of at least 10% of their leaf's largest magnitude;
    ``abs/scale``: over all entries, relative to that magnitude; ``tol used``: the
    largest fraction of the tolerance any entry used.
    """
    if not WORST:
        pytest.skip("no trajectory comparison ran in this session")
    lines = [
        f"{'preset':<12}{'source':<11}{'configs':>8}{'relative':>11}{'abs/scale':>11}"
        f"{'tol used':>10}"
    ]
    for preset in sorted(WORST):
        for source, (count, relative, absolute, used) in sorted(WORST[preset].items()):
            lines.append(
                f"{preset:<12}{source:<11}{count:>8}{relative:>11.2e}{absolute:>11.2e}{used:>10.2f}"
            )
    print("\n" + "\n".join(lines))
