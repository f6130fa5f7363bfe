"""Errors in the user's own words: when built, when the step runs, in presets, at init.

* A concrete hyperparameter out of its range, a non-scalar one, a flag that is not a bool,
  Nesterov without momentum, or gradients whose tree differs from the parameters' fail
  with a message that names the argument and the value (or both tree structures).
* A hyperparameter known only when the step runs (a schedule's output, a value set through
  ``optax.inject_hyperparams``) is range-checked inside the compiled step: the error names
  the hyperparameter and the value, eagerly, under ``jax.jit``, ``vmap`` and ``lax.scan``.
* Every preset's validation error names the preset and its own argument (``alpha``,
  ``rho``, ``epsilon``, ``rms_decay``, ``delta``, ``lr``, ``base_lr``, ...).
* A parameter leaf that is neither floating nor complex is refused at ``init``, naming
  its path and dtype.

The allowed ranges are the documented ones: decays in [0, 1], momentum in [0, 1), eps,
learning rates, weight decay and initial_scale in [0, inf), all finite.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import CONFIGS

import rmsprop_jax
from rmsprop_jax import presets

# --- checked when the transform is built ---------------------------------------------------

BAD_ARGUMENTS = [
    ("decay", -0.1, "[0, 1]"),
    ("decay", 1.5, "[0, 1]"),
    ("decay", float("nan"), "[0, 1]"),
    ("eps", -1e-8, "[0, inf]"),
    ("momentum", 1.0, "[0, 1)"),
    ("momentum", -0.5, "[0, 1)"),
    ("learning_rate", -0.1, "[0, inf]"),
    ("initial_scale", -1.0, "[0, inf]"),
]


@pytest.mark.parametrize("name,value,interval", BAD_ARGUMENTS)
def test_out_of_range_hyperparameters_fail_at_construction(name, value, interval):
    kwargs = dict(learning_rate=0.1) | {name: value}
    with pytest.raises(
        ValueError, match=re.escape(f"`{name}` must be in {interval}, got {value!r}")
    ):
        rmsprop_jax.rmsprop(**kwargs)
    if name in ("decay", "eps", "initial_scale"):
        for factory in (rmsprop_jax.scale_by_rms, rmsprop_jax.scale_by_centered_rms):
            with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
                factory(**{name: value})
    if name == "decay":
        with pytest.raises(
            ValueError, match=re.escape(f"`decay` must be in [0, 1], got {value!r}")
        ):
            rmsprop_jax.bias_correction(value)


@pytest.mark.parametrize("name", ["learning_rate", "decay", "eps", "momentum", "initial_scale"])
def test_non_scalar_hyperparameters_fail_at_construction(name):
    kwargs = dict(learning_rate=0.1) | {name: jnp.full((2,), 0.5)}
    with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a scalar") + r".*\(2,\)"):
        rmsprop_jax.rmsprop(**kwargs)


@pytest.mark.parametrize(
    "name", ["centered", "nesterov", "eps_in_sqrt", "bias_correction", "learning_rate_in_momentum"]
)
@pytest.mark.parametrize("value", [1, "yes", np.bool_(True), None])
def test_non_bool_flags_fail_at_construction(name, value):
    with pytest.raises(
        ValueError, match=re.escape(f"`{name}` must be True or False, got {value!r}")
    ):
        rmsprop_jax.rmsprop(0.1, momentum=0.9, **{name: value})


@pytest.mark.parametrize("momentum", [None, 0, 0.0])
def test_nesterov_without_momentum_fails(momentum):
    with pytest.raises(ValueError, match="`nesterov=True` needs a `momentum`"):
        rmsprop_jax.rmsprop(0.1, momentum=momentum, nesterov=True)


def test_valid_edge_values_are_accepted():
    for decay in (0.0, 1.0, 0, 1, np.float32(0.5), jnp.asarray(0.5)):
        rmsprop_jax.rmsprop(0.0, decay, 0.0, momentum=0.0, initial_scale=0.0)
    rmsprop_jax.rmsprop(0.1, momentum=np.nextafter(np.float32(1), np.float32(0)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_update_tree_mismatch_shows_both_structures(config):
    # (In the chains, the scaling transform ahead of bias_correction does the check.)
    tx = config.build(0.9, 1e-8)
    state = tx.init({"w": jnp.zeros(3), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="structure") as info:
        tx.update({"w": jnp.zeros(3), "c": jnp.zeros(2)}, state)
    message = str(info.value)
    assert "'c'" in message and "'b'" in message  # both structures are shown
    with pytest.raises(ValueError, match=r"\['b'\].*shape \(3,\).*\(2,\).*nothing is broadcast"):
        tx.update({"w": jnp.zeros(3), "b": jnp.zeros(3)}, state)
    with pytest.raises(ValueError, match="nothing is broadcast"):
        tx.update({"w": jnp.zeros(3), "b": jnp.zeros(())}, state)


# --- run-time checks of traced hyperparameters ----------------------------------------------


def _fails_at_run_time(name: str, value: str):
    """The error a traced out-of-range value raises: a ValueError eagerly, or under jit a
    JaxRuntimeError carrying the ValueError's message."""
    pattern = re.escape(f"`{name}` must be ") + r"(in .*|finite), got " + re.escape(value)
    return pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=pattern)


