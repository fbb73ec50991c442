"""Device mesh with a `clients` axis, and cohort padding to the device count.

The cohort's leading axis is sharded over mesh axis `clients`; global parameters are replicated.
A cohort whose size does not divide the number of devices is padded with weight-0 clients, which
change nothing in aggregation. Works unchanged on 1 device, on host CPU devices
(`--xla_force_host_platform_device_count`) and on accelerators.

Multi-host: `initialize_distributed` starts `jax.distributed` (one call per process, before any
other JAX work); every process then holds the same host-side cohort arrays (sampling and batching
are pure functions of seed, round and client) and `shard_cohort` / `replicate` turn them into
global `jax.Array`s over the whole mesh; `to_host` brings results back to NumPy on every process.
In a single process these are plain `device_put` / `np.asarray`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

CLIENTS = "clients"
EXPERTS = "experts"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> bool:
    """Start multi-process JAX (`jax.distributed.initialize`); returns whether it is running.

    Arguments default to the environment variables `JAX_COORDINATOR_ADDRESS` ("host:port"),
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. With none of them set, or one process, this is a no-op
    (a single-process run); pass `cluster_detection_method=...` to use JAX's own cluster detection
    (Slurm, Open MPI, Cloud TPU) instead. Further keyword arguments go to `jax.distributed.initialize`.
    CPU cross-process collectives are set to gloo unless another implementation was chosen.
    Call it before any other JAX computation; calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    num_processes = _env_int(NUM_PROCESSES_ENV) if num_processes is None else num_processes
    process_id = _env_int(PROCESS_ID_ENV) if process_id is None else process_id
    auto = kwargs.get("cluster_detection_method") not in (None, "deactivate")
    if not auto:
        if num_processes is None and coordinator_address is None and process_id is None:
            return False
        if num_processes == 1:
            return False
        given = {COORDINATOR_ENV: coordinator_address, NUM_PROCESSES_ENV: num_processes,
                 PROCESS_ID_ENV: process_id}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"multi-process run needs {', '.join(missing)} too (arguments or environment "
                             "variables), or unset all three for a single process")
    platforms = (jax.config.jax_platforms or "").split(",")
    uses_cpu = platforms == [""] or "cpu" in platforms
    if uses_cpu and jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    return True


def make_mesh(num_devices: int | None = None, experts: int = 1) -> Mesh:
    """Mesh over the first `num_devices` devices (all by default): axis `clients`, and with
    `experts > 1` a second axis `experts` of that size over which the global experts are split
    (expert parallelism for models too large to replicate)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={n} but {len(devices)} device(s) are available")
    if experts < 1 or n % experts:
        raise ValueError(f"experts={experts} must divide the number of devices ({n})")
    if experts == 1:
        return jax.make_mesh((n,), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices[:n])
    return jax.make_mesh((n // experts, experts), (CLIENTS, EXPERTS),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:n])


def param_sharding(params: Any, config: Any, mesh: Mesh) -> Any:
    """Shardings of the global parameters: each MoE layer's experts (and router columns) split over
    the `experts` axis when the mesh has one and it divides E; everything else replicated."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from fedmoe_jax.federated.submodel import moe_layer_paths

    split = EXPERTS in mesh.axis_names and config.num_experts % mesh.shape[EXPERTS] == 0
    paths = moe_layer_paths(config)
    out = {}
    for key in flatten_dict(dict(params)):
        spec = PartitionSpec()
        layer = next((p for p in paths if key[: len(p)] == p), None)
        if split and layer is not None:
            rest = key[len(layer):]
            if rest == ("router", "kernel"):
                spec = PartitionSpec(None, EXPERTS)
            elif rest[0] == "experts" or rest == ("router", "bias"):
                spec = PartitionSpec(EXPERTS)
        out[key] = NamedSharding(mesh, spec)
    return unflatten_dict(out)


def place_params(params: Any, config: Any, mesh: Mesh) -> Any:
    """Global parameters onto `param_sharding` (works across processes like `replicate`)."""
    return jax.tree.map(_put, params, param_sharding(params, config, mesh))


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over `clients`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def padded_cohort_size(cohort_size: int, mesh: Mesh | None) -> int:
    """The cohort size rounded up to a multiple of the `clients` axis size."""
    n = 1 if mesh is None else mesh.shape[CLIENTS]
    return int(math.ceil(cohort_size / n) * n)


def pad_clients(tree: Any, size: int) -> Any:
    """Pad every leaf's leading (client) axis with zeros to `size` (numpy or jax arrays)."""

    def pad(x):
        x = np.asarray(x)
        if x.shape[0] > size:
            raise ValueError(f"cohort of {x.shape[0]} exceeds the padded size {size}")
        widths = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        return np.pad(x, widths)

    return jax.tree.map(pad, tree)


def _put(x: Any, sharding: Sharding) -> jax.Array:
    """One leaf, identical on every process, onto `sharding` (which may span several processes)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_cohort(tree: Any, mesh: Mesh) -> Any:
    """Host-side cohort arrays `[C, ...]` (the same on every process) -> global arrays over `clients`.

    C must be a multiple of the `clients` axis size (`pad_clients`). PRNG key arrays stay keys.
    """
    return jax.tree.map(lambda x: _put(x, client_sharding(mesh)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host-side arrays (the same on every process, e.g. global parameters) -> replicated global arrays."""
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> full NumPy arrays on every process (replicated ones without communication)."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
