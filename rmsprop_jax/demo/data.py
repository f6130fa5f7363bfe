"""Data sets for ``rmsprop_jax.demo``: bundled digits, synthetic tasks, MNIST and CIFAR-10 files.

Every loader returns a :class:`Dataset` of NumPy arrays: float32 inputs and either int32 class
labels (classification) or float32 targets of shape ``(N, 1)`` (regression). Nothing here
downloads anything; MNIST and CIFAR-10 are read only from files a user already has.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
from typing import Any, NamedTuple, cast

import numpy as np

__all__ = [
    "Dataset",
    "find_image_dataset",
    "load_cifar10",
    "load_cifar_batch",
    "load_digits",
    "load_mnist",
    "make_linear_regression",
    "make_sequence_count",
    "read_idx",
]


class Dataset(NamedTuple):
    """A train/test split held as NumPy arrays."""

    name: str
    x_train: np.ndarray  # float32, (N_train, *input_shape)
    y_train: np.ndarray  # int32 (N_train,) labels, or float32 (N_train, 1) targets
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # 0 for regression


def _split(
    x: np.ndarray, y: np.ndarray, seed: int, train_fraction: float = 0.75
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: a seeded shuffle cut at ``train_fraction``."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(train_fraction * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], shape (N, 8, 8, 1)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.utils import Bunch

    # scikit-learn is not annotated: a checker infers "a Bunch, or a tuple with return_X_y".
    data = cast(Bunch, sklearn_digits())
    x = (np.asarray(data.images, dtype=np.float32) / np.float32(16.0))[..., None]
    y = np.asarray(data.target, dtype=np.int32)
    return Dataset("digits", *_split(x, y, seed), num_classes=10)


def make_linear_regression(
    seed: int = 0, n: int = 1024, features: int = 20, noise: float = 0.1
) -> Dataset:
    """Synthetic ``y = x @ w + b + noise``; weights scaled so that ``y`` has unit scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    w = (rng.standard_normal((features, 1)) / np.sqrt(features)).astype(np.float32)
    y = x @ w + np.float32(0.5) + np.float32(noise) * rng.standard_normal((n, 1)).astype(np.float32)
    return Dataset("linear regression", *_split(x, y.astype(np.float32), seed), num_classes=0)


def make_sequence_count(seed: int = 0, n: int = 3072, length: int = 10) -> Dataset:
    """Binary sequences of ``length`` steps, one-hot encoded (N, length, 2); label: number of ones.

    A recurrent model has to count across the whole sequence, so the task cannot be solved
    from any single time step.
    """
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n, length))
    x = np.eye(2, dtype=np.float32)[bits]
    y = bits.sum(axis=1).astype(np.int32)
    return Dataset("sequence count", *_split(x, y, seed), num_classes=length + 1)


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format), plain or gzip-compressed.

    The header is two zero bytes, a type code (0x08 for uint8), the number of dimensions, then
    one big-endian uint32 per dimension; the data follow in C order.

    Raises:
        ValueError: if the header is malformed or the file is shorter than its header says.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"`{path}` is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"`{path}` is truncated: header says {dims}, file too short")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        for candidate in (directory / name, directory / "raw" / name):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(directory: pathlib.Path) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``directory``; images (N, 28, 28, 1)."""
    paths = {}
    for key, stem in (
        ("x_train", "train-images-idx3-ubyte"),
        ("y_train", "train-labels-idx1-ubyte"),
        ("x_test", "t10k-images-idx3-ubyte"),
        ("y_test", "t10k-labels-idx1-ubyte"),
    ):
        found = _find(directory, stem)
        if found is None:
            raise FileNotFoundError(f"no `{stem}[.gz]` in `{directory}`")
        paths[key] = found
    images = {k: read_idx(paths[k]) for k in ("x_train", "x_test")}
    labels = {k: read_idx(paths[k]) for k in ("y_train", "y_test")}
    for k, arr in images.items():
        if arr.ndim != 3:
            raise ValueError(f"`{paths[k]}` should hold (N, rows, cols) images, got {arr.shape}")
    scale = np.float32(1.0 / 255.0)
    return Dataset(
        "mnist",
        images["x_train"].astype(np.float32)[..., None] * scale,
        labels["y_train"].astype(np.int32),
        images["x_test"].astype(np.float32)[..., None] * scale,
        labels["y_test"].astype(np.int32),
        num_classes=10,
    )


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to write ``bytes`` at pickle protocol 2."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused `_codecs.encode` with encoding {encoding!r}: bytes are written as latin-1"
        )
    return text.encode("latin-1")


