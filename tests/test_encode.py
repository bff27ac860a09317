"""`encode`: text/JSONL -> cleaned -> BPE -> NAME_i.tfrecords, resumable, with holdout."""

import json

import numpy as np
import pytest

from conftest import ENCODER_DIR, REPO, STDLIB
from gpt2train import records
from gpt2train.encode import encode_corpus
from gpt2train.errors import UserError


def corpus(tmp_path):
    """Twelve JSONL documents (one too short to keep, one with mojibake) and two plain files."""
    src = tmp_path / "src"
    src.mkdir()
    lines = [{"text": f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 2)} for i in range(10)]
    lines.append({"text": "tiny"})
    lines.append({"text": "donâ€™t ﬁnd it"})  # ftfy repairs the quote, NFKC splits the ligature
    (src / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (src / "a.txt").write_text((STDLIB / "json" / "decoder.py").read_text())
    (src / "b.txt").write_text((STDLIB / "json" / "encoder.py").read_text())
    return src


def read_dir(directory, name="c"):
    out = {}
    for path in sorted(directory.glob(f"{name}_*.tfrecords")):
        out[path.name] = [(t.tolist(), n.decode()) for t, n in records.read_documents(str(path))]
    return out


def test_encode_files_jsonl_minimum_size_and_cleaning(tmp_path, gpt2_tokenizer):
    src = corpus(tmp_path)
    summary = encode_corpus(str(src), str(tmp_path / "out"), "c", str(ENCODER_DIR), files_per=5,
                            minimum_size=3, workers=0, progress=False, log=lambda *_: None)
    files = read_dir(tmp_path / "out")
    assert list(files) == ["c_0.tfrecords", "c_1.tfrecords", "c_2.tfrecords"]  # 14 documents, 5 per file
    docs = [d for f in files.values() for d in f]
    names = [n for _, n in docs]
    assert names[0] == f"{src}/a.txt" and names[1] == f"{src}/b.txt" and names[2] == f"{src}/docs.jsonl:1"
    assert f"{src}/docs.jsonl:11" not in names  # "tiny": 1 token < minimum_size
    assert summary.dropped == 1 and summary.documents == 14 and summary.files == 3
    assert summary.tokens == sum(len(t) for t, _ in docs)
    assert docs[0][0] == gpt2_tokenizer.encode((STDLIB / "json" / "decoder.py").read_text())
    assert gpt2_tokenizer.decode(docs[-1][0]) == "don't find it"
    assert summary.mb_per_s > 0 and "dropped 1 under minimum_size" in summary.line()


def test_resume_skips_finished_files_and_settings_are_guarded(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "out"
    kwargs = dict(files_per=4, minimum_size=1, progress=False, log=lambda *_: None)
    encode_corpus(str(src), str(out), "c", str(ENCODER_DIR), workers=0, **kwargs)
    full = read_dir(out)
    # An interruption: one file never finished (its temporary is left behind), the others are done.
    (out / "c_1.tfrecords").rename(out / "c_1.tfrecords.tmp-999")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecords")}
    summary = encode_corpus(str(src), str(out), "c", str(ENCODER_DIR), workers=2, **kwargs)  # real workers
    assert summary.resumed_files == len(full) - 1 and summary.files == 1
    assert read_dir(out) == full
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # finished files untouched
    with pytest.raises(UserError, match="other settings .*files_per"):
        encode_corpus(str(src), str(out), "c", str(ENCODER_DIR), workers=0, **{**kwargs, "files_per": 3})


def test_holdout_by_fraction_and_by_input(tmp_path):
    src = corpus(tmp_path)
    quiet = dict(minimum_size=1, workers=0, progress=False, log=lambda *_: None)
    s = encode_corpus(str(src), str(tmp_path / "f"), "c", str(ENCODER_DIR), holdout_fraction=0.3, **quiet)
    train, held = read_dir(tmp_path / "f"), read_dir(tmp_path / "f" / "eval")
    train_names = {n for f in train.values() for _, n in f}
    held_names = {n for f in held.values() for _, n in f}
    assert held_names and train_names and not train_names & held_names
    assert len(train_names | held_names) == 14 and s.eval_documents == len(held_names)
    # the split is a function of the names: the same on every run and every machine
    s2 = encode_corpus(str(src), str(tmp_path / "f2"), "c", str(ENCODER_DIR), holdout_fraction=0.3, **quiet)
    assert read_dir(tmp_path / "f2" / "eval") == held and s2.eval_files == s.eval_files
    encode_corpus(str(src / "docs.jsonl"), str(tmp_path / "i"), "c", str(ENCODER_DIR),
                  holdout_inputs=[str(src / "a.txt")], **quiet)
    assert [n for f in read_dir(tmp_path / "i" / "eval").values() for _, n in f] == [f"{src}/a.txt"]


def test_command_line_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    proc = subprocess.run([sys.executable, "-m", "gpt2train", "encode", "--input", str(tmp_path / "bad.jsonl"),
                           "--out", str(tmp_path / "o"), "--name", "x", "--encoder_path", str(ENCODER_DIR),
                           "--workers", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'bad.jsonl, line 2: expected a JSON object with a "text" field' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tokenizer_trains_on_the_same_inputs(tmp_path):
    from gpt2train.cli import run_main
    from gpt2train.tokenizer import load_tokenizer
    src = corpus(tmp_path)
    assert run_main(["tokenizer", "--input", str(src / "docs.jsonl"), str(src / "*.txt"), "--vocab_size", "400",
                     "--out", str(tmp_path / "vocab")]) == 0
    tok = load_tokenizer(str(tmp_path / "vocab"))
    assert tok.n_vocab == 400
    text = "the quick brown fox jumps over the lazy dog"  # from the JSONL documents: merged into few tokens
    assert len(tok.encode(text)) < 0.7 * len(text.encode())
    assert tok.decode(tok.encode(text)) == text
