"""Two JAX processes (2 CPU devices each) train data-parallel with rmsprop_jax.

The test starts ``tests/_multiprocess_worker.py`` twice with
``jax.distributed.initialize`` on 127.0.0.1 and gloo CPU collectives; each step's
global batch is split over the 4 devices of the two processes. Both processes must
end with identical parameters and optimizer state, equal (to float32 rounding of
the cross-device gradient sum) to one process training on the same global batches.
The processes are bounded in time and always killed at the end.
"""

from __future__ import annotations

import ipaddress
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import optax
import pytest
from helpers import load_module, worker_env

import rmsprop_jax

pytestmark = pytest.mark.slow  # worker processes

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
N_PROCESSES = 2
TIMEOUT_S = 120


worker = load_module(WORKER)


def host_name_is_loopback() -> bool:
    """Whether this machine's host name resolves to a loopback address.

    The coordinator listens on 127.0.0.1, but gloo's TCP pairs bind to the address
    the host name resolves to (``jax_cpu_collectives_implementation`` offers no
    public way to pass an address), so the test runs only where that is loopback.
    """
    try:
        return ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
    except (OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> list[dict]:
    if not host_name_is_loopback():
        pytest.skip("the host name does not resolve to loopback; gloo would leave 127.0.0.1")
    out = tmp_path_factory.mktemp("multiprocess")
    env = worker_env(devices=2)
    port = free_port()
    procs, logs = [], []
    try:
        for i in range(N_PROCESSES):
            log = (out / f"process_{i}.log").open("w")
            logs.append(log)
            command = [sys.executable, str(WORKER), str(i), str(N_PROCESSES), str(port), str(out)]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        # Stop waiting as soon as one process fails: the other would wait for it.
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"the worker processes did not finish in {TIMEOUT_S} s")
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failures = [
        f"process {i} exited with {proc.returncode} (-9: killed here after another failed):\n"
        + (out / f"process_{i}.log").read_text()[-4000:]
        for i, proc in enumerate(procs)
        if proc.returncode != 0
    ]
    if failures:
        pytest.fail("\n\n".join(failures))
    results = []
    for i in range(N_PROCESSES):
        with (out / f"process_{i}.pkl").open("rb") as f:
            results.append(pickle.load(f))
    return results


def one_process_run(config: dict):
    """The same training on this process's single device, whole global batches."""
    params, xs, ys = worker.make_problem()
    tx = rmsprop_jax.rmsprop(**config)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(worker.loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for x, y in zip(xs, ys):
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
    return jax.device_get((params, state, losses))


@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_two_processes_train_identically_and_like_one_process(processes, name):
    runs = [result[name] for result in processes]
    for run in runs:
        assert run["agree"], "the local copies of the replicated values differ"
        assert run["replicated"], "parameters and state should stay replicated"
    # Identical, bit for bit, in both processes.
    chex.assert_trees_all_equal(
        (runs[1]["params"], runs[1]["state"], runs[1]["losses"]),
        (runs[0]["params"], runs[0]["state"], runs[0]["losses"]),
    )
    assert int(optax.tree_utils.tree_get(runs[0]["state"], "count")) == len(runs[0]["losses"])

    params, state, losses = one_process_run(worker.CONFIGS[name])
    chex.assert_trees_all_close(
        (runs[0]["params"], runs[0]["state"]), (params, state), rtol=2e-5, atol=1e-6
    )
    chex.assert_trees_all_close(runs[0]["losses"], losses, rtol=2e-5)
    assert float(losses[-1]) < float(losses[0])