def _plain_dtype(*args: object) -> np.dtype:
    """``numpy.dtype`` for the array's element type, refusing object dtypes (which hold objects)."""
    dtype = np.dtype(*cast(Any, args))
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused NumPy dtype {dtype}: it holds Python objects")
    return dtype


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """NumPy's array reconstruction (``numpy._core.multiarray._reconstruct``), ndarray only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused array subtype {subtype!r}: only numpy.ndarray")
    # The real ``_reconstruct`` makes an empty array; the pickle's BUILD then sets its data.
    return np.ndarray(cast(Any, shape), dtype=cast(Any, dtype))


# The globals a CIFAR-10 python batch refers to: the real files (Python 2, protocol 2) pickle a
# dict of byte strings, lists and one uint8 array, built by NumPy's ``_reconstruct``, ``ndarray``
# and ``dtype``; NumPy 2 names the module ``numpy._core``. Python 3 writes ``bytes`` at protocol
# 2 as ``_codecs.encode(text, "latin1")``, admitted so that a batch re-saved that way loads.
# Each admitted name maps to a function that checks its arguments; nothing else resolves.
_CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR-10 batch contains.

    Unpickling runs code only through the globals a file names (functions and classes it
    calls); this one refuses every global outside :data:`_CIFAR_GLOBALS`, so a crafted file
    gets an error instead of running anything.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            admitted = ", ".join(f"{m}.{n}" for m, n in _CIFAR_GLOBALS)
            raise pickle.UnpicklingError(
                f"refused global `{module}.{name}`: a CIFAR-10 batch holds only a dict of bytes, "
                f"lists and NumPy arrays (admitted: {admitted})"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refused a persistent id: a CIFAR-10 batch has none")


def load_cifar_batch(path: pathlib.Path) -> dict[bytes, object]:
    """Reads one CIFAR-10 python batch with a restricted unpickler; never runs code from it.

    Only the dict, byte strings, lists, ints and NumPy's array reconstruction are admitted
    (what the real batches contain); any other global a file names is refused before it is
    called.

    Raises:
        ValueError: naming ``path``, if the file refers to anything else (the refused global
            is named), is truncated, is not a pickle, or does not hold a dict.
    """
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"`{path}` is not a CIFAR-10 python batch: {err}") from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
            # What pickle raises on a cut-off or garbled stream varies with where it ends.
            raise ValueError(
                f"`{path}` is not a CIFAR-10 python batch (truncated or not a pickle): "
                f"{type(err).__name__}: {err}"
            ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"`{path}`: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
    return batch


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_cifar_batch(path)
    if b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"`{path}`: expected keys b'data' and b'labels', got {sorted(batch)}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"`{path}`: expected b'data' (N, 3072) and N b'labels', got {data.shape}")
    # Rows hold 1024 red, then green, then blue values of a 32x32 image: go to NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) * np.float32(1.0 / 255.0), labels


def load_cifar10(directory: pathlib.Path) -> Dataset:
    """CIFAR-10 from the python pickle batches (``data_batch_1..5``, ``test_batch``).

    ``directory`` may be ``cifar-10-batches-py`` itself or its parent. Missing training batches
    are skipped (at least ``data_batch_1`` is needed). Images come back as (N, 32, 32, 3).

    The batches are read by :func:`load_cifar_batch`, which admits only what a CIFAR-10 batch
    contains, so a crafted file cannot run code.
    """
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    train_paths = [directory / f"data_batch_{i}" for i in range(1, 6)]
    train_paths = [p for p in train_paths if p.is_file()]
    if not train_paths or not (directory / "test_batch").is_file():
        raise FileNotFoundError(f"no `data_batch_1` and `test_batch` in `{directory}`")
    parts = [_read_cifar_batch(p) for p in train_paths]
    x_test, y_test = _read_cifar_batch(directory / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, num_classes=10)


def find_image_dataset(directory: pathlib.Path) -> Dataset:
    """Loads MNIST or CIFAR-10 from ``directory``, whichever is there (MNIST first)."""
    if _find(directory, "train-images-idx3-ubyte") is not None:
        return load_mnist(directory)
    if (directory / "cifar-10-batches-py").is_dir() or (directory / "data_batch_1").is_file():
        return load_cifar10(directory)
    raise FileNotFoundError(
        f"`--data-dir {directory}` holds neither MNIST IDX files (train-images-idx3-ubyte[.gz], "
        "...) nor CIFAR-10 python batches (cifar-10-batches-py/data_batch_1, test_batch)"
    )
