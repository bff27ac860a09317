import glob
import json
import sysconfig
from pathlib import Path

import fsspec
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from conftest import ENCODER_DIR
from gpt2train.errors import UserError
from gpt2train.tokenizer import _chunks, _train_hf, _vocab_and_merges, load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])

TRICKY = (
    "Héllo, wörld! Ünïcödé — “quotes” ‘x’ 中文字符 日本語 한국어\n"
    "emoji 🎉👍🏽 e\u0301 \u200b zero-width\n"
    "  \t mixed   whitespace runs\n\n\n    indented\r\n"
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}  # it's we've they'll I'd\n"
    "numbers 1234567890 ٣٤٥ and symbols @#$%^&*()_+=~`|\\<>?/\n"
)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(str(ENCODER_DIR))


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_id == 50256
    assert gpt2.n_vocab == 50257


def test_gpt2_round_trip(gpt2):
    ids = gpt2.encode(TRICKY)
    assert gpt2.decode(ids) == TRICKY
    assert gpt2.decode_bytes(ids) == TRICKY.encode()
    assert gpt2.encode_batch([TRICKY, "Hello world", ""]) == [ids, [15496, 995], []]


def test_literal_eot_is_ordinary_text(gpt2):
    ids = gpt2.encode("before <|endoftext|> after")
    assert gpt2.eot_id not in ids
    assert gpt2.decode(ids) == "before <|endoftext|> after"
    assert gpt2.decode([gpt2.eot_id]) == "<|endoftext|>"


def test_decode_replaces_invalid_utf8(gpt2):
    ids = gpt2.encode("🎉")
    assert len(ids) > 1  # a rare emoji is split inside its UTF-8 bytes
    head = gpt2.decode_bytes(ids[:1])
    assert "🎉".encode().startswith(head) and head != "🎉".encode()
    assert gpt2.decode(ids[:1]) == head.decode("utf-8", errors="replace")
    assert "\ufffd" in gpt2.decode(ids[:1])


def test_token_byte_lengths(gpt2):
    lengths = gpt2.token_byte_lengths()
    assert lengths.shape == (gpt2.n_vocab,)
    assert lengths[gpt2.eot_id] == 0
    ids = gpt2.encode(TRICKY)
    assert lengths[ids].sum() == len(TRICKY.encode())
    assert lengths[ids + [gpt2.eot_id]].sum() == len(TRICKY.encode())


def test_missing_encoder_dir(tmp_path):
    with pytest.raises(UserError, match="download_model.py") as err:
        load_tokenizer(str(tmp_path / "nope"))
    assert "nope" in str(err.value)


def test_missing_merges_file(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(UserError, match="vocab.bpe.*download_model.py"):
        load_tokenizer(str(tmp_path))


def test_mismatched_files(tmp_path):
    (tmp_path / "encoder.json").write_text((ENCODER_DIR / "encoder.json").read_text())
    merges = (ENCODER_DIR / "vocab.bpe").read_text().split("\n")
    merges[1], merges[2] = merges[2], merges[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(merges))
    with pytest.raises(UserError, match="same vocabulary"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- training

TRAIN_FILES = sorted(glob.glob(str(STDLIB / "json" / "*.py")))
HELD_OUT = [STDLIB / "textwrap.py", STDLIB / "string.py", STDLIB / "colorsys.py"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_tokenizer(TRAIN_FILES, 600, str(out)), out


def _hf_from_files(out: Path) -> HFTokenizer:
    hf = HFTokenizer(models.BPE.from_file(str(out / "encoder.json"), str(out / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return hf


def test_trained_files_in_gpt2_format(trained):
    tok, out = trained
    merges = (out / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2"
    assert merges[-1] == ""  # ends with a newline, like GPT-2's
    assert all(len(m.split(" ")) == 2 for m in merges[1:-1])
    encoder = json.loads((out / "encoder.json").read_text(encoding="utf-8"))
    assert len(encoder) == 600 and sorted(encoder.values()) == list(range(600))
    assert encoder["<|endoftext|>"] == 599
    assert tok.n_vocab == 600 and tok.eot_id == 599


def test_trained_matches_hf(trained):
    tok, out = trained
    held_out = [p.read_text(encoding="utf-8") for p in HELD_OUT] + [TRICKY]
    # The HF tokenizer straight out of training, and one rebuilt from the saved files.
    hf_trained = _train_hf((Path(f).read_text(encoding="utf-8") for f in TRAIN_FILES), 599, 2)
    vocab, _ = _vocab_and_merges(hf_trained)
    assert vocab == {k: v for k, v in json.loads((out / "encoder.json").read_text()).items() if v < 599}
    hf_saved = _hf_from_files(out)
    for text in held_out:
        ids = tok.encode(text)
        assert ids == hf_trained.encode(text).ids
        assert ids == hf_saved.encode(text).ids
        assert tok.decode(ids) == text
    assert tok.eot_id not in tok.encode("x <|endoftext|> y")


def test_trained_byte_lengths(trained):
    tok, _ = trained
    assert tok.token_byte_lengths()[tok.encode(TRICKY)].sum() == len(TRICKY.encode())


def test_train_bad_vocab_size(tmp_path):
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(TRAIN_FILES, 256, str(tmp_path))
    with pytest.raises(UserError, match="smaller vocab_size"):
        train_tokenizer(TRAIN_FILES[:1], 50000, str(tmp_path))


def test_repeated_merge_result_is_accepted(trained, tmp_path):
    _, out = trained
    encoder = json.loads((out / "encoder.json").read_text(encoding="utf-8"))
    merges = (out / "vocab.bpe").read_text(encoding="utf-8")
    assert "ĠĠ ĠĠ\n" in merges  # four spaces from two pairs of two ...
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(merges + "Ġ ĠĠĠ\n", encoding="utf-8")  # ... and again from 1 + 3
    assert load_tokenizer(str(tmp_path)).n_vocab == 600


def test_fsspec_out_dir():
    tok = train_tokenizer(TRAIN_FILES, 300, "memory://bpe-test/")
    assert load_tokenizer("memory://bpe-test").encode("import json") == tok.encode("import json")
    fsspec.filesystem("memory").rm("/bpe-test", recursive=True)


def test_chunking_keeps_pre_tokens():
    text = TRICKY * 3 + "x\n\n   y\nz\r\nw \n v\n\n"
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    whole = [t for t, _ in split(text)]
    for size in range(1, 40):
        chunks = list(_chunks(text, size=size))
        assert len(chunks) > 3 and "".join(chunks) == text
        assert [t for c in chunks for t, _ in split(c)] == whole


def test_an_empty_encoder_path_is_gpt2s_own_bpe():
    """A config without encoder_path trains with GPT-2's BPE shipped in the package."""
    from gpt2train.tokenizer import GPT2_ENCODER_DIR, load_tokenizer
    default, shipped = load_tokenizer(""), load_tokenizer(GPT2_ENCODER_DIR)
    assert default.n_vocab == shipped.n_vocab == 50257
    assert default.encode("Hello world") == shipped.encode("Hello world") == [15496, 995]  # GPT-2's ids
