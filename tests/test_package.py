"""Which ``rmsprop_jax`` is under test: in this process, and in the worker processes.

``.ci/run`` installs the package (not editable) and runs the tests from a folder outside
the clone with ``RMSPROP_JAX_TEST_INSTALLED=1``: the tests must then import the installed
copy from site-packages, never the source tree, so that a file the wheel leaves out fails
CI. Locally (``python -m pytest`` from the clone, or an editable install) the variable is
unset and the source tree is what runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPOSITORY, worker_env

import rmsprop_jax

PACKAGE = Path(rmsprop_jax.__file__).resolve().parent


def package_files(root: Path) -> set[Path]:
    """The package's files below ``root``, relative to it, without compiled bytecode."""
    return {
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_installed_package_is_under_test():
    if os.environ.get("RMSPROP_JAX_TEST_INSTALLED") != "1":
        pytest.skip("RMSPROP_JAX_TEST_INSTALLED=1 (set by .ci/run) requires the installed copy")
    site_packages = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    assert PACKAGE.parent in site_packages, (
        f"rmsprop_jax was imported from {PACKAGE}, not from site-packages {site_packages}"
    )
    assert not PACKAGE.is_relative_to(REPOSITORY.resolve()), PACKAGE
    # The wheel holds every file of the source package (py.typed included).
    missing = package_files(REPOSITORY / "rmsprop_jax") - package_files(PACKAGE)
    assert not missing, f"files of rmsprop_jax/ missing from the installed package: {missing}"


def test_worker_processes_import_the_package_under_test(tmp_path):
    # helpers.run_worker starts workers with helpers.worker_env: they must test the same
    # copy of the package as this process, installed or source tree.
    result = subprocess.run(
        [sys.executable, "-c", "import rmsprop_jax; print(rmsprop_jax.__file__)"],
        env=worker_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve().parent == PACKAGE