def _step(tx, jit: bool):
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    updates, _ = update(jnp.ones(3), state, params)
    jax.block_until_ready(updates)


def _bad_decay_schedule(value: float):
    """A decay schedule that is fine at the first update and ``value`` from the second on."""
    return lambda count: jnp.where(count < 1, 0.9, value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("value,shown", [(1.5, "1.5"), (-0.25, "-0.25"), (math.nan, "nan")])
@pytest.mark.parametrize(
    "factory",
    [
        lambda d: rmsprop_jax.scale_by_rms(d),
        lambda d: rmsprop_jax.scale_by_centered_rms(d, bias_correction=True),
        lambda d: rmsprop_jax.bias_correction(d),
        lambda d: rmsprop_jax.rmsprop(0.1, d, momentum=0.9),
    ],
    ids=["scale_by_rms", "scale_by_centered_rms", "bias_correction", "rmsprop"],
)
def test_decay_schedule_out_of_range_fails_when_the_step_runs(factory, value, shown, jit):
    tx = factory(_bad_decay_schedule(value))
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    _, state = update(jnp.ones(3), state, params)  # decay 0.9: fine
    with _fails_at_run_time("decay", shown):
        updates, _ = update(jnp.ones(3), state, params)
        jax.block_until_ready(updates)


INJECTED = dict(learning_rate=0.1, decay=0.9, eps=1e-8, momentum=0.5)
BAD_INJECTED = [
    ("learning_rate", -0.1, "-0.1"),
    ("learning_rate", math.inf, "inf"),
    ("decay", 1.5, "1.5"),
    ("eps", -1e-3, "-0.001"),
    ("eps", math.nan, "nan"),
    ("momentum", 1.0, "1.0"),
    ("momentum", -0.5, "-0.5"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,value,shown", BAD_INJECTED)
def test_injected_hyperparameter_out_of_range_fails_when_the_step_runs(name, value, shown, jit):
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, centered=True)
    state = tx.init(jnp.zeros(3))
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    update = jax.jit(tx.update) if jit else tx.update
    with _fails_at_run_time(name, shown):
        updates, _ = update(jnp.ones(3), state)
        jax.block_until_ready(updates)


def test_injected_initial_scale_out_of_range_fails_at_init():
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(0.1, initial_scale=-1.0)
    with _fails_at_run_time("initial_scale", "-1.0"):
        jax.block_until_ready(jax.jit(tx.init)(jnp.zeros(3)))


def test_valid_injected_hyperparameters_pass_the_check_and_match():
    # In range (edges included), the checked step equals the unchecked one bit for bit.
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=0.0, decay=1.0, eps=0.0, momentum=0.0, centered=True
    )
    state = tx.init(jnp.zeros(3))
    checked = jax.jit(tx.update)(jnp.ones(3), state)
    with rmsprop_jax.runtime_checks(False):
        unchecked = jax.jit(tx.update)(jnp.ones(3), state)
    jax.tree.map(lambda a, b: assert_equal(a, b), checked, unchecked)


def assert_equal(a, b):
    assert jnp.array_equal(a, b, equal_nan=True), (a, b)


def _decay_sweep():
    """A function of one decay value, for vmap: one rmsprop step with that decay injected."""
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED)

    def run(decay):
        state = tx.init(jnp.zeros(3))
        state.hyperparams["decay"] = decay
        return tx.update(jnp.ones(3), state)[0]

    return run


def test_vmapped_sweep_checks_each_row():
    # A hyperparameter sweep under vmap: valid rows run; one bad row fails the batch,
    # and its value is the one reported.
    sweep = jax.jit(jax.vmap(_decay_sweep()))
    assert sweep(jnp.asarray([0.5, 0.9, 1.0])).shape == (3, 3)
    with _fails_at_run_time("decay", "1.25"):
        jax.block_until_ready(sweep(jnp.asarray([0.5, 1.25, 0.9])))


def test_vmapped_valid_sweep_never_calls_the_host(monkeypatch):
    # The check stays a conditional under vmap (its predicate is reduced over the batch),
    # not a select that would run the reporting callback on every step.
    from rmsprop_jax import _validation

    compiled = jax.jit(jax.vmap(_decay_sweep())).lower(jnp.asarray([0.5, 0.9])).compile()
    calls = []
    monkeypatch.setattr(_validation, "_check_number", lambda *args: calls.append(args))
    jax.block_until_ready(compiled(jnp.asarray([0.5, 0.9])))
    assert calls == []


