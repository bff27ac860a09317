"""One of two processes of a jax.distributed run on 127.0.0.1 (started by test_tasks.py) that
scores tasks together: each process puts its own rows of every batch.

    python multihost_tasks_worker.py TESTS_DIR PORT PROCESS_ID WORKDIR

Prints a line `RESULT {json}` with the task results this process read back."""

import json
import pathlib
import sys

sys.path.insert(0, sys.argv[1])
from conftest import ENCODER_DIR, REPO, tiny_config  # noqa: E402
from gpt2train.distributed import initialize  # noqa: E402


def main(port: int, pid: int, work: pathlib.Path) -> None:
    initialize(f"127.0.0.1:{port}", 2, pid)
    import jax

    from gpt2train.mesh import mesh_for, replicated
    from gpt2train.tasks.run import TaskRunner
    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import initial_params

    cfg = tiny_config(work, eval_batch_size=2)
    mesh = mesh_for(cfg)
    params = jax.jit(lambda: initial_params(cfg), out_shardings=replicated(mesh))()  # one global copy
    runner = TaskRunner(cfg, load_tokenizer(str(ENCODER_DIR)), ["hellaswag", "lambada"], limit=10,
                        task_data=str(REPO / "tests" / "fixtures" / "tasks"), mesh=mesh)
    results = runner.run(params)
    print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "results": results}),
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
