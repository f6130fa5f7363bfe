"""rmsprop_jax.interop: a run moved between PyTorch, Keras, optax and rmsprop_jax continues.

Each round trip trains ``N`` steps on one side, converts the state, and continues ``M``
steps on the other; the reference is the first side continuing the same ``M`` steps. The
gradients are a fixed, seeded sequence (PyTorch's weight decay adds its own term), fed
to the parameters of a small network: a convolution and a ``Linear`` layer, whose torch
weights (``(out, in, kh, kw)`` and ``(out, in)``) are transposed into Flax's layout
(``(kh, kw, in, out)`` and ``(in, out)``), so that ``convert`` is exercised. The worst
relative difference of each configuration is printed by the last test (``pytest -s``).
"""

from __future__ import annotations

import collections
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import OPTAX_CONFIGS, Tf1Reference, worker_env

import rmsprop_jax
from rmsprop_jax import interop, presets

os.environ.setdefault("KERAS_BACKEND", "jax")

N, M = 4, 4  # steps before and after the switch
RTOL = 1e-5  # float32 against float32, a different order of operations
# Flax's layout: an HWIO convolution kernel and an (in, out) dense kernel.
SHAPES = {"conv": {"kernel": (3, 3, 2, 3), "bias": (3,)}, "dense": {"kernel": (5, 4), "bias": (4,)}}
WORST: dict[str, float] = collections.defaultdict(float)


def _tree(fn):
    return jax.tree.map(fn, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def make_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    return _tree(lambda s: (0.5 * rng.standard_normal(s)).astype(np.float32))


def make_grads(steps: int, seed: int = 1):
    """Random signs, magnitudes log-uniform in [1e-3, 10], about 10% exact zeros."""
    rng = np.random.default_rng(seed)

    def leaf(shape):
        g = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-3, 1, size=shape)
        g[rng.random(shape) < 0.1] = 0.0
        return g.astype(np.float32)

    return [_tree(leaf) for _ in range(steps)]


def worst_relative(ours, theirs) -> float:
    """max |a - b| / max(|b|, 10% of the leaf's largest magnitude), over every leaf."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
        floor = 0.1 * max(float(np.max(np.abs(b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))))
    return worst


def check(label: str, ours, theirs) -> None:
    found = worst_relative(ours, theirs)
    WORST[label] = max(WORST[label], found)
    assert found <= RTOL, f"{label}: worst relative difference {found:.3g} > {RTOL}"


@functools.cache
def _jitted_step(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def jax_steps(tx, params, state, grads):
    step = _jitted_step(tx)
    params = jax.tree.map(jnp.asarray, params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


# --- PyTorch ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def to_torch_layout(a: np.ndarray) -> np.ndarray:
    """A Flax-layout array in PyTorch's layout (HWIO -> OIHW, (in, out) -> (out, in))."""
    return {4: lambda x: x.transpose(3, 2, 0, 1), 2: lambda x: x.T}.get(a.ndim, lambda x: x)(a)


