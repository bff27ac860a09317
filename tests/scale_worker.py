"""Run by test_scale.py in a subprocess with 8 simulated CPU devices: the same 20 training
steps on one device and on meshes 8x1, 4x2, 1x8; prints losses and shardings as JSON."""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, sys.argv[1])  # tests/ (conftest helpers)
from conftest import tiny_config  # noqa: E402
from gpt2train.tokenizer import load_tokenizer  # noqa: E402
from gpt2train.train import Trainer  # noqa: E402


def main(tmp: str, encoder: str) -> None:
    tok = load_tokenizer(encoder)
    out = {"devices": jax.device_count()}
    meshes = [(1, 1), (8, 1), (4, 2), (1, 8)]
    for data, fsdp in meshes:
        cfg = tiny_config(__import__("pathlib").Path(tmp) / f"m{data}x{fsdp}", mesh_data=data, mesh_fsdp=fsdp,
                          max_steps=20, train_steps=20, eval_steps=0, iterations=1, train_batch_size=8,
                          n_embd=64, n_head=4, warmup_steps=5, opt_name="adamw", weight_decay=0.1)
        devices = jax.devices()[:1] if data * fsdp == 1 else None
        trainer = Trainer(cfg, tok, progress=False, log=lambda *a, **k: None, devices=devices)
        result = trainer.run()
        params = trainer.state["params"]
        mu = trainer.state["opt_state"][1][0].mu if hasattr(trainer.state["opt_state"][1][0], "mu") else None
        if (data, fsdp) in ((1, 1), (1, 8)):  # evaluation and generation on the same mesh
            from gpt2train.evaluate import evaluate_stream
            from gpt2train.generate import Generator
            from gpt2train.sampling import SamplingOptions
            stream = np.array(tok.encode("def main(argv):\n    return argv[0]\n" * 20), np.int32)
            ev = evaluate_stream(cfg, params, tok, stream)
            greedy = Generator(cfg, params, tok).generate(
                ["import os"], SamplingOptions(length=6, temperature=0.0, stop_at_eot=False), return_tokens=True)[0]
            out[f"use_{data}x{fsdp}"] = {"eval_loss": ev["loss"], "greedy": greedy}
        out[f"{data}x{fsdp}"] = {
            "losses": [h["loss"] for h in result.history],
            "wte": str(params["wte"].sharding.spec),
            "c_fc": str(params["h"]["mlp"]["c_fc"]["kernel"].sharding.spec),
            "wte_shard_shape": list(params["wte"].addressable_shards[0].data.shape),
            "mu_wte": str(mu["wte"].sharding.spec) if mu is not None else None,
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3])
