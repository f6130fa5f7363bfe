"""Tests for ``rmsprop_jax.demo``: the MNIST and CIFAR-10 loaders, short runs, the progress bar."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pathlib
import pickle
import re
import shlex
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

import rmsprop_jax
from rmsprop_jax.demo import (
    CONTENDERS,
    TASK_KEYS,
    Contender,
    Task,
    build_tasks,
    report,
    train_contender,
    train_sensitivity,
    training,
)
from rmsprop_jax.demo import data as demo_data
from rmsprop_jax.demo.__main__ import main


def _write_idx(path: pathlib.Path, array: np.ndarray, compress: bool) -> None:
    """Writes a uint8 array as IDX: two zero bytes, type 0x08, rank, big-endian dims, data."""
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _write_mnist(directory: pathlib.Path, compress: bool, n_train: int = 40, n_test: int = 12):
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, array in arrays.items():
        _write_idx(directory / name, array, compress)
    return arrays


def _write_cifar(directory: pathlib.Path, per_batch: int = 6) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(1)
    folder = directory / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"batch_label": name.encode(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        # Protocol 2, as the real (Python 2) files; Python 3 writes the bytes via _codecs.encode.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    return batches


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_round_trip(tmp_path: pathlib.Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", array, compress)
    path = tmp_path / ("a-idx3-ubyte.gz" if compress else "a-idx3-ubyte")
    np.testing.assert_array_equal(demo_data.read_idx(path), array)


def test_read_idx_rejects_bad_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        demo_data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">II", 0x00000801, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        demo_data.read_idx(tmp_path / "short")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_load_mnist(tmp_path: pathlib.Path, compress: bool) -> None:
    arrays = _write_mnist(tmp_path, compress)
    data = demo_data.find_image_dataset(tmp_path)
    assert data.name == "mnist" and data.num_classes == 10
    assert data.x_train.shape == (40, 28, 28, 1) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (12, 28, 28, 1) and data.y_test.dtype == np.int32
    np.testing.assert_allclose(
        data.x_train[..., 0], arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0
    )
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])


def test_load_cifar10(tmp_path: pathlib.Path) -> None:
    batches = _write_cifar(tmp_path)
    data = demo_data.find_image_dataset(tmp_path)
    assert data.name == "cifar10"
    assert data.x_train.shape == (12, 32, 32, 3) and data.x_test.shape == (6, 32, 32, 3)
    first = np.asarray(batches["data_batch_1"][b"data"])[0]
    # The first 1024 bytes of a row are the red plane, row-major.
    np.testing.assert_allclose(data.x_train[0, :, :, 0], first[:1024].reshape(32, 32) / 255.0)
    np.testing.assert_allclose(data.x_train[0, 0, 1, 2], first[2048 + 1] / 255.0)
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][b"labels"])


class _RunsACommand:
    """Unpickles as ``os.system(command)``: what a crafted "batch" could do to a plain loader."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def test_cifar_batch_that_would_run_a_command_is_refused(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "marker"
    crafted = {
        b"data": np.zeros((2, 3072), dtype=np.uint8),
        b"labels": [0, 1],
        b"payload": _RunsACommand(f"touch {shlex.quote(str(marker))}"),
    }
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(crafted, protocol=2))
    # The error names the refused global (os.system lives in `posix` on Unix, `nt` on Windows).
    refused = re.escape(f"refused global `{os.system.__module__}.system`")
    with pytest.raises(ValueError, match=refused):
        demo_data.load_cifar_batch(path)
    (tmp_path / "test_batch").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=refused):
        demo_data.load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("global_", "message"),
    [
        (b"builtins\neval", "refused global `builtins.eval`"),
        (b"numpy\nload", "refused global `numpy.load`"),
    ],
)
def test_cifar_loader_refuses_other_globals(
    tmp_path: pathlib.Path, global_: bytes, message: str
) -> None:
    # PROTO 2, GLOBAL, a one-character argument, TUPLE1, REDUCE, STOP.
    path = tmp_path / "batch"
    path.write_bytes(b"\x80\x02c" + global_ + b"\nX\x01\x00\x00\x001\x85R.")
    with pytest.raises(ValueError, match=re.escape(message)):
        demo_data.load_cifar_batch(path)


def test_cifar_loader_refuses_object_arrays(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.array([1, None], dtype=object)}, protocol=2))
    with pytest.raises(ValueError, match="refused NumPy dtype object"):
        demo_data.load_cifar_batch(path)


