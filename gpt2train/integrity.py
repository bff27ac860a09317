"""Checksums that tell a checkpoint that was written from one that was damaged afterwards.

Every array of a saved state gets a 64-bit checksum, computed on the devices that hold it (a
sharded array is never gathered to one host): two 32-bit sums over the array's bits read as
unsigned integers, the first weighting element i by the odd number 2i + 1, the second mixing
each element with its index before adding. Integer sums wrap exactly and do not depend on the
order of addition, so the value is the same on any mesh and any backend. Any change of a single
element changes the first sum (an odd weight is invertible modulo 2^32); changes of several
elements that cancel in both sums are a 2^-64 chance. The data position and config (JSON) get
a SHA-256 of their canonical text.

The checksums are saved as their own item of the checkpoint (checkpoint.py), inside the
directory Orbax renames into place only when the whole step is written, so a step either has
its manifest or does not exist.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp

from .errors import UserError

MANIFEST_VERSION = 1


class DamagedCheckpoint(UserError):
    """A checkpoint whose contents differ from what was saved."""

    def __init__(self, message: str, step: int, what: str):
        super().__init__(message)
        self.step, self.what = step, what


def _as_uint32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32, one per element."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no checksum for arrays of {x.dtype}")


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit avalanche (every input bit flips about half the output bits)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
    bits = _as_uint32(x).reshape(-1)
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    weighted = jnp.sum(bits * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix(bits ^ _mix(i + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


_checksums = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def leaf_name(path) -> str:
    """'params/wte', 'opt_state/1/0/mu/wte': a leaf's path in a state, readable in a message."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def array_checksums(tree) -> dict[str, str]:
    """{leaf name: 16 hex digits} of every array in `tree` (a train state or its parameters)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [leaf_name(path) for path, _ in flat]
    values = jax.device_get(_checksums([x for _, x in flat]))
    return {name: f"{int(v[0]):08x}{int(v[1]):08x}" for name, v in zip(names, values)}


def json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest(state, meta: dict) -> dict:
    """What a save records next to the state: per-array checksums and the metadata's digest."""
    return {"version": MANIFEST_VERSION, "arrays": array_checksums(state), "meta": json_digest(meta)}


def verify_meta(saved: dict, meta: dict, step: int, where: str) -> None:
    if saved.get("meta") != json_digest(meta):
        raise DamagedCheckpoint(
            f"the checkpoint of step {step} in {where} is damaged: its data position and config (meta) "
            f"differ from what was saved", step, "meta")


def verify_arrays(saved: dict, tree, step: int, where: str, prefix: str = "") -> None:
    """Raise DamagedCheckpoint naming the first array of `tree` whose checksum differs.

    `prefix` places a partial tree (the parameters alone) in the saved state's names."""
    expected = saved.get("arrays", {})
    for name, got in array_checksums(tree).items():
        full = prefix + name
        if full not in expected:
            raise DamagedCheckpoint(f"the checkpoint of step {step} in {where} has no checksum for {full}: "
                                    "its manifest does not match its arrays", step, full)
        if expected[full] != got:
            raise DamagedCheckpoint(
                f"the checkpoint of step {step} in {where} is damaged: array {full} differs from what was "
                f"saved (checksum {got}, saved {expected[full]})", step, full)
