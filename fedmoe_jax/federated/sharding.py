"""Device mesh with a `clients` axis, and cohort padding to the device count.

The cohort's leading axis is sharded over mesh axis `clients`; global parameters are replicated.
A cohort whose size does not divide the number of devices is padded with weight-0 clients, which
change nothing in aggregation. Works unchanged on 1 device, on host CPU devices
(`--xla_force_host_platform_device_count`) and on accelerators.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

CLIENTS = "clients"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh over the first `num_devices` devices (all by default) with axis `clients`."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={n} but {len(devices)} device(s) are available")
    return jax.make_mesh((n,), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices[:n])


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
