"""lm-evaluation-harness's HF backend on the tasks' fixture items, in a child process (as the
PyTorch reference in reference.py, and for the same reason: each framework in its own process).

    python -m bench.tasks_reference HF_MODEL_DIR FIXTURES_DIR BATCH_SIZE

builds the model (HFLM, float32, CPU) and the tasks once (the harness's own lambada_openai and
hellaswag configs with the dataset swapped for the local fixture files), then answers each line
on stdin with {"seconds": s}: one timed pass of the harness's evaluate() over every item.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

TASKS = ("fixture_lambada", "fixture_hellaswag")


def write_configs(directory: str, fixtures: str) -> None:
    import lm_eval
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    configs = {
        "fixture_lambada": (f"include: {tasks_dir}/lambada/lambada_openai.yaml\ntask: fixture_lambada\ntag: []\n"
                            "dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
                            f"    test: {fixtures}/lambada_test_en.jsonl\n"),
        "fixture_hellaswag": (f"include: {tasks_dir}/hellaswag/hellaswag.yaml\ntask: fixture_hellaswag\ntag: []\n"
                              "dataset_path: json\ndataset_name: null\ntraining_split: null\ndataset_kwargs:\n"
                              f"  data_files:\n    validation: {fixtures}/hellaswag_val.jsonl\n"),
    }
    for name, text in configs.items():
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(text)


def main(model_dir: str, fixtures: str, batch_size: int) -> None:
    replies = os.fdopen(os.dup(1), "w")  # the protocol's own stdout; anything the harness prints goes to stderr
    os.dup2(2, 1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    configs = tempfile.mkdtemp(prefix="bench_tasks_")
    write_configs(configs, fixtures)
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    task_dict = get_task_dict(list(TASKS), TaskManager(include_path=configs))
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0)  # scores only, as ours: no stderr resampling
        print(json.dumps({"seconds": time.perf_counter() - start}), file=replies, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
