"""Runs a test worker script in a fresh Python process (its own JAX runtime)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_worker(worker: Path, *args: str, devices: int | None = None, timeout: int = 300) -> None:
    """Runs ``worker`` with the repository on ``PYTHONPATH``; fails the test if it fails.

    ``devices`` gives the worker that many virtual CPU devices through ``XLA_FLAGS``,
    which must be set before JAX starts, hence the separate process.
    """
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = (
            f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        )
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(worker.resolve().parents[1]), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, str(worker), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{worker.name} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
