"""Golden trajectories of the real ``torch.optim.RMSprop`` and ``keras.optimizers.RMSprop``.

Each configuration feeds a fixed, seeded sequence of float32 gradients to the
framework's optimizer (as ``.grad`` in PyTorch, through ``apply_gradients`` in
Keras) and records every parameter after every step. The gradients never depend
on the parameters; only PyTorch's ``weight_decay`` adds ``weight_decay * param``
itself. ``tests/test_presets.py`` replays the same gradients through
:mod:`rmsprop_jax.presets` and compares the trajectories, against the files
written here and, when the frameworks are importable, against a live run of the
functions below.

How the committed files were made (from the repository root)::

    python tests/golden/make_golden.py

on Linux x86-64 (CPU only) with Python 3.11.7, NumPy 2.4.6, PyTorch 2.13.0+cpu
and Keras 3.15.1 on the JAX backend (JAX 0.10.2); the script sets
``KERAS_BACKEND=jax`` itself before it imports Keras. The versions actually used
are stored in each file under ``versions``. The files are deterministic: running
the script again with the same versions rewrites them bit for bit.

File layout (``numpy.savez_compressed``, loadable with ``allow_pickle=False``):

* ``configs``: a JSON string, the list of configuration dicts (see
  :data:`TORCH_CONFIGS` and :data:`KERAS_CONFIGS`);
* ``versions``: a JSON string with the framework and NumPy versions;
* ``{i}/grad/{leaf}``: shape ``(STEPS, *leaf_shape)``, the gradients of config ``i``;
* ``{i}/param/{leaf}``: shape ``(STEPS + 1, *leaf_shape)``, the parameters before
  the first step and after each step.

Nothing here imports PyTorch or Keras at module level, so the module can be
imported (by the tests, and by pytest's doctest collection) without them.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
from typing import Any

import numpy as np

STEPS = 25
HERE = pathlib.Path(__file__).resolve().parent
PYTORCH_FILE = HERE / "pytorch.npz"
KERAS_FILE = HERE / "keras.npz"

# Leaf name -> (shape, dtype). Small, with a 2-D leaf; the complex tree mixes a
# complex leaf with a real one, as a model with complex weights would.
REAL_LEAVES = {"w": ((3, 4), "float32"), "b": ((5,), "float32")}
COMPLEX_LEAVES = {"z": ((2, 3), "complex64"), "b": ((4,), "float32")}

Config = dict[str, Any]
Tree = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------


def _config(name: str, seed: int, kwargs: dict[str, Any], **extra: Any) -> Config:
    """A configuration: framework kwargs plus how to make gradients and the schedule.

    ``schedule`` (optional): ``{"peak": float}``; the learning rate of step ``t``
    (0-based) is :func:`learning_rates`, and ``kwargs`` then holds no learning rate.
    ``leaves``: ``"real"`` or ``"complex"``. ``gradients``: ``"random"`` or
    ``"constant"`` (the NaN case).
    """
    return {
        "name": name,
        "seed": seed,
        "kwargs": kwargs,
        "leaves": extra.pop("leaves", "real"),
        "gradients": extra.pop("gradients", "random"),
        "schedule": extra.pop("schedule", None),
        **extra,
    }


def _torch_configs() -> list[Config]:
    configs = [_config("defaults", 0, {})]
    grid = itertools.product([False, True], [0.0, 0.9], [0.0, 0.1], [False, True])
    for i, (centered, momentum, weight_decay, maximize) in enumerate(grid):
        name = f"centered={centered},momentum={momentum},wd={weight_decay},max={maximize}"
        kwargs = {
            "lr": 0.01,
            "centered": centered,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        configs.append(_config(name, 100 + i, kwargs))
    configs += [
        _config("alpha=0.9,eps=1e-4", 200, {"lr": 0.003, "alpha": 0.9, "eps": 1e-4}),
        _config(
            "alpha=0.95,eps=1e-2,centered,momentum=0.5",
            201,
            {"lr": 0.02, "alpha": 0.95, "eps": 1e-2, "centered": True, "momentum": 0.5},
        ),
        # The learning rate multiplies the momentum buffer in PyTorch: with a
        # schedule, a preset that put it inside the buffer would drift from here.
        _config("schedule,momentum=0.9", 300, {"momentum": 0.9}, schedule={"peak": 0.02}),
        _config(
            "schedule,centered,momentum=0.8,wd=0.05",
            301,
            {"centered": True, "momentum": 0.8, "weight_decay": 0.05},
            schedule={"peak": 0.01},
        ),
        _config("schedule", 302, {}, schedule={"peak": 0.02}),
    ]
    for i, (centered, momentum) in enumerate(itertools.product([False, True], [0.0, 0.9])):
        kwargs = {"lr": 0.01, "centered": centered, "momentum": momentum}
        name = f"complex,centered={centered},momentum={momentum}"
        configs.append(_config(name, 400 + i, kwargs, leaves="complex"))
    configs.append(
        _config(
            "complex,centered,momentum=0.9,wd=0.1,max",
            404,
            {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
            leaves="complex",
        )
    )
    return configs


def _keras_configs() -> list[Config]:
    configs = [_config("defaults", 1000, {})]
    for i, (centered, momentum) in enumerate(itertools.product([False, True], [0.0, 0.9])):
        kwargs = {"learning_rate": 0.01, "centered": centered, "momentum": momentum}
        configs.append(_config(f"centered={centered},momentum={momentum}", 1100 + i, kwargs))
    configs += [
        _config("rho=0.5,epsilon=1e-3", 1200, {"learning_rate": 0.01, "rho": 0.5, "epsilon": 1e-3}),
        _config(
            "rho=0.99,epsilon=1e-5,centered,momentum=0.5",
            1201,
            {
                "learning_rate": 0.005,
                "rho": 0.99,
                "epsilon": 1e-5,
                "centered": True,
                "momentum": 0.5,
            },
        ),
        # Keras calls a LearningRateSchedule with `iterations`, 0 at the first
        # step, and puts the learning rate inside the momentum buffer.
        _config("schedule,momentum=0.9", 1300, {"momentum": 0.9}, schedule={"peak": 0.02}),
        _config(
            "schedule,centered,momentum=0.8",
            1301,
            {"centered": True, "momentum": 0.8},
            schedule={"peak": 0.01},
        ),
        _config("schedule", 1302, {}, schedule={"peak": 0.02}),
    ]
    return configs


TORCH_CONFIGS: list[Config] = _torch_configs()
"""The PyTorch grid; ``kwargs`` are ``torch.optim.RMSprop``'s (and ``presets.pytorch``'s)."""

KERAS_CONFIGS: list[Config] = _keras_configs()
"""The Keras grid; ``kwargs`` are ``keras.optimizers.RMSprop``'s (and ``presets.keras``'s)."""

TORCH_NAN_CONFIG: Config = _config(
    "nan:centered,alpha=0.5,constant gradient",
    0,
    {"lr": 0.01, "alpha": 0.5, "centered": True},
    gradients="constant",
    expect_nan=True,
)
"""PyTorch's centered variance goes negative by rounding here (step 24 of 25): NaN."""


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def leaf_specs(config: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Leaf name -> (shape, dtype) of the configuration's parameter tree."""
    return COMPLEX_LEAVES if config["leaves"] == "complex" else REAL_LEAVES


def _random_real(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random sign times 10**U(-3, 2), about 15% exact zeros, in float32."""
    g = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** rng.uniform(-3.0, 2.0, size=shape)
    g[rng.random(shape) < 0.15] = 0.0
    return g.astype(np.float32)


def make_gradients(config: Config) -> list[Tree]:
    """The configuration's ``STEPS`` gradient trees (seeded, parameter-independent).

    ``"random"``: each real value (each real and imaginary part) is a random sign
    times a log-uniform magnitude in [1e-3, 1e2], with about 15% exact zeros.
    ``"constant"``: every step is 0.3 everywhere, which drives PyTorch's centered
    variance below zero by rounding (see :data:`TORCH_NAN_CONFIG`).
    """
    rng = np.random.default_rng(config["seed"])
    out = []
    for _ in range(STEPS):
        tree = {}
        for name, (shape, dtype) in leaf_specs(config).items():
            if config["gradients"] == "constant":
                tree[name] = np.full(shape, 0.3, dtype)
            elif dtype == "complex64":
                real, imag = _random_real(rng, shape), _random_real(rng, shape)
                tree[name] = (real + 1j * imag).astype(np.complex64)
            else:
                tree[name] = _random_real(rng, shape)
        out.append(tree)
    return out


def make_params(config: Config) -> Tree:
    """Initial parameters: N(0, 0.5^2) per real value, seeded apart from the gradients."""
    rng = np.random.default_rng(config["seed"] + 10_000)
    tree = {}
    for name, (shape, dtype) in leaf_specs(config).items():
        value = 0.5 * rng.standard_normal(shape)
        if dtype == "complex64":
            value = value + 0.5j * rng.standard_normal(shape)
        tree[name] = value.astype(dtype)
    return tree


def learning_rates(config: Config) -> np.ndarray | None:
    """The learning rate of each step (float32, 0-based), or None without a schedule.

    A linear warm-up over 5 steps to ``peak``, then a decay by 0.85 per step. The
    values are float32 numbers, so every framework sees exactly the same ones.
    """
    if config["schedule"] is None:
        return None
    peak = config["schedule"]["peak"]
    return np.asarray([peak * min((t + 1) / 5, 0.85 ** (t - 4)) for t in range(STEPS)], np.float32)


# ----------------------------------------------------------------------------
# The frameworks
# ----------------------------------------------------------------------------


def torch_trajectory(config: Config, params: Tree, grads: list[Tree]) -> dict[str, np.ndarray]:
    """Runs ``torch.optim.RMSprop`` (CPU); returns leaf -> ``(STEPS + 1, *shape)``."""
    import torch  # imported here: the module must import without torch

    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    rates = learning_rates(config)
    kwargs = dict(config["kwargs"])
    if rates is not None:
        kwargs["lr"] = float(rates[0])
    optimizer = torch.optim.RMSprop(list(tensors.values()), **kwargs)
    history = {k: [v.copy()] for k, v in params.items()}
    for t, tree in enumerate(grads):
        if rates is not None:
            for group in optimizer.param_groups:
                group["lr"] = float(rates[t])
        for k, tensor in tensors.items():
            tensor.grad = torch.from_numpy(tree[k].copy())
        optimizer.step()
        for k, tensor in tensors.items():
            history[k].append(tensor.detach().numpy().copy())
    return {k: np.stack(v) for k, v in history.items()}


def import_keras() -> Any:
    """Imports Keras on the JAX backend (``KERAS_BACKEND`` must be set before import)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras  # imported here: the module must import without keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras must run on the JAX backend, got {keras.backend.backend()!r}.")
    return keras


def keras_trajectory(config: Config, params: Tree, grads: list[Tree]) -> dict[str, np.ndarray]:
    """Runs ``keras.optimizers.RMSprop`` on the JAX backend; returns leaf -> trajectory.

    Runs under JAX's standard dtype promotion, whatever the caller's setting (the
    tests set it to strict; Keras itself relies on standard promotion).
    """
    import jax

    keras = import_keras()
    rates = learning_rates(config)
    kwargs = dict(config["kwargs"])
    if rates is not None:

        class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
            """``rates[step]``: Keras passes ``optimizer.iterations``, 0 at the first step."""

            def __call__(self, step):
                return keras.ops.take(keras.ops.convert_to_tensor(rates), step)

        kwargs["learning_rate"] = TableSchedule()
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        variables = {k: keras.Variable(v.copy(), dtype="float32") for k, v in params.items()}
        optimizer = keras.optimizers.RMSprop(**kwargs)
        history = {k: [v.copy()] for k, v in params.items()}
        for tree in grads:
            pairs = [(jax.numpy.asarray(tree[k]), variables[k]) for k in variables]
            optimizer.apply_gradients(pairs)
            for k, variable in variables.items():
                history[k].append(np.array(variable.value))
    return {k: np.stack(v) for k, v in history.items()}


def versions() -> dict[str, str]:
    """Versions of the frameworks and NumPy used for a run."""
    import torch

    keras = import_keras()
    import jax

    return {
        "torch": torch.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def write_golden(path: pathlib.Path, configs: list[Config], runner, meta: dict[str, str]) -> None:
    """Runs every configuration through ``runner`` and writes the file described above."""
    arrays: dict[str, np.ndarray] = {
        "configs": np.asarray(json.dumps(configs)),
        "versions": np.asarray(json.dumps(meta)),
    }
    for i, config in enumerate(configs):
        grads = make_gradients(config)
        trajectory = runner(config, make_params(config), grads)
        for k in trajectory:
            arrays[f"{i}/grad/{k}"] = np.stack([tree[k] for tree in grads])
            arrays[f"{i}/param/{k}"] = trajectory[k]
    np.savez_compressed(path, **arrays)


def read_golden(path: pathlib.Path) -> tuple[list[tuple[Config, list[Tree], dict]], dict]:
    """Reads a golden file: ``[(config, gradient trees, trajectory)]`` and the versions."""
    with np.load(path, allow_pickle=False) as data:
        configs = json.loads(str(data["configs"]))
        meta = json.loads(str(data["versions"]))
        cases = []
        for i, config in enumerate(configs):
            names = list(leaf_specs(config))
            stacked = {k: data[f"{i}/grad/{k}"] for k in names}
            grads = [{k: stacked[k][t] for k in names} for t in range(STEPS)]
            trajectory = {k: data[f"{i}/param/{k}"] for k in names}
            cases.append((config, grads, trajectory))
    return cases, meta


def main() -> None:
    import torch

    torch.set_num_threads(1)
    meta = versions()
    write_golden(PYTORCH_FILE, [*TORCH_CONFIGS, TORCH_NAN_CONFIG], torch_trajectory, meta)
    write_golden(KERAS_FILE, KERAS_CONFIGS, keras_trajectory, meta)
    for path in (PYTORCH_FILE, KERAS_FILE):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