def test_cifar_loader_truncated_and_non_pickle_files(tmp_path: pathlib.Path) -> None:
    _write_cifar(tmp_path)
    whole = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    for cut in (1, len(whole) // 2, len(whole) - 1):
        path = tmp_path / f"cut{cut}"
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"`{re.escape(str(path))}` is not a CIFAR-10"):
            demo_data.load_cifar_batch(path)
    for name, content in (("text", b"hello, not a pickle\n"), ("empty", b""), ("png", b"\x89PNG")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="is not a CIFAR-10 python batch"):
            demo_data.load_cifar_batch(path)
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="a CIFAR-10 batch is a dict, got list"):
        demo_data.load_cifar_batch(tmp_path / "list")


@pytest.mark.parametrize("numpy_module", ["numpy._core", "numpy.core"], ids=["numpy2", "numpy1"])
def test_cifar_batch_loads_all_its_fields(tmp_path: pathlib.Path, numpy_module: str) -> None:
    batches = _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    # The real files, written by NumPy 1, name `numpy.core.multiarray._reconstruct`.
    raw = path.read_bytes().replace(
        b"numpy._core.multiarray\n", f"{numpy_module}.multiarray\n".encode()
    )
    path.write_bytes(raw)
    batch = demo_data.load_cifar_batch(path)
    expected = batches["test_batch"]
    assert set(batch) == set(expected)
    data = batch[b"data"]
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8
    np.testing.assert_array_equal(data, np.asarray(expected[b"data"]))
    assert batch[b"labels"] == expected[b"labels"]
    assert batch[b"filenames"] == expected[b"filenames"]
    assert batch[b"batch_label"] == b"test_batch"


