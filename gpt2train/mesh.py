"""The device mesh and the shardings train.py places arrays with.

One code path for every machine: a 2-D mesh with a `data` axis (batch rows) and an `fsdp`
axis (reserved for sharding parameters). Today parameters are replicated and the batch is
split along `data`; on one CPU both axes have size 1 and this costs nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import UserError


def make_mesh(devices=None) -> Mesh:
    devices = np.array(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1, 1), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(name: str, batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch % n:
        raise UserError(f"{name} ({batch}) must be divisible by the number of devices ({n}); "
                        f"use a multiple of {n}")
