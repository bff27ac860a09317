"""Training inputs: named sources of token windows, resumable and sharded across hosts.

base.py holds the registry and the WindowSource contract; each format registers itself in
its own module, imported here. A new format is one new module plus one import line below.
"""

from gpt2train.inputs.base import (
    InputFactory,
    WindowSource,
    get_input,
    input_names,
    register_input,
    shard_rows,
    split_settings,
)
from gpt2train.inputs import openwebtext, text, tfrecords  # noqa: F401  (each registers its inputs)
from gpt2train.inputs import bin  # noqa: F401  (nanoGPT and llm.c token shards)
from gpt2train.inputs import parquet  # noqa: F401  (Parquet files, streamed by row group)

__all__ = [
    "InputFactory",
    "WindowSource",
    "get_input",
    "input_names",
    "register_input",
    "shard_rows",
    "split_settings",
]
