"""The device mesh and the shardings train.py places arrays with.

One code path for every machine: a 2-D mesh of `data` x `fsdp` devices. Batches are split
over all devices (rows over data and fsdp together); parameters and optimizer state are
sharded along `fsdp` (each leaf on its largest dimension that the fsdp size divides, else
replicated) and XLA inserts the gathers and reductions (no hand-written collectives). With
fsdp = 1 this is plain data parallelism; on one CPU everything is one device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import UserError

AXES = ("data", "fsdp")


def mesh_shape(n_devices: int, data: int = 0, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes from the config: 0 or -1 means "the rest of the devices"."""
    fsdp = fsdp if fsdp > 0 else (n_devices // data if data > 0 else n_devices)
    data = data if data > 0 else n_devices // max(fsdp, 1)
    if data * fsdp != n_devices:
        raise UserError(f"mesh_data ({data}) x mesh_fsdp ({fsdp}) must equal the number of devices ({n_devices}): "
                        f"set them so their product is {n_devices} (0 = the rest)")
    return data, fsdp


def make_mesh(devices=None, data: int = 0, fsdp: int = 1) -> Mesh:
    devices = np.array(devices if devices is not None else jax.devices())
    shape = mesh_shape(devices.size, data, fsdp)
    return Mesh(devices.reshape(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_for(cfg, devices=None) -> Mesh:
    return make_mesh(devices, cfg.mesh_data, cfg.mesh_fsdp)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension the fsdp size divides (the later one on ties); else replicate."""
    if fsdp == 1 or not shape:
        return P()
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp == 0 and size >= fsdp and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return P()
    return P(*[("fsdp" if axis == best else None) for axis in range(len(shape))])


def state_shardings(mesh: Mesh, abstract_tree):
    """NamedShardings for every leaf of a (parameter or training-state) tree of shapes."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), fsdp)), abstract_tree)


def check_batch(name: str, batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch % n:
        raise UserError(f"{name} ({batch}) must be divisible by the number of devices ({n}, mesh "
                        f"{mesh.shape['data']} x {mesh.shape['fsdp']}): use a multiple of {n}")


def param_shardings(cfg, mesh: Mesh | None = None):
    """Shardings of the model parameters on the config's mesh (generation and evaluation use these)."""
    from . import model

    mesh = mesh or mesh_for(cfg)
    return state_shardings(mesh, model.abstract_params(cfg))
