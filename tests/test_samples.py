"""Samples during training: every sample_every steps and at the end, to the log, samples.jsonl and
TensorBoard; the same text as `generate` gives from that step's checkpoint with the seed moved
by the step; one compiled decode program for every sample."""

import glob
import json

import pytest

from conftest import tiny_config
from gpt2train.checkpoint import load_params
from gpt2train.errors import UserError
from gpt2train.generate import Generator
from gpt2train.hooks import SampleText, sample_options
from gpt2train.train import Trainer

PROMPTS = ["def parse(", "import json\n"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, gpt2_tokenizer):
    tmp = tmp_path_factory.mktemp("samples")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[0:1]) + "\n\n" + PROMPTS[1].strip() + "\n")
    cfg = tiny_config(tmp, max_steps=7, train_steps=3, eval_steps=0, sample_every=3, sample_prompts=str(prompts),
                      sample_options={"length": 6, "temperature": 0.8, "top_k": 20}, keep_checkpoints=5,
                      plot_every_eval=False)
    lines = []
    trainer = Trainer(cfg, gpt2_tokenizer, progress=False, log=lines.append)
    trainer.run()
    hook = next(h for h in trainer.hooks if isinstance(h, SampleText))
    return cfg, lines, hook


def test_samples_at_their_steps_and_the_end(sampled):
    cfg, lines, hook = sampled
    rows = [json.loads(line) for line in open(cfg.model_path + "/samples.jsonl")]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (3, 6, 7) for p in ("def parse(", "import json")]
    assert all(r["text"] for r in rows)
    logged = "\n".join(lines)
    assert "step 6: samples" in logged and rows[2]["prompt"] + rows[2]["text"] in logged
    events = b"".join(open(f, "rb").read() for f in glob.glob(cfg.model_path + "/tensorboard/*"))
    assert rows[-1]["text"].encode() in events and b"samples/1" in events  # TensorBoard text
    # The decode program compiled once and served all three samples (the last one on new parameters).
    assert hook._gen._decode._cache_size() == 1


def test_a_sample_is_what_generate_gives_that_step_and_seed(sampled, gpt2_tokenizer):
    cfg, _, _ = sampled
    rows = [json.loads(line) for line in open(cfg.model_path + "/samples.jsonl")]
    opts = sample_options(cfg)
    for step in (6, 7):
        params, _ = load_params(cfg, which=step)
        texts = Generator(cfg, params, gpt2_tokenizer).generate(["def parse(", "import json"],
                                                                opts.with_seed_offset(step))
        assert texts == [r["text"] for r in rows if r["step"] == step]
    assert [r["text"] for r in rows if r["step"] == 6] != [r["text"] for r in rows if r["step"] == 7]


def test_sample_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="unknown option topk"):
        sample_options(tiny_config(tmp_path, sample_options={"topk": 3}))
    with pytest.raises(UserError, match="temperature"):
        sample_options(tiny_config(tmp_path, sample_options='{"temperature": -1}'))
    from gpt2train.hooks import sample_prompts
    assert sample_prompts(tiny_config(tmp_path, sample_prompts='["a", "b"]')) == ["a", "b"]  # a command-line list
    assert sample_prompts(tiny_config(tmp_path)) == [""]
    with pytest.raises(UserError, match="no file"):
        sample_prompts(tiny_config(tmp_path, sample_prompts=str(tmp_path / "missing.txt")))
