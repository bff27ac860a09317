"""The PyTorch reference (HF transformers' GPT-2 on torch CPU), run in a child process.

Each framework runs in its own process, as users run them: measured in one process, PyTorch's
presence slowed our training step by a third on the reference machine (the kernel's cost of
mapping XLA's per-step temporary buffer, 2 GB at 124M, rose from ~0.9 s to 3-4 s of system
time per step), which is a figure neither system shows in use. The parent still runs the two
sides in turns, so load on the machine hits both alike. The child inherits the parent's
environment, including the malloc settings our entry points use (gpt2train/host_memory.py);
PyTorch gains from them too (evaluation at 8 x 1024: ~1.35x), so the comparison stays fair.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
    {"op": "train" | "generate" | "eval", ...shape...}  -> {"id": n}   (builds the workload)
    {"op": "time", "id": n}                             -> {"seconds": s} (runs it once)
    {"op": "info"}                                      -> its threads and BLAS (machine_info)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np


def gpt2(L, D, H, V, T):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V, n_positions=T, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def autocast(precision: str):
    """PyTorch's own mixed precision for `precision: bfloat16` (float32 weights, bfloat16 products),
    nothing for float32."""
    import contextlib

    import torch
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_workload(L, D, H, V, B, T, precision="float32"):
    """One full step: forward with labels (under autocast for bfloat16), backward, AdamW."""
    import torch
    model = gpt2(L, D, H, V, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.tensor(np.random.default_rng(0).integers(0, V, (B, T)))

    def step():
        with autocast(precision):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def generate_workload(L, D, H, V, T, ids, new_tokens, precision="float32"):
    """Greedy `generate()` with its KV cache, exactly `new_tokens` new tokens per row; for bfloat16
    the model itself is cast to bfloat16 (weights and cache), as one decodes in bfloat16."""
    import torch
    model = gpt2(L, D, H, V, T).eval()
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    x = torch.tensor(ids)

    def run():
        with torch.no_grad():
            model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, attention_mask=torch.ones_like(x))
    return run


def eval_workload(L, D, H, V, B, T, precision="float32"):
    """Forward pass with the loss (labels; under autocast for bfloat16), no gradients."""
    import torch
    model = gpt2(L, D, H, V, T).eval()
    x = torch.tensor(np.random.default_rng(0).integers(0, V, (B, T + 1))[:, :-1])

    def run():
        with torch.no_grad(), autocast(precision):
            model(x, labels=x)
    return run


BUILDERS = {"train": train_workload, "generate": generate_workload, "eval": eval_workload}


def machine_info() -> dict:
    """What the reference computes with: torch's intra-op and inter-op threads, the BLAS it was
    built with (torch.__config__.show()), and the CPU kernels it dispatches to."""
    import torch
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads(),
            "blas": blas.group(1) if blas else "unknown", "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def serve() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to stderr; stdout carries only replies
    workloads = []
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "time":
            t = time.perf_counter()
            workloads[req["id"]]()
            reply = {"seconds": time.perf_counter() - t}
        elif req["op"] == "info":
            reply = machine_info()
        else:
            workloads.append(BUILDERS[req["op"]](*req["args"]))
            reply = {"id": len(workloads) - 1}
        out.write(json.dumps(reply) + "\n")


class Reference:
    """The parent's handle on the child process: `workload(...)` returns a function that runs
    the workload once in the child and returns the seconds it took there."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch reference process died (exit code {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def info(self) -> dict:
        """The reference's threads and BLAS (machine_info), as its own process sees them."""
        return self._ask({"op": "info"})

    def workload(self, op: str, *args):
        wid = self._ask({"op": op, "args": list(args)})["id"]
        return lambda: self._ask({"op": "time", "id": wid})["seconds"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def available() -> bool:
    """Whether torch and transformers are installed (without importing them here)."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


if __name__ == "__main__":
    serve()
