import json

import pytest

from gpt2train.config import Config, FIELDS, apply_overrides, describe_keys, load_config
from gpt2train.errors import UserError
from conftest import REPO


def write(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def test_seed_keys_and_defaults_documented():
    seed_keys = ("n_ctx n_embd n_layer n_head n_vocab scale_by_depth scale_by_in precision input lr warmup_steps "
                 "opt_name weight_decay beta1 beta2 epsilon decay_type decay_exponent train_steps eval_steps "
                 "max_steps iterations embed_dropout attn_dropout res_dropout model_path data_path encoder_path "
                 "train_batch_size eval_batch_size predict_batch_size predict_path").split()
    for k in seed_keys:
        assert k in FIELDS and FIELDS[k].metadata["seed"], k
    for k, f in FIELDS.items():
        assert f.metadata["doc"], k
    text = describe_keys()
    assert all(k in text for k in FIELDS)


def test_unknown_key_names_key_and_nearest(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, {"n_layr": 4}))
    assert "'n_layr'" in str(e.value) and "'n_layer'" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, {}), {"learning_rate": 0.1})
    assert "'learning_rate'" in str(e.value)


@pytest.mark.parametrize("data, words", [
    ({"n_embd": 100, "n_head": 3}, ["n_embd (100)", "n_head (3)"]),
    ({"n_layer": 0}, ["n_layer must be positive"]),
    ({"precision": "fp16"}, ["precision", "fp16"]),
    ({"opt_name": "sgd"}, ["opt_name", "sgd"]),
    ({"decay_type": "linear"}, ["decay_type"]),
    ({"n_ctx": "long"}, ["'n_ctx'", "int", "long"]),
    ({"attn_dropout": 1.5}, ["attn_dropout"]),
    ({"train_batch_size": 6, "grad_accum_steps": 4}, ["grad_accum_steps"]),
    ({"beta2": 1.0}, ["beta2 must be in [0, 1), got 1.0"]),
    ({"mesh_fsdp": 0, "seed": -2}, ["mesh_fsdp must be positive, got 0", "seed must be >= 0, got -2"]),
    ({"window_order": "shuffled"}, ["window_order must be one of ('random', 'sequential'), got 'shuffled'"]),
    ({"eval_tasks": "lambada"}, ["eval_tasks must be a list of task names"]),
    ({"data_weights": [1, "x"]}, ["data_weights must be a list of numbers"]),
])
def test_invalid_values_are_explained(tmp_path, data, words):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, data))
    for w in words:
        assert w in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(write(tmp_path, "{bad json"))
    with pytest.raises(UserError, match="JSON object"):
        load_config(write(tmp_path, "[1, 2]"))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, {"n_layer": 2}), {"n_layer": "3", "lr": "1e-4", "scale_by_in": "true",
                                                       "max_steps": "1e3"})
    assert (cfg.n_layer, cfg.lr, cfg.scale_by_in, cfg.max_steps) == (3, 1e-4, True, 1000)
    with pytest.raises(UserError, match="'n_layer' must be a int"):
        apply_overrides(Config(), {"n_layer": "2.5"}, text=True)


def test_shipped_configs_load():
    for name in ("124M", "355M", "774M", "1558M", "demo"):
        cfg = load_config(str(REPO / "configs" / f"{name}.json"))
        assert cfg.n_embd % cfg.n_head == 0
    shapes = {n: load_config(str(REPO / "configs" / f"{n}.json")) for n in ("124M", "355M", "774M", "1558M")}
    assert [(c.n_layer, c.n_embd, c.n_head) for c in shapes.values()] == [
        (12, 768, 12), (24, 1024, 16), (36, 1280, 20), (48, 1600, 25)]


def test_demo_config_matches_the_demo_command():
    from gpt2train.demo import demo_config_dict
    shipped = json.loads((REPO / "configs" / "demo.json").read_text())
    assert shipped == demo_config_dict("demo_run")


def test_padded_vocab():
    assert Config(n_vocab=50257).padded_vocab == 50304
    assert Config(n_vocab=50257, pad_vocab_to=1).padded_vocab == 50257


def test_readable_aliases_mean_the_seed_keys(tmp_path):
    cfg = load_config(write(tmp_path, {"eval_every": 50, "log_every": 5}), {"eval_batches": "3"})
    assert (cfg.train_steps, cfg.iterations, cfg.eval_steps) == (50, 5, 3)
    # The seed's names keep working, and a command-line alias overrides the file's seed name.
    assert load_config(write(tmp_path, {"train_steps": 50}), {"eval_every": "20"}).train_steps == 20
    with pytest.raises(UserError, match="eval_every is another name for train_steps"):
        load_config(write(tmp_path, {"eval_every": 50, "train_steps": 40}))
    with pytest.raises(UserError, match="'log_every'"):
        load_config(write(tmp_path, {"log_evry": 5}))  # the nearest key may be an alias


def test_options_doc_is_generated_from_the_declarations():
    from gpt2train.option_docs import keys_markdown
    from gpt2train.optimizers import OPTIMIZERS
    from gpt2train.sampling import option_fields
    doc = (REPO / "docs" / "options.md").read_text()
    assert doc == keys_markdown()  # regenerate: python -m gpt2train keys --markdown > docs/options.md
    for name in [*FIELDS, *OPTIMIZERS, *(f.name for f in option_fields())]:
        assert f"| `{name}` |" in doc, name
    assert "Alias: `eval_every`" in doc


def test_every_declared_check_is_enforced_and_documented():
    """A key's range or choices is declared once with it: the same Check rejects a bad value in
    validate() and is stated in docs/options.md."""
    from gpt2train.config import FIELDS, Config
    from gpt2train.option_docs import keys_markdown

    doc = keys_markdown()
    checked = [name for name, f in FIELDS.items() if f.metadata["check"] is not None]
    assert len(checked) >= 40
    for name in checked:
        check = FIELDS[name].metadata["check"]
        assert check.accepts(FIELDS[name].default), name  # every default passes its own check
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"Must be {check.phrase}." in row
    with pytest.raises(UserError, match=r"keep_checkpoints must be positive, got -1"):
        Config(keep_checkpoints=-1).validate()
