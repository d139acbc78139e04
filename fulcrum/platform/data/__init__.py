"""Data: the offline text corpora (TFDS builders), grain pipelines and the tokenizers.

Forecasting series live in `series` (splits, windows, iterators) over `series_store` (CSVs and
their TFDS builder).
"""

from fulcrum.platform.data.pipeline import (
  data_config_summary,
  load_source,
  make_eval_batches,
  make_train_iterator,
)
from fulcrum.platform.data.tokenizer import ByteTokenizer, get_tokenizer

__all__ = [
  "ByteTokenizer",
  "data_config_summary",
  "get_tokenizer",
  "load_source",
  "make_eval_batches",
  "make_train_iterator",
]
