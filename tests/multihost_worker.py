"""One of two processes of a jax.distributed run on 127.0.0.1 (started by test_scale.py).

    python multihost_worker.py TESTS_DIR PORT PROCESS_ID WORKDIR MAX_STEPS

Trains the tiny config to MAX_STEPS (resuming if WORKDIR/model has a checkpoint), records the
rows this process fed, and prints a JSON line with what it saw."""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, sys.argv[1])
from conftest import ENCODER_DIR, tiny_config  # noqa: E402
from gpt2train.distributed import initialize  # noqa: E402


def main(port: int, pid: int, work: pathlib.Path, max_steps: int) -> None:
    initialize(f"127.0.0.1:{port}", 2, pid)
    import jax

    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import Trainer

    cfg = tiny_config(work, max_steps=max_steps, train_steps=4, checkpoint_every=4, eval_steps=1,
                      iterations=1, train_batch_size=4, eval_batch_size=2, prefetch=0)
    trainer = Trainer(cfg, load_tokenizer(str(ENCODER_DIR)), progress=False)
    fed = []
    source_next = trainer.train_data.next_batch

    def recording_next():
        batch = source_next()
        fed.append(batch.tolist())
        return batch

    trainer.train_data.next_batch = recording_next
    start = trainer.step
    result = trainer.run()
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "start": start, "step": result.step,
                                  "fed": fed, "losses": [h["loss"] for h in result.history]}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]), int(sys.argv[5]))