def test_scanned_steps_fail_at_the_bad_step():
    tx = rmsprop_jax.rmsprop(lambda count: jnp.where(count < 5, 0.1, -0.1))

    def body(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    run = jax.jit(lambda s, g: jax.lax.scan(body, s, g))
    state = tx.init(jnp.zeros(2))
    run(state, jnp.ones((5, 2)))  # counts 0-4: fine
    with _fails_at_run_time("learning_rate", "-0.1"):
        jax.block_until_ready(run(state, jnp.ones((6, 2))))


def test_concrete_hyperparameters_add_no_run_time_check():
    # Checked when built, so the compiled step has no check at all (no cost). The check is
    # a conditional whose branch calls the host; the step's other conditional (the salts
    # of _opaque.runtime_values) has none.
    tx = rmsprop_jax.rmsprop(0.1, 0.9, centered=True, momentum=0.9, bias_correction=True)
    jaxpr = jax.make_jaxpr(tx.update)(jnp.ones(3), tx.init(jnp.zeros(3)))
    assert "debug_callback" not in str(jaxpr)
    injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED)
    jaxpr = jax.make_jaxpr(injected.update)(jnp.ones(3), injected.init(jnp.zeros(3)))
    assert str(jaxpr).count("debug_callback") >= 1


def test_runtime_checks_switch():
    # Off: the out-of-range value goes through (what the docstring says happens: a decay of
    # 1.5 gives nu = 1.5 nu - 0.5 g^2, here negative, and NaN updates) and no conditional
    # is traced. The switch is restored on leaving the block.
    tx = optax.inject_hyperparams(rmsprop_jax.scale_by_rms)(decay=0.9, eps=0.0)
    state = tx.init(jnp.zeros(1))
    state.hyperparams["decay"] = jnp.asarray(1.5, jnp.float32)
    with rmsprop_jax.runtime_checks(False):
        assert not rmsprop_jax.runtime_checks_enabled()
        jaxpr = jax.make_jaxpr(tx.update)(jnp.ones(1), state)
        assert "debug_callback" not in str(jaxpr)
        updates, _ = jax.jit(tx.update)(jnp.ones(1), state)
        assert bool(jnp.isnan(updates[0]))  # sqrt(-0.5) with eps = 0
    assert rmsprop_jax.runtime_checks_enabled()
    with pytest.raises(ValueError, match=re.escape("`enabled` must be True or False, got 1")):
        rmsprop_jax.runtime_checks(1)


# --- presets name their own arguments -------------------------------------------------------

