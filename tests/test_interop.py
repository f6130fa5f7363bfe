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
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import worker_env

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

# Every configuration optax.rmsprop shares with rmsprop_jax.rmsprop (tests/test_transforms.py
# compares the two from step 0); a constant rate and a schedule alternate through them.
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


def test_optax_bad_input():
    params = {"w": jnp.zeros((2, 3))}
    with pytest.raises(TypeError, match=r"`nu_dtype` is not an argument that optax.rmsprop"):
        interop.from_optax(
            optax.rmsprop(0.1).init(params), params, learning_rate=0.1, nu_dtype="float32"
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
