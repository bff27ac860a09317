"""The seed's OpenWebText inputs over .tfrecords: short documents, long ones, or a mixture.

  openwebtext             data_path, documents stitched 42 at a time (or `stitch`);
  openwebtext_long        long_data_path (eval: long_eval_data_path, else eval_data_path), stitch 2;
  openwebtext_longbiased  data_path (stitch 42) and long_data_path (stitch 2) mixed 0.3/0.7
                          (or by data_weights).
Windows are laid out as in gpt2train.inputs.tfrecords.
"""

from __future__ import annotations

from gpt2train.errors import UserError
from gpt2train.inputs.base import register_input, split_settings
from gpt2train.inputs.tfrecords import record_mixture


@register_input("openwebtext")
def openwebtext_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """The seed's OpenWebText input: documents stitched 42 at a time."""
    _, spec, _, _ = split_settings(cfg, split)
    return record_mixture(cfg, split, tokenizer, [spec], [1.0], [cfg.stitch or 42],
                          process_index=process_index, process_count=process_count)


def _long_spec(cfg, split):
    spec = cfg.long_data_path if split == "train" else (cfg.long_eval_data_path or cfg.eval_data_path)
    if not spec:
        raise UserError('this input needs "long_data_path": set it to the .tfrecords of long documents')
    return spec


@register_input("openwebtext_long")
def openwebtext_long_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """Long documents only (long_data_path; eval: long_eval_data_path, else eval_data_path), stitch 2."""
    return record_mixture(cfg, split, tokenizer, [_long_spec(cfg, split)], [1.0], [cfg.stitch or 2],
                          process_index=process_index, process_count=process_count)


@register_input("openwebtext_longbiased")
def openwebtext_longbiased_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """A 0.3/0.7 mixture of data_path (stitch 42) and long_data_path (stitch 2), as the seed's."""
    _, spec, _, _ = split_settings(cfg, split)
    weights = cfg.data_weights or [0.3, 0.7]
    return record_mixture(cfg, split, tokenizer, [spec, _long_spec(cfg, split)], weights, [42, 2],
                          process_index=process_index, process_count=process_count)
