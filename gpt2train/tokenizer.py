"""GPT-2's byte-level BPE: encode with tiktoken, train new vocabularies with HF tokenizers.

A vocabulary lives in two files, GPT-2's own format:
  encoder.json  {token: id}, tokens spelled through GPT-2's byte<->unicode table
  vocab.bpe     "#version: 0.2" then one merge "a b" per line, in priority order
Token ids double as BPE ranks: after the 256 byte tokens, ids follow merge order in both
GPT-2's files and the ones `train_tokenizer` writes, which is what tiktoken's merging needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence

import fsspec
import numpy as np
import tiktoken

from gpt2train.errors import UserError
from gpt2train.text_sources import iter_documents, read_text

EOT = "<|endoftext|>"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
MERGES_HEADER = "#version: 0.2"

# GPT-2's pre-tokenizer regex (the same one HF's ByteLevel pre-tokenizer uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_HOW_TO_GET = (
    "get GPT-2's with `python3 download_model.py encoder`, "
    "or train one with `python -m gpt2train tokenizer`"
)

# GPT-2's own encoder.json and vocab.bpe ship with the package: encoding with GPT-2's
# vocabulary, the tests and the demo then need no download.
GPT2_ENCODER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2")


def copy_gpt2_encoder(out_dir: str) -> str:
    """Write GPT-2's encoder.json + vocab.bpe (the package's copy) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    for name in (ENCODER_FILE, MERGES_FILE):
        shutil.copyfile(os.path.join(GPT2_ENCODER_DIR, name), os.path.join(out_dir, name))
    return out_dir


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the rest map to chr(256+n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _token_bytes(token: str) -> bytes:
    table = _unicode_to_byte()
    return bytes(table[c] for c in token)


class Tokenizer:
    """A byte-level BPE vocabulary with one special token, <|endoftext|>."""

    def __init__(self, encoder: dict[str, int], name: str = "gpt2"):
        if EOT not in encoder:
            raise ValueError(f"the vocabulary has no {EOT} token")
        self.eot_id = encoder[EOT]
        ranks = {_token_bytes(tok): i for tok, i in encoder.items() if tok != EOT}
        # explicit_n_vocab makes tiktoken check the ids are exactly 0..n-1.
        self._enc = tiktoken.Encoding(
            name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self.eot_id},
            explicit_n_vocab=len(encoder),
        )
        self.n_vocab = len(encoder)
        self.name = name
        # ids are BPE ranks, so encoder.json alone fixes how text is tokenized.
        digest = hashlib.sha256(json.dumps(encoder, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        self.fingerprint = f"{self.n_vocab}-{digest[:16]}"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal "<|endoftext|>" in it is ordinary text, not eot."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (e.g. a cut multi-byte char) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes per token id, 0 for <|endoftext|>: turns a loss in nats/token into bits/byte."""
        return self._byte_lengths.copy()

    @functools.cached_property
    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for i in range(self.n_vocab):
            if i != self.eot_id:
                lengths[i] = len(self._enc.decode_single_token_bytes(i))
        return lengths


def _check_merges(merges_text: str, encoder: dict[str, int], shown: str) -> None:
    """tiktoken ranks a merge by the id of its result, so new results must appear as 256, 257, ...

    (HF's trainer may repeat a result through a second pair; that merge keeps the first one's id.)
    """
    lines = merges_text.split("\n")
    if not lines[0].startswith("#version"):
        raise UserError(f"{shown} does not start with '{MERGES_HEADER}': it is not a GPT-2 vocab.bpe file")
    next_new = 256
    for k, line in enumerate(lines[1:]):
        if not line:
            continue
        pair = line.split(" ")
        result = encoder.get("".join(pair), -1) if len(pair) == 2 else -1
        if result == next_new:
            next_new += 1
        elif not 256 <= result < next_new:
            raise UserError(
                f"{shown} line {k + 2} ({line!r}) does not match {ENCODER_FILE} "
                f"(expected it to make token {next_new}): the two files must come from the same vocabulary"
            )


def _parse_encoder(text: str, shown: str) -> dict[str, int]:
    """encoder.json's {token: id}, checked: a JSON object of strings to the ids 0..n-1, each once."""
    try:
        encoder = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{shown} is not valid JSON ({e}): the file is damaged; {_HOW_TO_GET}") from None
    if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
        raise UserError(f"{shown} must be a JSON object of tokens to integer ids: {_HOW_TO_GET}")
    ids = sorted(encoder.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, v in enumerate(ids) if v != i)
        why = f"id {ids[gap]} is repeated" if ids[gap] < gap else f"id {gap} is missing"
        raise UserError(f"{shown} does not number its {len(ids)} tokens 0..{len(ids) - 1} once each ({why}): "
                        f"the file is damaged; {_HOW_TO_GET}")
    return encoder


def encoder_dir(encoder_path: str) -> str:
    """The directory an encoder_path names; '' is GPT-2's own, shipped with the package (a config that
    leaves encoder_path out trains, and exports, with GPT-2's BPE)."""
    return encoder_path or GPT2_ENCODER_DIR


def load_tokenizer(encoder_path: str) -> Tokenizer:
    """Load encoder.json + vocab.bpe from a directory (local path or fsspec URL; '': see encoder_dir)."""
    encoder_path = encoder_dir(encoder_path)
    fs, root = fsspec.core.url_to_fs(encoder_path)
    if not fs.isdir(root):
        raise UserError(
            f"encoder_path {encoder_path!r} is not a directory holding {ENCODER_FILE} and {MERGES_FILE}: "
            + _HOW_TO_GET
        )
    paths = {name: posixpath.join(root, name) for name in (ENCODER_FILE, MERGES_FILE)}
    shown = {name: f"{encoder_path.rstrip('/')}/{name}" for name in paths}
    missing = [shown[name] for name, path in paths.items() if not fs.isfile(path)]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}: {_HOW_TO_GET}")
    encoder = _parse_encoder(read_text(shown[ENCODER_FILE]), shown[ENCODER_FILE])
    if EOT not in encoder:
        raise UserError(f"{shown[ENCODER_FILE]} has no {EOT} token: {_HOW_TO_GET}")
    merges = read_text(shown[MERGES_FILE])
    _check_merges(merges, encoder, shown[MERGES_FILE])
    return Tokenizer(encoder, name=encoder_path)


# ---------------------------------------------------------------- training

# A lone line break between non-spaces is a pre-token of its own under GPT-2's regex, so cutting
# the text right after it changes nothing while letting HF pre-tokenize chunks in parallel.
# (After a longer whitespace run the cut would not be safe: "\r\nx" splits as "\r", "\n", "x".)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    start = 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.end()]
        start = cut.end()
    yield text[start:]


def _corpus(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Text of every document (plain files, JSONL lines, Parquet rows), cut into pieces."""
    for _, text in iter_documents(files, text_field):
        yield from _chunks(text)


def _train_hf(texts: Iterable[str], n_learned: int, min_frequency: int):
    """Train HF's byte-level BPE with GPT-2's settings; returns a tokenizers.Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def _vocab_and_merges(hf) -> tuple[dict[str, int], list[str]]:
    model = json.loads(hf.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _write_gpt2_files(encoder: dict[str, int], merges: list[str], out_dir: str) -> None:
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, ENCODER_FILE), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with fs.open(posixpath.join(root, MERGES_FILE), "w", encoding="utf-8") as f:
        f.write(MERGES_HEADER + "\n" + "".join(m + "\n" for m in merges))


def train_tokenizer(files: list[str], vocab_size: int, out_dir: str, *, min_frequency: int = 2,
                    text_field: str = "text") -> Tokenizer:
    """Learn a byte-level BPE of `vocab_size` ids (the last is <|endoftext|>) and save it in out_dir."""
    if vocab_size < 257:
        raise UserError(
            f"vocab_size {vocab_size} is too small: it needs 256 byte tokens + {EOT}, so at least 257"
        )
    if not files:
        raise UserError("no text files to train the tokenizer on: pass at least one")
    hf = _train_hf(_corpus(files, text_field), vocab_size - 1, min_frequency)
    encoder, merges = _vocab_and_merges(hf)
    if len(encoder) != vocab_size - 1:
        raise UserError(
            f"the training text only supports {len(encoder) + 1} tokens (merges seen at least "
            f"{min_frequency} times), not vocab_size {vocab_size}: use a smaller vocab_size or more text"
        )
    if len(merges) != len(encoder) - 256:
        # Two pairs made one token; tiktoken ranks it once, so rare words could split differently.
        warnings.warn(f"{len(merges) - len(encoder) + 256} BPE merges repeat a token", stacklevel=2)
    encoder[EOT] = vocab_size - 1
    _write_gpt2_files(encoder, merges, out_dir)
    return load_tokenizer(out_dir)
