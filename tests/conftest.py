"""Strict settings for every test, and the shared ``maybe_jit`` fixture.

* Dtype promotion is strict and rank promotion raises, so the library never
  relies on an implicit promotion or broadcast.
* Warnings are errors (``filterwarnings = error`` in ``pyproject.toml``).
* Hypothesis: the ``ci`` profile (the default) runs 100 derandomized examples per
  property with no deadline, since the first call of each test compiles;
  ``HYPOTHESIS_PROFILE=slow`` runs 1,000.
* Slow tests (notebooks, worker processes, training runs, sweeps that compile one program
  per case) carry ``@pytest.mark.slow``:
  ``python -m pytest -m "not slow"`` is the quick tier for the edit-test loop.

Shared test code (the float64 reference loop, configurations, worker loaders) lives in
``helpers.py``.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_COMMON = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "100")), **_COMMON
)
# HYPOTHESIS_PROFILE=slow: ten times the examples, for a long local run.
settings.register_profile("slow", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a test once eagerly and once under ``jax.jit``."""
    return jax.jit if request.param else (lambda fn: fn)
