"""Data: the offline text corpora (TFDS builders), grain pipelines and the byte tokenizer."""

from fulcrum.platform.data.pipeline import (
  data_config_summary,
  load_source,
  make_eval_batches,
  make_train_iterator,
)
from fulcrum.platform.data.tokenizer import ByteTokenizer

__all__ = [
  "ByteTokenizer",
  "data_config_summary",
  "load_source",
  "make_eval_batches",
  "make_train_iterator",
]
