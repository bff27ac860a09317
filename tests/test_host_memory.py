"""The entry points re-run themselves with glibc malloc settings that keep XLA's per-step
temporary buffers mapped, so repeated steps stop faulting them in (gpt2train/host_memory.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gpt2train import host_memory

pytestmark = pytest.mark.skipif(not host_memory.supported(), reason="needs Linux with glibc")

# A jitted function whose 64 MB temporary is far above glibc's mmap threshold; the page faults
# of three calls after a warm-up are counted in the process itself.
PROBE = """
import json, os, resource, sys
from gpt2train.host_memory import reexec_with_resident_heap
reexec_with_resident_heap()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jax.nn.softmax(x @ x.T, axis=0).sum(axis=0))
x = jnp.ones((4096, 64))
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.SWITCH)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reexec_keeps_temporaries_mapped_between_calls():
    resident = probe()
    assert "glibc.malloc.mmap_max=0" in resident["tunables"]
    system = probe(**{host_memory.SWITCH: "system"})
    assert system["tunables"] == ""
    # Without the settings every call maps its 64 MB temporary afresh: 16k pages a call.
    assert system["faults"] > 3 * 10_000, system
    assert resident["faults"] < 2_000, resident


def test_user_tunables_are_kept_and_win():
    env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.foo.bar=1"})
    parts = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.arena_max=4" in parts and "glibc.foo.bar=1" in parts
    assert "glibc.malloc.arena_max=1" not in parts and "glibc.malloc.mmap_max=0" in parts
    assert env[host_memory.SWITCH] == "resident"
