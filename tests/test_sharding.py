"""Parameters sharded on a 2-D mesh of 8 devices: the optimizer state follows them.

A JAX process fixes its device count when it starts, so the work runs once in a
subprocess with 8 virtual CPU devices (``tests/_sharding_worker.py``), which writes
a JSON report; the tests here read it. Meshes are ``jax.make_mesh((2, 4), ("x",
"y"))`` with both axes ``AxisType.Explicit``, both ``AxisType.Auto``, or one of
each, used through ``jax.set_mesh``. Parameters: a matrix split on both axes, one
split on both axes the other way round, a vector split on ``y``, a replicated vector
and a scalar.

What a data- or model-parallel user needs from an elementwise optimizer:

* every state leaf shaped like a parameter has exactly that parameter's sharding,
  and the scalar statistics (the update count and its companion) are replicated, after ``init`` and
  after a jitted ``update``;
* the compiled update moves no data between devices (no all-gather, no collective
  at all);
* the sharded update computes what the same update computes on one device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_worker

pytestmark = pytest.mark.slow  # a worker process

WORKER = Path(__file__).with_name("_sharding_worker.py")
N_DEVICES = 8
MESHES = ["explicit", "auto", "mixed"]
CONFIGS = ["plain", "centered_momentum_bias", "quantized"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    run_worker(WORKER, str(out), devices=N_DEVICES)
    return json.loads(out.read_text())


def assert_shardings(records: list[dict]) -> None:
    wrong = [
        f"{r['path']}: {r['sharding']}, expected {r['expected']}" for r in records if not r["ok"]
    ]
    assert not wrong, "leaves with the wrong sharding:\n  " + "\n  ".join(wrong)


def sharded_leaves(records: list[dict]) -> int:
    """How many leaves should be split over devices (those of the 5 split parameters)."""
    return sum(r["expected"] != "P()" for r in records)


# Statistics shaped like the parameters: nu; nu, mu and the momentum trace; with quantized
# state, the two 512-element parameters have codes and scales for each of the three.
SPLIT_STATISTICS = {"plain": 5, "centered_momentum_bias": 5 * 3, "quantized": 3 * 3 + 2 * 3 * 2}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_laid_out_as_requested(report, mesh, config):
    assert_shardings(report[f"{mesh}/{config}"]["params"])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    ("mesh", "mode"),
    [
        ("explicit", "eager"),
        ("auto", "eager"),
        ("mixed", "eager"),
        # Under jit only Explicit axes are part of the traced types: with Auto axes a
        # jitted init has no sharding to follow (optax's transforms replicate their state
        # there too), and the caller passes ``out_shardings``.
        ("explicit", "jit"),
    ],
)
def test_init_gives_the_state_the_parameter_shardings(report, mesh, mode, config):
    records = report[f"{mesh}/{config}"][f"init_{mode}"]
    assert sharded_leaves(records) == SPLIT_STATISTICS[config]
    assert_shardings(records)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mesh", MESHES)
def test_update_keeps_the_parameter_shardings(report, mesh, config):
    record = report[f"{mesh}/{config}"]
    assert sharded_leaves(record["update_state"]) == SPLIT_STATISTICS[config]
    assert_shardings(record["update_state"])
    assert_shardings(record["update_params"])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mesh", MESHES)
def test_compiled_update_has_no_all_gather(report, mesh, config):
    collectives = report[f"{mesh}/{config}"]["collectives"]
    assert "all-gather" not in collectives
    # The update is elementwise: nothing needs to cross devices at all.
    assert collectives == [], collectives


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_update_equals_the_update_on_one_device(report, mesh, config):
    # Elementwise float32 arithmetic, fused differently: at most a couple of ulps (with
    # quantized state the same codes, since the random bits depend on the global index).
    assert report[f"{mesh}/{config}"]["max_relative_difference"] <= 3e-7


@pytest.mark.parametrize("mesh", MESHES)
def test_quantized_codes_and_scales_follow_the_parameter(report, mesh):
    records = report[f"{mesh}/quantized"]["update_state"]
    codes = [r for r in records if r["path"].endswith(".codes")]
    scales = [r for r in records if r["path"].endswith(".scales")]
    assert len(codes) == len(scales) == 2 * 3  # q and qt; nu, mu and the trace
    assert all(r["expected"] != "P()" for r in codes + scales)
    assert {tuple(r["shape"]) for r in scales} == {(4, 4), (8, 2)}  # blocks of 32
