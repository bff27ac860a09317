"""Scale: meshes of 8 simulated devices, two processes with jax.distributed, the memory tool."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENCODER_DIR, REPO, tiny_config
from gpt2train.config import Config
from gpt2train.errors import UserError
from gpt2train.mesh import fsdp_spec, make_mesh, mesh_shape

TESTS = pathlib.Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def test_meshes_give_one_devices_losses_with_sharded_state(tmp_path):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(TESTS / "scale_worker.py"), str(TESTS), str(tmp_path), str(ENCODER_DIR)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["devices"] == 8
    one = out["1x1"]["losses"]
    assert len(one) == 20 and one[-1] < one[0]
    for mesh in ("8x1", "4x2", "1x8"):
        np.testing.assert_allclose(out[mesh]["losses"], one, rtol=0, atol=2e-5)
    assert out["8x1"]["wte"] == "P()"  # data parallel: replicated parameters
    for mesh, fsdp in (("4x2", 2), ("1x8", 8)):
        assert out[mesh]["wte"] == "P('fsdp', None)" and out[mesh]["c_fc"] == "P(None, None, 'fsdp')"
        assert out[mesh]["mu_wte"] == "P('fsdp', None)"  # optimizer state sharded like its parameter
        assert out[mesh]["wte_shard_shape"] == [50304 // fsdp, 64]
    # Evaluation and generation run on the mesh with sharded parameters and agree with one device.
    assert out["use_1x8"]["greedy"] == out["use_1x1"]["greedy"]
    assert out["use_1x8"]["eval_loss"] == pytest.approx(out["use_1x1"]["eval_loss"], abs=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(work, max_steps):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "multihost_worker.py"), str(TESTS), str(port), str(pid),
                               str(work), str(max_steps)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for pid in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    return results


def test_two_processes_train_together_read_disjoint_rows_and_resume(tmp_path, gpt2_tokenizer):
    first = two_processes(tmp_path, 4)
    assert [r["process"] for r in first] == [0, 1] and all(r["processes"] == 2 and r["devices"] == 2 for r in first)
    assert first[0]["losses"] == first[1]["losses"] and len(first[0]["losses"]) == 4  # one global step
    # Each process fed its own rows of the global batch: rows p::2 of what one process would read.
    from gpt2train.inputs import get_input
    cfg = tiny_config(tmp_path, train_batch_size=4)
    whole = get_input("text")(cfg, "train", gpt2_tokenizer)
    for step in range(4):
        global_batch = whole.next_batch()
        for pid in (0, 1):
            assert np.array_equal(np.array(first[pid]["fed"][step]), global_batch[pid::2])
    assert sorted(p.name for p in (tmp_path / "model" / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    resumed = two_processes(tmp_path, 8)
    assert all(r["start"] == 4 and r["step"] == 8 for r in resumed)
    assert sorted(int(p.name) for p in (tmp_path / "model" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(x["step"] for x in lines if "loss" in x) == list(range(1, 9))  # one writer, each step once


def test_mesh_shapes_and_errors():
    assert mesh_shape(8, 0, 1) == (8, 1) and mesh_shape(8, 2, 0) == (2, 4) and mesh_shape(8, 0, 4) == (2, 4)
    with pytest.raises(UserError, match=r"mesh_data \(3\) x mesh_fsdp \(2\) must equal the number of devices \(8\)"):
        mesh_shape(8, 3, 2)
    assert fsdp_spec((50304, 768), 8) == jax.sharding.PartitionSpec("fsdp", None)
    assert fsdp_spec((12, 768, 3072), 4) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert fsdp_spec((25,), 2) == jax.sharding.PartitionSpec()  # nothing divides: replicated
    assert make_mesh().shape == {"data": jax.device_count(), "fsdp": 1}


@pytest.mark.parametrize("opt", ["adamw", "adafactor"])
def test_memory_tool_agrees_with_xlas_compiled_memory_analysis(opt):
    from gpt2train.memory import estimate
    from gpt2train.optimizers import make_optimizer
    from gpt2train.train import init_state, make_train_step
    cfg = Config(n_layer=2, n_embd=64, n_head=4, n_vocab=1000, n_ctx=64, train_batch_size=8, opt_name=opt,
                 beta1=0.0 if opt == "adafactor" else 0.9, embed_dropout=0, attn_dropout=0, res_dropout=0).validate()
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda: init_state(cfg, tx))
    batch = jax.ShapeDtypeStruct((cfg.train_batch_size, cfg.n_ctx + 1), jnp.int32)
    analysis = jax.jit(make_train_step(cfg, tx), donate_argnums=0).lower(state, batch).compile().memory_analysis()
    ours = estimate(cfg, 1, (1, 1))
    # Parameters + optimizer state: exact (XLA's arguments are those, the batch, and two scalars).
    state_bytes = analysis.argument_size_in_bytes - batch.size * 4
    assert abs(state_bytes - (ours.params + ours.optimizer)) <= 1e-3 * state_bytes
    # Gradients + activations: XLA's temporary buffers, within 35%.
    assert 0.65 < analysis.temp_size_in_bytes / (ours.grads + ours.activations) < 1.35


def test_memory_command_and_sheet(tmp_path):
    from gpt2train.cli import run_main
    assert run_main(["memory", "--sheet", str(tmp_path / "scale.md")]) == 0
    sheet = (tmp_path / "scale.md").read_text()
    assert sheet == (REPO / "docs" / "scale.md").read_text()  # the committed sheet is the tool's output
    assert "| 1558M | 64 | 8 x 8 |" in sheet
