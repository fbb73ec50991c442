"""Multi-host: the same round as 2 processes (2 CPU devices each, gloo over localhost) == 1 process.

The test starts two copies of this file as workers (`python test_multihost.py WORKER_OUT.npz`); each
joins `jax.distributed` through the environment variables read by `initialize_distributed`, runs one
round on the 4-device global mesh and saves the new global parameters. The pytest process runs the
same round on a 4-device mesh of its own and compares.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from fedmoe_jax.federated import bucket_width
from fedmoe_jax.federated.loop import make_round_step
from fedmoe_jax.federated.sharding import (
    initialize_distributed,
    make_mesh,
    replicate,
    shard_cohort,
    to_host,
)
from fedmoe_jax.models import SwitchTransformer, get_config

NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
N_CLIENTS, COHORT = 6, np.array([0, 2, 3, 5])
TIMEOUT_S = 150
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def round_inputs():
    """Tiny model, random parameters and data, a cohort of 4: the same NumPy arrays in every process."""
    engine_tests = os.path.join(ROOT, "tests", "federated")  # the helpers' folder, also in the workers
    if engine_tests not in sys.path:
        sys.path.insert(0, engine_tests)
    from test_client import make_batches
    from test_loop import cohort_inputs

    # router jitter draws from the per-client keys; dropout would triple the compile time
    config = get_config("switch-tiny-8", dropout_rate=0.0, router_jitter_noise=0.01)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(SwitchTransformer(config).init, jax.random.key(0), jnp.ones((1, 6), jnp.int32),
                            jnp.ones((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    maps = np.zeros((N_CLIENTS, config.num_moe_layers, config.num_experts), bool)
    for c in range(N_CLIENTS):
        for layer in range(config.num_moe_layers):
            maps[c, layer, rng.choice(8, rng.integers(1, 5), replace=False)] = True
    batches = [make_batches(rng) for _ in range(N_CLIENTS)]
    width = bucket_width(int(maps[COHORT].sum(-1).max()), config.num_experts)
    return config, params, cohort_inputs(maps, batches, COHORT, width)


def run_round(mesh):
    """One round sharded over `mesh`; the new global parameters (flat), per-client losses, held experts."""
    config, params, (idx, valid, stacked, step_mask, weights, rngs) = round_inputs()
    keys = jax.random.wrap_key_data(jnp.asarray(rngs))
    round_step = make_round_step(config, optax.sgd(0.1), mesh=mesh)
    out = round_step(replicate(params, mesh),
                     *shard_cohort((idx, valid, stacked, step_mask, weights, keys), mesh))
    assert out.params["shared"]["embedding"].sharding.is_fully_replicated
    assert out.metrics["loss"].sharding.spec[0] == "clients"
    flat = {"/".join(key): value for key, value in flatten_dict(to_host(out.params)).items()}
    return flat, to_host(out.metrics["loss"]), to_host(out.held)


def worker(out_path):
    assert initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    assert jax.process_count() == NUM_PROCESSES
    assert jax.local_device_count() == DEVICES_PER_PROCESS
    mesh = make_mesh()
    assert mesh.size == NUM_PROCESSES * DEVICES_PER_PROCESS
    params, loss, held = run_round(mesh)
    np.savez(out_path, **params, __loss=loss, __held=held)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(tmp_path):
    from conftest import xla_flags  # here: the workers run this file as a script

    port = free_port()
    env = dict(os.environ,
               XLA_FLAGS=xla_flags(DEVICES_PER_PROCESS),
               JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(NUM_PROCESSES),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    procs = []
    for i in range(NUM_PROCESSES):
        log = open(tmp_path / f"worker{i}.log", "w")
        command = [sys.executable, os.path.abspath(__file__), str(tmp_path / f"out{i}.npz")]
        procs.append((subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    return procs


def stop_workers(procs):
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def wait_workers(procs, tmp_path):
    """Wait for all workers within TIMEOUT_S; on a failure or timeout kill the rest and show their logs."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc, _ in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        stop_workers(procs)
    codes = [proc.returncode for proc, _ in procs]
    if any(codes):
        logs = "\n".join(f"--- worker {i} (exit {c}) ---\n{(tmp_path / f'worker{i}.log').read_text()[-3000:]}"
                         for i, c in enumerate(codes))
        raise AssertionError(f"workers failed (or were killed at the {TIMEOUT_S} s limit):\n{logs}")


def test_two_processes_equal_one_process(tmp_path):
    procs = start_workers(tmp_path)
    try:
        # the single-process reference runs while the workers work
        assert jax.process_count() == 1 and jax.device_count() >= 4
        ref_params, ref_loss, ref_held = run_round(make_mesh(4))
    except BaseException:
        stop_workers(procs)
        raise
    wait_workers(procs, tmp_path)

    results = [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(NUM_PROCESSES)]
    for i, res in enumerate(results):
        loss, held = res.pop("__loss"), res.pop("__held")
        assert sorted(res) == sorted(ref_params)
        for key, value in ref_params.items():
            np.testing.assert_allclose(res[key], value, rtol=1e-5, atol=1e-6, err_msg=f"process {i}: {key}")
            np.testing.assert_array_equal(res[key], results[0][key], err_msg=f"process {i} vs 0: {key}")
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_array_equal(held, ref_held)
    # the round moved the parameters (a round that did nothing would agree too)
    initial = round_inputs()[1]["shared"]["embedding"]
    assert not np.allclose(ref_params["shared/embedding"], initial)
    assert np.all(np.isfinite(ref_loss))


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False
    assert initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"):
        initialize_distributed()
    assert jax.process_count() == 1


if __name__ == "__main__":
    worker(sys.argv[1])
