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
from gpt2train.inputs.tfrecords import record_mixture, record_source


@register_input("openwebtext")
def openwebtext_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """The seed's OpenWebText input: documents stitched 42 at a time."""
    path_key, spec, _, _ = split_settings(cfg, split)
    return record_source(cfg, split, tokenizer, path_key, spec, cfg.stitch or 42,
                         process_index=process_index, process_count=process_count)


def _long_paths(cfg, split) -> tuple[str, object]:
    """(config key, value) of the long documents of a split."""
    if split == "train":
        key, spec = "long_data_path", cfg.long_data_path
    elif split == "eval" and cfg.long_eval_data_path:
        key, spec = "long_eval_data_path", cfg.long_eval_data_path
    else:
        key, spec, _, _ = split_settings(cfg, split)  # eval falls back to eval_data_path
    if not spec:
        raise UserError(f'this input needs "{key}": set it to the .tfrecords of long documents')
    return key, spec


@register_input("openwebtext_long")
def openwebtext_long_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """Long documents only (long_data_path; eval: long_eval_data_path, else eval_data_path), stitch 2."""
    key, spec = _long_paths(cfg, split)
    return record_source(cfg, split, tokenizer, key, spec, cfg.stitch or 2,
                         process_index=process_index, process_count=process_count)


@register_input("openwebtext_longbiased")
def openwebtext_longbiased_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """A 0.3/0.7 mixture of data_path (stitch 42) and long_data_path (stitch 2), as the seed's."""
    path_key, spec, _, _ = split_settings(cfg, split)
    long_key, long_spec = _long_paths(cfg, split)
    weights = cfg.data_weights or [0.3, 0.7]
    return record_mixture(cfg, split, tokenizer, [(path_key, spec, 42), (long_key, long_spec, 2)], weights,
                          process_index=process_index, process_count=process_count)