def to_flax_layout(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_torch_layout`."""
    return {4: lambda x: x.transpose(2, 3, 1, 0), 2: lambda x: x.T}.get(a.ndim, lambda x: x)(a)


def from_torch_convert(array, torch_param, jax_leaf):
    del torch_param, jax_leaf
    return to_flax_layout(array)


def to_torch_convert(array, torch_param, jax_leaf):
    del torch_param, jax_leaf
    return to_torch_layout(array)


def torch_network(params):
    """A Conv2d and a Linear layer holding ``params`` (Flax layout), and their tree."""
    conv, dense = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(5, 4)
    tree = {
        "conv": {"kernel": conv.weight, "bias": conv.bias},
        "dense": {"kernel": dense.weight, "bias": dense.bias},
    }
    with torch.no_grad():
        for p, value in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            p.copy_(torch.from_numpy(np.array(to_torch_layout(np.asarray(value)))))
    return tree


def torch_params_as_flax(tree):
    return jax.tree.map(lambda p: to_flax_layout(p.detach().numpy().copy()), tree)


def torch_steps(optimizer, tree, grads):
    for g in grads:
        for p, leaf in zip(jax.tree.leaves(tree), jax.tree.leaves(g)):
            p.grad = torch.from_numpy(np.array(to_torch_layout(np.asarray(leaf))))
        optimizer.step()


TORCH_CONFIGS = {
    "defaults": dict(),
    "centered": dict(lr=0.01, centered=True),
    "momentum": dict(lr=0.01, momentum=0.9),
    "weight_decay": dict(lr=0.01, weight_decay=0.1),
    "maximize": dict(lr=0.01, maximize=True),
    "centered,momentum,wd,maximize": dict(
        lr=0.02, alpha=0.95, eps=1e-4, centered=True, momentum=0.5, weight_decay=0.05, maximize=True
    ),
    "two groups": "groups",
}


def make_torch_optimizer(name: str, tree):
    config = TORCH_CONFIGS[name]
    if config == "groups":
        groups = [
            {"params": list(tree["conv"].values()), "lr": 0.01, "alpha": 0.9, "momentum": 0.9},
            {"params": list(tree["dense"].values()), "lr": 0.03, "alpha": 0.99, "centered": True},
        ]
        return torch.optim.RMSprop(groups)
    return torch.optim.RMSprop(jax.tree.leaves(tree), **config)


def torch_transformation(name: str, params):
    """What ``from_torch`` builds for the configuration (for a run that starts in JAX)."""
    config = TORCH_CONFIGS[name]
    if config == "groups":
        return optax.multi_transform(
            {
                "group0": presets.pytorch(lr=0.01, alpha=0.9, momentum=0.9),
                "group1": presets.pytorch(lr=0.03, alpha=0.99, centered=True),
            },
            {
                "conv": {"kernel": "group0", "bias": "group0"},
                "dense": {"kernel": "group1", "bias": "group1"},
            },
        )
    return presets.pytorch(**config)


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_torch_run_continues_in_jax(name):
    params, grads = make_params(), make_grads(N + M)
    tree = torch_network(params)
    optimizer = make_torch_optimizer(name, tree)
    torch_steps(optimizer, tree, grads[:N])
    switch = torch_params_as_flax(tree)
    tx, state = interop.from_torch(optimizer, switch, tree, convert=from_torch_convert)
    ours, _ = jax_steps(tx, switch, state, grads[N:])
    torch_steps(optimizer, tree, grads[N:])
    check(f"torch->jax {name}", ours, torch_params_as_flax(tree))


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_jax_run_continues_in_torch(name):
    params, grads = make_params(), make_grads(N + M)
    tx = torch_transformation(name, params)
    switch, state = jax_steps(tx, params, tx.init(params), grads[:N])
    tree = torch_network(switch)
    optimizer = make_torch_optimizer(name, tree)
    interop.to_torch(state, optimizer, switch, tree, convert=to_torch_convert)
    torch_steps(optimizer, tree, grads[N:])
    ours, _ = jax_steps(tx, switch, state, grads[N:])
    check(f"jax->torch {name}", torch_params_as_flax(tree), ours)


def test_torch_round_trip_of_the_state_is_exact():
    params, grads = make_params(), make_grads(N)
    tree = torch_network(params)
    optimizer = make_torch_optimizer("centered,momentum,wd,maximize", tree)
    torch_steps(optimizer, tree, grads)
    before = {k: v.clone() for k, v in optimizer.state[tree["dense"]["kernel"]].items()}
    switch = torch_params_as_flax(tree)
    _, state = interop.from_torch(optimizer, switch, tree, convert=from_torch_convert)
    interop.to_torch(state, optimizer, switch, tree, convert=to_torch_convert)
    after = optimizer.state[tree["dense"]["kernel"]]
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].dtype == value.dtype and after[key].device == value.device, key


def test_torch_complex_parameter_round_trip():
    z0 = np.asarray([0.3 + 0.2j, -1.0 + 0.5j], np.complex64)
    grads = [{"z": np.asarray([1.0 - 2.0j, 0.5 + 0.1j], np.complex64) * (t + 1)} for t in range(4)]
    weight = torch.nn.Parameter(torch.from_numpy(z0.copy()))
    optimizer = torch.optim.RMSprop([weight], lr=0.01, centered=True, momentum=0.9)
    for g in grads[:2]:
        weight.grad = torch.from_numpy(g["z"].copy())
        optimizer.step()
    params = {"z": jnp.asarray(weight.detach().numpy())}
    tx, state = interop.from_torch(optimizer, params, {"z": weight})
    ours, _ = jax_steps(tx, params, state, grads[2:])
    for g in grads[2:]:
        weight.grad = torch.from_numpy(g["z"].copy())
        optimizer.step()
    check("torch->jax complex", ours, {"z": weight.detach().numpy()})


# --- Keras ------------------------------------------------------------------------------------

KERAS_CONFIGS = {
    "defaults": dict(learning_rate=0.01),
    "centered": dict(learning_rate=0.01, centered=True),
    "momentum": dict(learning_rate=0.01, momentum=0.9),
    "centered,momentum": dict(
        learning_rate=0.005, rho=0.95, epsilon=1e-5, centered=True, momentum=0.5
    ),
}


@pytest.fixture(scope="module")
def keras():
    module = pytest.importorskip("keras")
    if module.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {module.backend.backend()!r}, not the JAX backend")
    return module


def keras_network(keras, params):
    """A Conv2D and a Dense layer holding ``params`` (their layout is Flax's)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        conv, dense = keras.layers.Conv2D(3, 3), keras.layers.Dense(4)
        conv.build((None, 6, 6, 2))
        dense.build((None, 5))
        tree = {
            "conv": {"kernel": conv.kernel, "bias": conv.bias},
            "dense": {"kernel": dense.kernel, "bias": dense.bias},
        }
        for variable, value in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            variable.assign(np.asarray(value))
    return tree


def keras_steps(optimizer, tree, grads):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for g in grads:
            optimizer.apply_gradients(
                [
                    (jnp.asarray(leaf), v)
                    for leaf, v in zip(jax.tree.leaves(g), jax.tree.leaves(tree))
                ]
            )


def keras_values(tree):
    return jax.tree.map(lambda v: np.array(v.value), tree)


@pytest.mark.parametrize("name", list(KERAS_CONFIGS))
def test_keras_run_continues_in_jax(keras, name):
    params, grads = make_params(), make_grads(N + M)
    tree = keras_network(keras, params)
    optimizer = keras.optimizers.RMSprop(**KERAS_CONFIGS[name])
    keras_steps(optimizer, tree, grads[:N])
    switch = keras_values(tree)
    tx, state = interop.from_keras(optimizer, switch, tree)
    ours, _ = jax_steps(tx, switch, state, grads[N:])
    keras_steps(optimizer, tree, grads[N:])
    check(f"keras->jax {name}", ours, keras_values(tree))


@pytest.mark.parametrize("name", list(KERAS_CONFIGS))
def test_jax_run_continues_in_keras(keras, name):
    params, grads = make_params(), make_grads(N + M)
    tx = presets.keras(**KERAS_CONFIGS[name])
    switch, state = jax_steps(tx, params, tx.init(params), grads[:N])
    tree = keras_network(keras, switch)
    optimizer = keras.optimizers.RMSprop(**KERAS_CONFIGS[name])
    interop.to_keras(state, optimizer, switch, tree)  # builds the optimizer
    assert int(optimizer.iterations) == N
    keras_steps(optimizer, tree, grads[N:])
    ours, _ = jax_steps(tx, switch, state, grads[N:])
    check(f"jax->keras {name}", keras_values(tree), ours)


# --- optax ------------------------------------------------------------------------------------

# Every configuration optax.rmsprop shares with rmsprop_jax.rmsprop (helpers.OPTAX_CONFIGS);
# a constant rate and a schedule alternate through them.


def _optax_id(i_config):
    i, config = i_config
    return "-".join(f"{k}={v}" for k, v in config.items()) + ("-schedule" if i % 2 else "")


def _optax_run(tx, params, state, grads):
    # Eagerly: every configuration shares the per-operation compilations.
    with jax.numpy_dtype_promotion("standard"):  # optax computes decay**count int/float
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("i_config", list(enumerate(OPTAX_CONFIGS)), ids=_optax_id)
def test_optax_both_directions(i_config):
    i, config = i_config
    rate = optax.exponential_decay(0.03, 2, 0.7) if i % 2 else 0.03
    kwargs = dict(learning_rate=rate, decay=0.9, eps=1e-6, **config)
    params = {"w": jnp.asarray(make_params()["dense"]["kernel"]), "b": jnp.zeros(4)}
    grads = [{"w": g["dense"]["kernel"], "b": g["dense"]["bias"]} for g in make_grads(N + M)]
    theirs_tx, ours_tx = optax.rmsprop(**kwargs), rmsprop_jax.rmsprop(**kwargs)
    with jax.numpy_dtype_promotion("standard"):
        theirs_state = theirs_tx.init(params)
    switch_theirs, theirs_state = _optax_run(theirs_tx, params, theirs_state, grads[:N])
    switch_ours, ours_state = _optax_run(ours_tx, params, ours_tx.init(params), grads[:N])
    # optax -> rmsprop_jax, against optax continuing.
    converted = interop.from_optax(theirs_state, params, **kwargs)
    ours, _ = _optax_run(ours_tx, switch_theirs, converted, grads[N:])
    theirs, _ = _optax_run(theirs_tx, switch_theirs, theirs_state, grads[N:])
    check("optax->rmsprop_jax", ours, theirs)
    # rmsprop_jax -> optax, against rmsprop_jax continuing.
    back = interop.to_optax(ours_state, params, **kwargs)
    assert jax.tree.structure(back) == jax.tree.structure(theirs_state)
    theirs, _ = _optax_run(theirs_tx, switch_ours, back, grads[N:])
    ours, _ = _optax_run(ours_tx, switch_ours, ours_state, grads[N:])
    check("rmsprop_jax->optax", theirs, ours)


# --- TF1 (no TensorFlow: a float64 loop of its kernels, helpers.Tf1Reference) ----------------

TF1_CONFIGS = {
    "defaults": dict(learning_rate=0.01),
    "momentum": dict(learning_rate=0.01, momentum=0.9),
    "centered": dict(learning_rate=0.01, centered=True),
    "centered,momentum": dict(
        learning_rate=0.003, decay=0.8, momentum=0.5, epsilon=1e-6, centered=True
    ),
    "schedule,momentum": dict(
        learning_rate=optax.linear_schedule(0.02, 0.002, N + M), momentum=0.9, centered=True
    ),
}


def _tf1_rate(kwargs, t):
    rate = kwargs["learning_rate"]
    return float(rate(t)) if callable(rate) else rate


def _tf1_settings(kwargs):
    return {k: v for k, v in kwargs.items() if k != "learning_rate"}


def _as_float32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


@pytest.mark.parametrize("name", list(TF1_CONFIGS))
def test_tf1_run_continues_in_jax(name):
    kwargs = TF1_CONFIGS[name]
    params, grads = make_params(), make_grads(N + M)
    tf1 = Tf1Reference(params, **_tf1_settings(kwargs))
    for t in range(N):
        tf1.step(grads[t], _tf1_rate(kwargs, t))
    switch, slots = _as_float32(tf1.params), _as_float32(tf1.slots)  # as TF1 holds them
    state = interop.from_tf1(slots, switch, step=N, **kwargs)
    ours, _ = jax_steps(presets.tf1(**kwargs), switch, state, grads[N:])
    tf1 = Tf1Reference(switch, **_tf1_settings(kwargs), slots=slots)
    for t in range(N, N + M):
        tf1.step(grads[t], _tf1_rate(kwargs, t))
    check(f"tf1->jax {name}", ours, tf1.params)


@pytest.mark.parametrize("name", list(TF1_CONFIGS))
def test_jax_run_continues_in_tf1(name):
    kwargs = TF1_CONFIGS[name]
    params, grads = make_params(), make_grads(N + M)
    tx = presets.tf1(**kwargs)
    switch, state = jax_steps(tx, params, tx.init(params), grads[:N])
    slots = interop.to_tf1(state, switch, **kwargs)
    assert set(slots) == {"rms", "momentum"} | ({"mg"} if kwargs.get("centered") else set())
    assert int(state[0].count) == N  # TF1's global_step
    tf1 = Tf1Reference(switch, **_tf1_settings(kwargs), slots=slots)
    for t in range(N, N + M):
        tf1.step(grads[t], _tf1_rate(kwargs, t))
    ours, _ = jax_steps(tx, switch, state, grads[N:])
    check(f"jax->tf1 {name}", tf1.params, ours)


def test_tf1_round_trip_of_the_slots_is_exact():
    kwargs = TF1_CONFIGS["centered,momentum"]
    params, grads = make_params(), make_grads(N)
    tf1 = Tf1Reference(params, **_tf1_settings(kwargs))
    for t in range(N):
        tf1.step(grads[t], _tf1_rate(kwargs, t))
    slots = _as_float32(tf1.slots)
    back = interop.to_tf1(interop.from_tf1(slots, params, **kwargs), params, **kwargs)
    for name in slots:
        for a, b in zip(jax.tree.leaves(back[name]), jax.tree.leaves(slots[name])):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_tf1_bad_input():
    params = make_params()
    ones = jax.tree.map(np.ones_like, params)
    with pytest.raises(ValueError, match=r"`slots` has no 'mg', which the settings need"):
        interop.from_tf1({"rms": ones}, params, learning_rate=0.1, centered=True)
    with pytest.raises(ValueError, match=r"`slots` has no 'momentum'"):
        interop.from_tf1({"rms": ones}, params, learning_rate=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"\['rmsprop'\], which are not slots of TF1's"):
        interop.from_tf1({"rms": ones, "rmsprop": ones}, params, learning_rate=0.1)
    wrong = {"rms": dict(ones, dense={"kernel": np.ones((4, 5)), "bias": np.ones(4)})}
    with pytest.raises(
        ValueError,
        match=r"slot 'rms' of leaf \['dense'\]\['kernel'\] has shape \(4, 5\), "
        r"the parameter \(5, 4\)",
    ):
        interop.from_tf1(wrong, params, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`slots\['rms'\]` must have the tree structure"):
        interop.from_tf1({"rms": {"conv": ones["conv"]}}, params, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"a learning-rate schedule needs `step`"):
        interop.from_tf1({"rms": ones}, params, learning_rate=optax.constant_schedule(0.1))
    with pytest.raises(TypeError, match=r"`slots` must be a mapping of slot names to trees"):
        interop.from_tf1([ones], params, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"rho"):
        interop.from_tf1({"rms": ones}, params, learning_rate=0.1, rho=0.9)
    with pytest.raises(ValueError, match=r"does not have the layout of presets.tf1\(centered=True"):
        interop.to_tf1(presets.tf1(0.1).init(params), params, learning_rate=0.1, centered=True)


# --- bad input --------------------------------------------------------------------------------


def _stepped_torch(name="defaults", steps=1):
    params = make_params()
    tree = torch_network(params)
    optimizer = make_torch_optimizer(name, tree)
    torch_steps(optimizer, tree, make_grads(steps))
    return torch_params_as_flax(tree), tree, optimizer


def test_from_torch_refuses_another_optimizer():
    params = make_params()
    tree = torch_network(params)
    optimizer = torch.optim.SGD(jax.tree.leaves(tree), lr=0.1)
    with pytest.raises(
        TypeError, match=r"`optimizer` must be a torch.optim.RMSprop, got torch.optim.sgd.SGD"
    ):
        interop.from_torch(optimizer, params, tree)


def test_from_torch_names_a_parameter_the_optimizer_lacks():
    params, tree, optimizer = _stepped_torch()
    tree["dense"]["bias"] = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(
        ValueError, match=r"leaf \['dense'\]\['bias'\] \(shape \(4,\)\) is not a parameter"
    ):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)


def test_from_torch_names_an_optimizer_parameter_missing_from_the_tree():
    params, tree, optimizer = _stepped_torch()
    del tree["dense"], params["dense"]
    with pytest.raises(
        ValueError, match=r"param group 0 holds a parameter \(index 2, shape \(4,\)\)"
    ):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)


def test_from_torch_names_a_parameter_without_state():
    params = make_params()
    tree = torch_network(params)
    optimizer = torch.optim.RMSprop(jax.tree.leaves(tree))
    with pytest.raises(ValueError, match=r"leaf \['conv'\]\['bias'\]: `optimizer` holds no state"):
        interop.from_torch(optimizer, params, tree)


def test_from_torch_names_a_leaf_whose_shape_differs():
    params, tree, optimizer = _stepped_torch()
    with pytest.raises(
        ValueError,
        match=r"square_avg of leaf \['conv'\]\['kernel'\] has shape \(3, 2, 3, 3\), "
        r"expected \(3, 3, 2, 3\); pass `convert`",
    ):
        interop.from_torch(optimizer, params, tree)


def test_from_torch_refuses_a_state_from_other_settings():
    params, tree, optimizer = _stepped_torch()
    optimizer.param_groups[0]["centered"] = True  # after stepping without it
    with pytest.raises(
        ValueError, match=r"leaf \['conv'\]\['bias'\]: the optimizer's state has no 'grad_avg'"
    ):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)


def test_from_torch_refuses_parameters_that_stepped_apart():
    params, tree, optimizer = _stepped_torch()
    tree["conv"]["bias"].grad = None  # PyTorch skips it at the next step
    optimizer.step()
    with pytest.raises(ValueError, match=r"share one step count.*\['conv'\]\['bias'\]: \(1,"):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)


def test_from_torch_names_a_tree_of_another_structure():
    params, tree, optimizer = _stepped_torch()
    del tree["conv"]["bias"]
    with pytest.raises(
        ValueError, match=r"`torch_params` must have the tree structure of `params`"
    ):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)


def test_to_torch_refuses_a_state_of_another_configuration():
    params = make_params()
    tx = presets.pytorch(centered=True)
    tree = torch_network(params)
    optimizer = torch.optim.RMSprop(jax.tree.leaves(tree))
    with pytest.raises(
        ValueError, match=r"does not have the layout of presets.pytorch\(lr=0.01.*centered=False"
    ):
        interop.to_torch(tx.init(params), optimizer, params, tree, convert=to_torch_convert)
    assert not optimizer.state  # nothing written


def test_to_torch_names_a_leaf_whose_shape_differs():
    params = make_params()
    tx = presets.pytorch()
    tree = torch_network(params)
    optimizer = torch.optim.RMSprop(jax.tree.leaves(tree))
    with pytest.raises(
        ValueError,
        match=r"nu of leaf \['conv'\]\['kernel'\] has shape \(3, 3, 2, 3\), "
        r"expected \(3, 2, 3, 3\)",
    ):
        interop.to_torch(tx.init(params), optimizer, params, tree)
    assert not optimizer.state


def test_torch_refuses_a_parameter_given_twice():
    params, tree, optimizer = _stepped_torch()
    tree["dense"]["bias"] = tree["conv"]["bias"]
    params["dense"]["bias"] = params["conv"]["bias"]
    match = r"leaves \['conv'\]\['bias'\] and \['dense'\]\['bias'\] are the same torch parameter"
    with pytest.raises(ValueError, match=match):
        interop.from_torch(optimizer, params, tree, convert=from_torch_convert)
    before = {k: v.clone() for k, v in optimizer.state[tree["conv"]["bias"]].items()}
    _, state = jax_steps(presets.pytorch(), params, presets.pytorch().init(params), [])
    with pytest.raises(ValueError, match=match):
        interop.to_torch(state, optimizer, params, tree, convert=to_torch_convert)
    after = optimizer.state[tree["conv"]["bias"]]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing written


def test_from_torch_complex_parameter_needs_complex_leaves():
    z0 = np.asarray([0.3 + 0.2j, -1.0 + 0.5j], np.complex64)
    weight = torch.nn.Parameter(torch.from_numpy(z0.copy()))
    optimizer = torch.optim.RMSprop([weight], lr=0.01)
    weight.grad = torch.from_numpy(np.asarray([1.0 - 2.0j, 0.5 + 0.1j], np.complex64))
    optimizer.step()
    # A real JAX leaf for the complex parameter: its statistic would lose the imaginary part.
    with pytest.raises(
        ValueError,
        match=r"^`from_torch`: nu of leaf \['z'\]: got a complex array of dtype complex64 "
        r"for a real statistic of dtype float32\.$",
    ):
        interop.from_torch(optimizer, {"z": jnp.real(jnp.asarray(z0))}, {"z": weight})
    # A complex leaf whose statistic `convert` made real.
    with pytest.raises(
        ValueError,
        match=r"nu of leaf \['z'\]: the state keeps real and imaginary parts of a complex "
        r"parameter, got a real array of dtype float32",
    ):
        interop.from_torch(
            optimizer, {"z": jnp.asarray(z0)}, {"z": weight}, convert=lambda a, p, x: a.real
        )


def test_keras_bad_input(keras):
    params = make_params()
    tree = keras_network(keras, params)
    with pytest.raises(
        TypeError, match=r"must be a keras.optimizers.RMSprop, got keras.src.optimizers.sgd.SGD"
    ):
        interop.from_keras(keras.optimizers.SGD(), params, tree)
    with pytest.raises(ValueError, match=r"`from_keras`: `optimizer` has not been built"):
        interop.from_keras(keras.optimizers.RMSprop(), params, tree)
    with pytest.raises(ValueError, match=r"sets `weight_decay=0.1`, which presets.keras does not"):
        interop.from_keras(keras.optimizers.RMSprop(weight_decay=0.1), params, tree)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    with pytest.raises(ValueError, match=r"learning rate is a schedule \(ExponentialDecay\)"):
        interop.from_keras(keras.optimizers.RMSprop(schedule), params, tree)
    optimizer = keras.optimizers.RMSprop(momentum=0.9)
    keras_steps(optimizer, tree, make_grads(1))
    other = keras_network(keras, params)
    tree["dense"]["bias"] = other["dense"]["bias"]
    with pytest.raises(
        ValueError, match=r"leaf \['dense'\]\['bias'\] \(.*, shape \(4,\)\) is not a variable"
    ):
        interop.from_keras(optimizer, params, tree)
    with pytest.raises(
        ValueError, match=r"does not have the layout of presets.keras\(.*momentum=0.9"
    ):
        interop.to_keras(presets.keras().init(params), optimizer, params, tree)


def test_keras_refuses_variables_missing_from_the_tree_or_given_twice(keras):
    params = make_params()
    tree = keras_network(keras, params)
    optimizer = keras.optimizers.RMSprop()
    keras_steps(optimizer, tree, make_grads(1))
    conv_params, conv_tree = {"conv": params["conv"]}, {"conv": tree["conv"]}
    with pytest.raises(
        ValueError, match=r"`optimizer` tracks 4 variables and `keras_variables` names 2 of them"
    ):
        interop.from_keras(optimizer, conv_params, conv_tree)
    state = presets.keras().init(conv_params)
    with pytest.raises(ValueError, match=r"tracks 4 variables and `keras_variables` names 2"):
        interop.to_keras(state, optimizer, conv_params, conv_tree)
    tree["dense"]["bias"] = tree["conv"]["bias"]
    params["dense"]["bias"] = params["conv"]["bias"]
    with pytest.raises(
        ValueError,
        match=r"leaves \['conv'\]\['bias'\] and \['dense'\]\['bias'\] are the same Keras "
        r"variable",
    ):
        interop.from_keras(optimizer, params, tree)


def test_optax_bad_input():
    params = {"w": jnp.zeros((2, 3))}
    with pytest.raises(
        TypeError, match=r"`learning_rate_in_momentum` is not an argument that optax.rmsprop"
    ):
        interop.from_optax(
            optax.rmsprop(0.1).init(params),
            params,
            learning_rate=0.1,
            learning_rate_in_momentum=False,
        )
    with pytest.raises(TypeError, match=r"`learning_rate` is required"):
        interop.to_optax(rmsprop_jax.rmsprop(0.1).init(params), params)
    with pytest.raises(
        ValueError, match=r"`optax_state` does not have the layout of optax.rmsprop\(centered=False"
    ):
        interop.from_optax(
            optax.rmsprop(0.1, centered=True).init(params),
            params,
            learning_rate=0.1,
            centered=False,
        )
    wrong = optax.rmsprop(0.1).init({"w": jnp.zeros((3, 2))})
    with pytest.raises(
        ValueError, match=r"leaf \[0\]\.nu\['w'\] has shape \(3, 2\), expected \(2, 3\)"
    ):
        interop.from_optax(wrong, params, learning_rate=0.1)
    with pytest.raises(
        ValueError,
        match=r"does not have the layout of rmsprop_jax.rmsprop\(learning_rate=0.1, momentum=0.9\)",
    ):
        interop.to_optax(
            rmsprop_jax.rmsprop(0.1).init(params), params, learning_rate=0.1, momentum=0.9
        )
    kwargs = dict(learning_rate=0.1, centered=True, bias_correction=True)
    with pytest.raises(ValueError, match=r"first step of optax.rmsprop differs"):
        interop.to_optax(rmsprop_jax.rmsprop(**kwargs).init(params), params, **kwargs)


# --- storage: quantized and narrow statistics, packed states ---------------------------------

QUANTIZED = rmsprop_jax.quantized(min_size=0, block_size=4)


def dequantized(state, code_map="float"):
    """``state`` with each quantized statistic as its float32 values (the documented recipe)."""
    return jax.tree.map(
        lambda x: (
            rmsprop_jax.dequantize(x, code_map) if isinstance(x, rmsprop_jax.QuantizedArray) else x
        ),
        state,
        is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedArray),
    )


def _stored(tree):
    return jax.tree.map(
        lambda x: np.asarray(rmsprop_jax.dequantize(x) if isinstance(x, tuple) else x, np.float64),
        tree,
        is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedArray),
    )


@pytest.mark.parametrize("storage", ["bfloat16", pytest.param("quantized", marks=pytest.mark.slow)])
def test_optax_state_into_and_out_of_narrow_storage(storage):
    fmt = QUANTIZED if storage == "quantized" else jnp.bfloat16
    shared = dict(learning_rate=0.03, decay=0.9, eps=1e-6, centered=True, momentum=0.9)
    kwargs = dict(**shared, nu_dtype=fmt, mu_dtype=fmt, momentum_dtype=fmt)
    params = {"w": jnp.asarray(make_params()["dense"]["kernel"]), "b": jnp.zeros(4)}
    grads = [{"w": g["dense"]["kernel"], "b": g["dense"]["bias"]} for g in make_grads(N + M)]
    theirs_tx, ours_tx = optax.rmsprop(**shared), rmsprop_jax.rmsprop(**kwargs)
    with jax.numpy_dtype_promotion("standard"):
        theirs_state = theirs_tx.init(params)
    switch, theirs_state = _optax_run(theirs_tx, params, theirs_state, grads[:N])

    # optax -> narrow storage: each value rounded to the nearest stored value.
    converted = interop.from_optax(theirs_state, params, **kwargs)
    assert jax.tree.structure(converted) == jax.tree.structure(ours_tx.init(params))
    for field, theirs in [
        ("nu", theirs_state[0].nu),
        ("mu", theirs_state[0].mu),
        ("trace", theirs_state[2].trace),
    ]:
        ours = _stored(optax.tree.get(converted, field))
        for key in params:
            x = np.asarray(theirs[key], np.float64)
            error = np.abs(ours[key] - x)
            if storage == "bfloat16":  # to nearest: half an ulp, 8 significant bits
                assert np.all(error <= 2.0**-8 * np.abs(x)), (field, key)
            else:  # float map: relative gaps of 2**-3, nearest of two neighbours
                bound = 2.0**-4 * np.abs(x) + 2.0**-16 * np.max(np.abs(x))
                assert np.all(error <= bound), (field, key, np.max(error / (bound + 1e-30)))
    # Not exact beyond that rounding, but the run continues on its course: far closer to
    # optax's continuation than a restart with a fresh state.
    theirs, _ = _optax_run(theirs_tx, switch, theirs_state, grads[N:])
    ours, _ = jax_steps(ours_tx, switch, converted, grads[N:])
    fresh, _ = jax_steps(ours_tx, switch, ours_tx.init(params), grads[N:])
    assert worst_relative(ours, theirs) < 0.1 * worst_relative(fresh, theirs)

    # narrow storage -> optax: the values stored, widened exactly; optax then continues
    # what a float32 rmsprop_jax run from the same values does.
    _, state = jax_steps(ours_tx, params, ours_tx.init(params), grads[:N])
    back = interop.to_optax(state, params, **kwargs)
    assert jax.tree.structure(back) == jax.tree.structure(theirs_state)
    for field, tree in [("nu", back[0].nu), ("mu", back[0].mu), ("trace", back[2].trace)]:
        for key, value in _stored(optax.tree.get(state, field)).items():
            assert tree[key].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(tree[key], np.float64), value)
    as_float = rmsprop_jax.rmsprop(**shared)
    widened = jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, dequantized(state)
    )
    theirs, _ = _optax_run(theirs_tx, switch, back, grads[N:])
    ours, _ = jax_steps(as_float, switch, widened, grads[N:])
    check(f"{storage} rmsprop_jax->optax", theirs, ours)


def test_optax_quantized_state_needs_its_format():
    kwargs = dict(learning_rate=0.1, centered=True)
    params = {"w": jnp.zeros((2, 8))}
    state = rmsprop_jax.rmsprop(**kwargs, nu_dtype=QUANTIZED).init(params)
    with pytest.raises(
        ValueError,
        match=r"`to_optax`: `opt_state` holds a quantized nu at \[0\]\.nu\['w'\] "
        r"\(rmsprop_jax.QuantizedArray\); pass the `nu_dtype=rmsprop_jax.quantized\(...\)`",
    ):
        interop.to_optax(state, params, **kwargs)
    theirs = optax.rmsprop(**kwargs).init(params)
    theirs = theirs[:1] + theirs[1:]
    bad = (theirs[0]._replace(nu={"w": jnp.full((2, 8), jnp.inf)}), *theirs[1:])
    with pytest.raises(
        ValueError, match=r"nu of leaf \['w'\]: 16 non-finite values, which a quantized"
    ):
        interop.from_optax(bad, params, **kwargs, nu_dtype=QUANTIZED)


@pytest.mark.slow
def test_torch_and_keras_refuse_quantized_statistics(keras):
    # presets.pytorch's state with a quantized nu, as a run with quantized storage has.
    params, grads = make_params(), make_grads(N + M)
    tx = presets.pytorch(lr=0.01)
    _, state = jax_steps(tx, params, tx.init(params), grads[:N])
    quantized_nu = rmsprop_jax.scale_by_rms(nu_dtype=QUANTIZED).init(params).nu
    quantized_state = optax.tree.set(state, nu=quantized_nu)
    tree = torch_network(params)
    optimizer = make_torch_optimizer("defaults", tree)
    with pytest.raises(
        ValueError,
        match=r"`to_torch`: `opt_state` holds quantized statistics .*the first is nu at "
        r".*\['conv'\]\['bias'\]\); presets.pytorch keeps floating-point statistics",
    ):
        interop.to_torch(quantized_state, optimizer, params, tree, convert=to_torch_convert)
    assert not optimizer.state
    # The recipe in the message gives a state that converts, holding the values stored.
    interop.to_torch(
        dequantized(quantized_state), optimizer, params, tree, convert=to_torch_convert
    )
    # (zeros, as stored in quantized_nu: the float state's nu after N steps is not)
    assert float(optimizer.state[tree["conv"]["bias"]]["square_avg"].max()) == 0.0

    # Keras: a JAX run with a quantized nu; refused, then continued after dequantizing.
    kwargs = dict(learning_rate=0.01, rho=0.9, epsilon=1e-7)
    ours_tx = rmsprop_jax.rmsprop(0.01, 0.9, 1e-7, nu_dtype=QUANTIZED)
    switch, state = jax_steps(ours_tx, params, ours_tx.init(params), grads[:N])
    tree = keras_network(keras, switch)
    optimizer = keras.optimizers.RMSprop(**kwargs)
    with pytest.raises(ValueError, match=r"`to_keras`: .*presets.keras keeps floating-point"):
        interop.to_keras(state, optimizer, switch, tree)
    assert not optimizer.built
    interop.to_keras(dequantized(state), optimizer, switch, tree)
    keras_steps(optimizer, tree, grads[N:])
    ours, _ = jax_steps(presets.keras(**kwargs), switch, dequantized(state), grads[N:])
    check("quantized jax->keras (dequantized)", keras_values(tree), ours)


def test_packed_states_are_refused(keras):
    params = make_params()
    match = r"is \(or holds\) the state of rmsprop_jax.pack_small_leaves, whose statistics"
    packed = rmsprop_jax.pack_small_leaves(presets.pytorch()).init(params)
    tree = torch_network(params)
    optimizer = torch.optim.RMSprop(jax.tree.leaves(tree))
    with pytest.raises(ValueError, match=r"`to_torch`: `opt_state` " + match):
        interop.to_torch(packed, optimizer, params, tree, convert=to_torch_convert)
    assert not optimizer.state
    packed = rmsprop_jax.pack_small_leaves(presets.keras()).init(params)
    optimizer = keras.optimizers.RMSprop()
    with pytest.raises(ValueError, match=r"`to_keras`: `opt_state` " + match):
        interop.to_keras(packed, optimizer, params, keras_network(keras, params))
    assert not optimizer.built
    # Inside a chain too.
    packed = optax.chain(
        optax.clip(1.0), rmsprop_jax.pack_small_leaves(rmsprop_jax.rmsprop(0.1))
    ).init(params)
    with pytest.raises(ValueError, match=r"`to_optax`: `opt_state` " + match):
        interop.to_optax(packed, params, learning_rate=0.1)
    packed = rmsprop_jax.pack_small_leaves(presets.tf1(0.1)).init(params)
    with pytest.raises(ValueError, match=r"`to_tf1`: `opt_state` " + match):
        interop.to_tf1(packed, params, learning_rate=0.1)
    packed = rmsprop_jax.pack_small_leaves(optax.rmsprop(0.1)).init(params)
    with pytest.raises(ValueError, match=r"`from_optax`: `optax_state` " + match):
        interop.from_optax(packed, params, learning_rate=0.1)


def test_importing_the_library_imports_neither_torch_nor_keras():
    code = (
        "import sys, rmsprop_jax, rmsprop_jax.interop\n"
        "loaded = [m for m in ('torch', 'keras', 'tensorflow') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_zz_print_worst_relative_differences():
    """Prints the worst relative difference per conversion and configuration (``-s``)."""
    for label, value in sorted(WORST.items()):
        print(f"{label:45s} {value:.3g}")