def test_missing_data_dir_names_the_formats(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST IDX"):
        demo_data.find_image_dataset(tmp_path)


def _check_outputs(out: pathlib.Path, tasks: int, optimizers: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert len(results["tasks"]) == tasks
    for task in results["tasks"].values():
        assert list(task["optimizers"]) == optimizers
        for row in task["optimizers"].values():
            assert len(row["sweep"]) == 5
            assert row["learning_rate"] in [s["learning_rate"] for s in row["sweep"]]
            assert len(row["curves"]["train_loss"][0]) == task["epochs"] + 1
    # Figures need matplotlib (the ``examples`` extra); without it the demo skips them. One per
    # task, the stability figure, and the sensitivity heatmap when the MLP task ran.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    extra = 1 + ("sensitivity" in results)
    assert len(list(out.glob("*.png"))) == (tasks + extra if has_matplotlib else 0)
    if "sensitivity" in results:
        for variant in results["sensitivity"]["variants"].values():
            grid = np.asarray(variant["final_train_loss"], dtype=np.float64)
            assert grid.shape[:2] == (7, 6)
            assert variant["best_learning_rate"] in results["sensitivity"]["learning_rates"]
    assert "| optimizer |" in (out / "table.md").read_text()
    return results


@pytest.mark.slow
def test_quick_run(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    optimizers = ["rmsprop", "adam"]
    assert main(["--quick", "--out", str(tmp_path), "--optimizers", *optimizers]) == 0
    results = _check_outputs(tmp_path, 6, optimizers)
    captured = capsys.readouterr()
    assert "results.json" in captured.out
    assert "\r" not in captured.err  # stderr is not a terminal here: no progress bar
    assert set(results["sensitivity"]["variants"]) == {"rmsprop", "rmsprop centered"}
    assert "### Sensitivity: MLP on digits" in (tmp_path / "table.md").read_text()
    digits_mlp = results["tasks"]["MLP on digits"]["optimizers"]["rmsprop"]
    assert digits_mlp["final_test_accuracy"][0] > 0.5  # 3 epochs already learn the digits


@pytest.mark.slow
def test_run_on_mnist_files(tmp_path: pathlib.Path) -> None:
    _write_mnist(tmp_path / "mnist", compress=True, n_train=128, n_test=32)
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--data-dir", str(tmp_path / "mnist")]
    assert main([*argv, "--optimizers", "rmsprop", "--tasks", "mlp", "cnn"]) == 0
    results = _check_outputs(out, 2, ["rmsprop"])
    assert set(results["tasks"]) == {"MLP on mnist", "CNN on mnist"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "`--seeds` must be at least 1, got 0"),
        (["--limit", "-5"], "`--limit` must be 0"),
        (
            ["--tasks", "mlp", "7"],
            r"--tasks: invalid choice: '7' \(choose from 'linear', 'mlp', 'cnn', 'gru', "
            r"'lstm', 'deep'\)",
        ),
        (
            ["--optimizers", "rmsprop", "optax.adam"],
            r"--optimizers: invalid choice: 'optax.adam' \(choose from 'rmsprop', "
            r"'rmsprop-centered', .*'adam', 'nadam', 'adagrad'\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_runs_as_a_module() -> None:
    # ``python -m rmsprop_jax.demo`` runs the package's ``__main__``; warnings are errors, so
    # runpy's warning about a ``__main__`` module imported twice would fail this too.
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "rmsprop_jax.demo", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m rmsprop_jax.demo ")
    for flag in ("--quick", "--seeds", "--seed", "--out", "--data-dir", "--limit", "--tasks"):
        assert flag in result.stdout
    assert "--optimizers" in result.stdout
    # Every task and optimizer name is listed, and none has a space (one shell word each).
    for name in [*TASK_KEYS, *CONTENDERS]:
        assert re.search(rf"^  {re.escape(name)} ", result.stdout, re.MULTILINE), name
        assert " " not in name


def test_tasks_are_built_by_name() -> None:
    tasks = build_tasks(quick=True, data_dir=None, limit=0, keys=["lstm", "deep"])
    assert [t.key for t in tasks] == ["lstm", "deep"]
    with pytest.raises(ValueError, match="unknown tasks \\['rnn'\\]; the tasks are linear, mlp"):
        build_tasks(quick=True, data_dir=None, limit=0, keys=["rnn"])


def _small_linear_task(epochs: int = 2) -> Task:
    from rmsprop_jax.demo import models

    data = demo_data.make_linear_regression(0, n=256, features=4)
    return Task(
        "linear",
        "small linear",
        data,
        lambda rngs: models.LinearRegression(4, rngs=rngs),
        epochs,
        32,
        0.05,
    )


def test_sensitivity_grid_traces_once_and_matches_a_plain_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = _small_linear_task()
    lrs, decays = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1), (0.5, 0.9, 0.99, 0.999)
    calls = []
    real_rmsprop = rmsprop_jax.rmsprop

    def counting_rmsprop(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_rmsprop(*args, **kwargs)

    monkeypatch.setattr(training.rmsprop_jax, "rmsprop", counting_rmsprop)
    grid = train_sensitivity(task, False, lrs, decays, [0, 1], lambda: None)
    # One trace for the vmapped init and one for the jitted, vmapped epoch: 40 lanes, 2 epochs.
    assert len(calls) == 2
    monkeypatch.setattr(training.rmsprop_jax, "rmsprop", real_rmsprop)
    assert grid.shape == (5, 4, 2) and np.isfinite(grid).all()
    # The cell (lr 0.03, decay 0.99) equals a run of rmsprop built with those values.
    contender = Contender("check", lambda lr: rmsprop_jax.rmsprop(lr, decay=0.99), (3e-2,))
    plain = train_contender(task, contender, [0, 1], lambda: None)["train_loss"][0, :, -1]
    np.testing.assert_allclose(grid[2, 2], plain, rtol=1e-5)


def test_read_and_format_sensitivity() -> None:
    lrs, decays = (1e-3, 1e-2, 1e-1), (0.5, 0.9)
    losses = np.array([[[0.8], [0.5]], [[0.2], [0.1]], [[np.inf], [0.15]]])
    reading = report.read_sensitivity(losses, lrs, decays)
    assert reading["best_learning_rate"] == 1e-2 and reading["best_decay"] == 0.9
    assert reading["good_cells"] == 3 and reading["cells"] == 6  # 0.1, 0.15 and 0.2
    assert reading["good_learning_rates"] == {"0.5": [0.01], "0.9": [0.01, 0.1]}
    task = _small_linear_task()
    text = report.format_sensitivity(task, {"rmsprop": losses}, lrs, decays)
    assert "| 0.1 | diverged | 0.15* |" in text and "**0.1**" in text
    assert "Best: lr 0.01, decay 0.9" in text


def test_figures_are_written(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    task = _small_linear_task()._replace(data=demo_data.load_digits(0), name="digits")
    lrs, decays = (1e-3, 1e-2), (0.5, 0.9, 0.99)
    grid = np.random.default_rng(0).uniform(0.1, 1.0, (2, 3, 2))
    grid[0, 0, 0] = np.nan
    report.plot_sensitivity(task, {"a": grid, "b": grid}, lrs, decays, tmp_path / "s.png")
    row = {"label": "x", "final_test_accuracy": [0.9, 0.95, float("nan")]}
    report.plot_stability({"digits": (task, {"x": row, "y": row})}, tmp_path / "t.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _drive(bar: Any) -> None:
    bar.set_description("task: optimizer")
    bar.update(1)
    bar.update(1)
    bar.close()


def test_progress_is_silent_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Under pytest's capture sys.stderr is not a terminal, as in a CI log or ``2> log``.
    _drive(report.progress(4))
    _drive(report.progress(4, io.StringIO()))
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("tqdm_installed", [True, False], ids=["tqdm", "fallback"])
def test_progress_draws_on_a_terminal(
    tqdm_installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tqdm_installed:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes the import fail
    stream = _Terminal()
    _drive(report.progress(4, stream))
    assert "2/4" in stream.getvalue()
