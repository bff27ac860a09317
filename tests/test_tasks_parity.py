"""Our task scores equal lm-evaluation-harness's (its HF backend) on the same model and items.

A tiny random model is exported to Hugging Face format and scored by both: LAMBADA (acc,
perplexity, and each passage's log-likelihood and greedy flag), HellaSwag
as the harness does it (acc, acc_norm: our mc_acc, mc_acc_norm) and per-document perplexity
(loglikelihood_rolling) of documents longer than the context, so several windows each. The
harness reads the same fixture files through local task configs; its own lambada_openai and
hellaswag configs are included, with only the dataset swapped for the local file."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")

from conftest import tiny_config, write_config  # noqa: E402
from gpt2train.cli import run_main  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")
N_CTX = 64  # short, so long passages and documents are cut and windowed as a 1024 context would cut longer ones


def harness_configs(directory, docs_path):
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    local = {"lambada_test_en.jsonl": os.path.join(FIXTURES, "lambada_test_en.jsonl"),
             "hellaswag_val.jsonl": os.path.join(FIXTURES, "hellaswag_val.jsonl")}
    configs = {
        "fixture_lambada": (f"include: {tasks_dir}/lambada/lambada_openai.yaml\ntask: fixture_lambada\ntag: []\n"
                            f"dataset_path: json\ndataset_name: null\n"
                            f"dataset_kwargs:\n  data_files:\n    test: {local['lambada_test_en.jsonl']}\n"),
        "fixture_hellaswag": (f"include: {tasks_dir}/hellaswag/hellaswag.yaml\ntask: fixture_hellaswag\ntag: []\n"
                              f"dataset_path: json\ndataset_name: null\ntraining_split: null\n"
                              f"dataset_kwargs:\n  data_files:\n    validation: {local['hellaswag_val.jsonl']}\n"),
        "fixture_documents": ("task: fixture_documents\ndataset_path: json\ndataset_name: null\n"
                              f"dataset_kwargs:\n  data_files:\n    test: {docs_path}\n"
                              "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                              "doc_to_target: '{{text}}'\nmetric_list:\n"
                              "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
    }
    for name, text in configs.items():
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    cfg = tiny_config(tmp, n_ctx=N_CTX, eval_data_path=None, eval_steps=0)
    config = write_config(tmp / "config.json", cfg)
    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import Trainer
    trainer = Trainer(cfg, load_tokenizer(cfg.encoder_path), progress=False, log=lambda *a: None)
    trainer.save()  # step 0: random weights
    trainer.ckpt.close()
    assert run_main(["export", "--model", str(config), "--out", str(tmp / "hf")]) == 0

    wiki = open(os.path.join(FIXTURES, "wiki.test.raw"), encoding="utf-8").read()
    docs = [part for part in wiki.split(" = The ")[1:7]]
    docs_path = tmp / "docs.jsonl"
    docs_path.write_text("".join(json.dumps({"text": " = The " + d}) + "\n" for d in docs))
    assert run_main(["evaluate", "--model", str(config), "--task", "lambada", "hellaswag",
                     "--task_data", FIXTURES]) == 0
    ours = json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())["tasks"]
    assert run_main(["evaluate", "--model", str(config), "--per_document", "--data", str(docs_path)]) == 0
    ours.update(json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())["tasks"])

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    harness_configs(tmp, docs_path)
    with pytest.MonkeyPatch.context() as env:  # offline for the harness only, not for later tests
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        out = simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'hf'},dtype=float32", device="cpu",
                              tasks=["fixture_lambada", "fixture_hellaswag", "fixture_documents"], batch_size=4,
                              task_manager=TaskManager(include_path=str(tmp)), log_samples=True)
    # Our per-item log-likelihoods, to hold against the harness's own for every item.
    from gpt2train.checkpoint import load_params
    from gpt2train.tasks.run import TaskRunner
    runner = TaskRunner(cfg, load_tokenizer(cfg.encoder_path), ["lambada"], task_data=FIXTURES)
    prepared, _ = runner.prepared["lambada"]
    per_item = runner.scorer.score(load_params(cfg)[0], prepared.requests)
    return ours, out["results"], len(docs), per_item, out["samples"]


def test_lambada_equals_the_harness(both):
    ours, theirs, _, (ll, greedy), samples = both
    assert ours["lambada"]["acc"] == theirs["fixture_lambada"]["acc,none"]
    assert ours["lambada"]["perplexity"] == pytest.approx(theirs["fixture_lambada"]["perplexity,none"], rel=1e-4)
    # Item by item (a random model is never greedy-right, so the log-likelihoods carry the test).
    by_doc = sorted(samples["fixture_lambada"], key=lambda s: s["doc_id"])
    assert len(by_doc) == len(ll) == 40
    for ours_ll, ours_greedy, sample in zip(ll, greedy, by_doc):
        their_ll, their_greedy = sample["resps"][0][0]
        assert ours_ll == pytest.approx(float(their_ll), abs=1e-4) and bool(ours_greedy) == bool(their_greedy)


def test_hellaswag_multiple_choice_equals_the_harness(both):
    ours, theirs, *_ = both
    assert ours["hellaswag"]["mc_acc"] == theirs["fixture_hellaswag"]["acc,none"]
    assert ours["hellaswag"]["mc_acc_norm"] == theirs["fixture_hellaswag"]["acc_norm,none"]
    assert ours["hellaswag"]["items"] == 40


def test_per_document_perplexity_equals_the_harness(both):
    ours, theirs, n_docs, *_ = both
    doc, ref = ours["per_document"], theirs["fixture_documents"]
    assert doc["items"] == n_docs
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert doc[name] == pytest.approx(ref[f"{name},none"], rel=1e-4), name