PRESET_BAD_ARGUMENTS = [
    # (preset, kwargs, the argument named, the message's tail)
    ("pytorch", dict(alpha=1.5), "alpha", "must be in [0, 1], got 1.5."),
    ("pytorch", dict(alpha=-0.1), "alpha", "must be in [0, 1], got -0.1."),
    ("pytorch", dict(eps=-1.0), "eps", "must be in [0, inf], got -1.0."),
    ("pytorch", dict(lr=-1.0), "lr", "must be in [0, inf], got -1.0."),
    ("pytorch", dict(momentum=1.0), "momentum", "must be in [0, 1), got 1.0."),
    ("pytorch", dict(weight_decay=-0.1), "weight_decay", "must be in [0, inf], got -0.1."),
    ("pytorch", dict(centered=1), "centered", "must be True or False, got 1."),
    ("pytorch", dict(maximize="no"), "maximize", "must be True or False, got 'no'."),
    ("keras", dict(rho=-0.1), "rho", "must be in [0, 1], got -0.1."),
    ("keras", dict(epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("keras", dict(learning_rate=-1.0), "learning_rate", "must be in [0, inf], got -1.0."),
    ("keras", dict(momentum=2.0), "momentum", "must be in [0, 1), got 2.0."),
    ("keras", dict(centered=None), "centered", "must be True or False, got None."),
    ("tf1", dict(learning_rate=0.1, decay=1.1), "decay", "must be in [0, 1], got 1.1."),
    ("tf1", dict(learning_rate=0.1, epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("tf1", dict(learning_rate=-0.1), "learning_rate", "must be in [0, inf], got -0.1."),
    ("tf1", dict(learning_rate=0.1, momentum=1.0), "momentum", "must be in [0, 1), got 1.0."),
    ("sonnet2", dict(learning_rate=0.1, decay=2.0), "decay", "must be in [0, 1], got 2.0."),
    ("sonnet2", dict(learning_rate=0.1, epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("sonnet2", dict(learning_rate=-0.1), "learning_rate", "must be in [0, inf], got -0.1."),
    ("sonnet2", dict(learning_rate=0.1, momentum=1.0), "momentum", "must be in [0, 1), got 1.0."),
    ("graves2013", dict(decay=1.5), "decay", "must be in [0, 1], got 1.5."),
    ("graves2013", dict(epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("graves2013", dict(momentum=1.0), "momentum", "must be in [0, 1), got 1.0."),
    ("graves2013", dict(learning_rate=-1.0), "learning_rate", "must be in [0, inf], got -1.0."),
    ("dqn2015", dict(decay=-1.0), "decay", "must be in [0, 1], got -1.0."),
    ("dqn2015", dict(epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("dqn2015", dict(learning_rate=-1.0), "learning_rate", "must be in [0, inf], got -1.0."),
    ("lasagne", dict(rho=3.0), "rho", "must be in [0, 1], got 3.0."),
    ("lasagne", dict(epsilon=-1.0), "epsilon", "must be in [0, inf], got -1.0."),
    ("lasagne", dict(learning_rate=-1.0), "learning_rate", "must be in [0, inf], got -1.0."),
    ("caffe", dict(base_lr=1e-3, rms_decay=2.0), "rms_decay", "must be in [0, 1], got 2.0."),
    ("caffe", dict(base_lr=1e-3, delta=-1.0), "delta", "must be in [0, inf], got -1.0."),
    ("caffe", dict(base_lr=-1e-3), "base_lr", "must be in [0, inf], got -0.001."),
]


@pytest.mark.parametrize(
    "preset,kwargs,argument,tail",
    PRESET_BAD_ARGUMENTS,
    ids=[f"{p}-{next(iter(k.items()))[0]}-{a}" for p, k, a, _ in PRESET_BAD_ARGUMENTS],
)
def test_preset_errors_name_the_preset_and_its_own_argument(preset, kwargs, argument, tail):
    expected = f"`presets.{preset}`: `{argument}` {tail}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        getattr(presets, preset)(**kwargs)


def test_every_preset_range_check_is_tested():
    # Each numeric argument of each preset appears in the table above with a bad value.
    import inspect

    tested = {(p, a) for p, _, a, _ in PRESET_BAD_ARGUMENTS}
    for preset in presets.__all__:
        for name, parameter in inspect.signature(getattr(presets, preset)).parameters.items():
            if not isinstance(parameter.default, bool):
                assert (preset, name) in tested, f"presets.{preset}: `{name}` has no test"


def test_preset_schedule_out_of_range_names_the_preset_argument():
    tx = presets.pytorch(lr=lambda count: jnp.where(count < 1, 0.1, -0.5), alpha=0.9)
    with _fails_at_run_time("lr", "-0.5"):
        state = tx.init(jnp.zeros(2))
        _, state = jax.jit(tx.update)(jnp.ones(2), state)
        jax.block_until_ready(jax.jit(tx.update)(jnp.ones(2), state))


def test_transform_errors_keep_the_shared_names():
    # Outside a preset the messages are unchanged; rmsprop says it is rmsprop.
    with pytest.raises(ValueError, match=r"^`decay` must be in \[0, 1\], got 1\.5\.$"):
        rmsprop_jax.scale_by_rms(1.5)
    with pytest.raises(ValueError, match=r"^`rmsprop`: `decay` must be in \[0, 1\], got 1\.5\.$"):
        rmsprop_jax.rmsprop(0.1, 1.5)


# --- non-float parameters -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", "bool", "uint8"])
@pytest.mark.parametrize(
    "build,caller",
    [
        (lambda: rmsprop_jax.rmsprop(1e-3), "rmsprop"),
        (lambda: rmsprop_jax.scale_by_rms(), "scale_by_rms"),
        (lambda: rmsprop_jax.scale_by_centered_rms(), "scale_by_centered_rms"),
        (lambda: presets.keras(), "presets.keras"),
    ],
    ids=["rmsprop", "scale_by_rms", "scale_by_centered_rms", "keras"],
)
def test_non_float_parameter_is_refused_at_init_with_its_path(build, caller, dtype):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "step": jnp.ones(2, dtype)}}
    message = (
        f"`{caller}` optimizes floating and complex parameters only, but the parameter at "
        f"['dense']['step'] has dtype {dtype}."
    )
    with pytest.raises(TypeError, match=re.escape(message) + ".*optax.masked"):
        build().init(params)


def test_non_float_leaves_can_be_left_out_with_masked():
    # What the message recommends works: the int leaf passes through masked, untouched.
    params = {"w": jnp.ones(2), "step": jnp.ones(2, jnp.int32)}
    tx = optax.masked(rmsprop_jax.rmsprop(0.1), {"w": True, "step": False})
    updates, _ = tx.update({"w": jnp.ones(2), "step": jnp.zeros(2, jnp.int32)}, tx.init(params))
    assert updates["step"].dtype == jnp.int32
    assert bool(jnp.all(updates["w"] < 0))
