"""One of two processes of a jax.distributed run on 127.0.0.1 (started by test_reliability.py).

    python preemption_worker.py TESTS_DIR PORT PROCESS_ID WORKDIR

Trains the tiny config towards a far max_steps until a SIGTERM reaches either process; prints
the step where this process stopped, which must be the same on both."""

import json
import pathlib
import sys

sys.path.insert(0, sys.argv[1])
from conftest import ENCODER_DIR, tiny_config  # noqa: E402
from gpt2train.distributed import initialize  # noqa: E402


def main(port: int, pid: int, work: pathlib.Path) -> None:
    initialize(f"127.0.0.1:{port}", 2, pid)
    import jax

    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import Interrupted, Trainer

    cfg = tiny_config(work, max_steps=100_000, train_steps=100_000, checkpoint_every=100_000, eval_steps=0,
                      iterations=1, train_batch_size=4, prefetch=0)
    trainer = Trainer(cfg, load_tokenizer(str(ENCODER_DIR)), progress=False)
    print("READY", flush=True)
    try:
        trainer.run()
        stopped, how = trainer.step, "finished"
    except Interrupted:
        stopped, how = trainer.step, "interrupted"
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": stopped, "how": how}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
