"""Shared recipe bases: the full default config and the families recipes build on.

A recipe imports from here (and `ml_collections`) only: `base_config()` is every key with its
default, assembled from the packages that own each section (`fulcrum.platform.sections`).
"""

from __future__ import annotations

import ml_collections

from fulcrum.platform.data import instruct, series
from fulcrum.platform.sections import base_config

__all__ = [
  "base_config",
  "byte_lm_config",
  "forecast_config",
  "instruct_config",
  "synthetic_config",
]


def byte_lm_config(
  *, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, learning_rate: float
) -> ml_collections.ConfigDict:
  """The base of the small byte-level LMs that train in CPU minutes (demo, lm_draft,
  decode_kvquant): 600 steps of batch 16 × 128 bytes on the default corpus."""
  c = base_config()
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.eval_batches = 8
  c.model.d_model = d_model
  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.num_kv_heads = num_kv_heads
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 50
  return c


def synthetic_config(
  generator: str, *, length: int, vocab: int, seq_len: int, model_vocab: int
) -> ml_collections.ConfigDict:
  """The base config shared by the synthetic-sequence recipes (small model, no weight decay).

  Recipes add their generator's own `data.*` sizes and change what differs.
  """
  c = base_config()
  c.task = "synthetic"
  c.data.generator = generator
  c.data.length = length
  c.data.vocab = vocab
  c.data.eval_length_multiples = (1,)
  c.train.seq_len = seq_len
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.train.eval_batches = 8
  c.model.vocab_size = model_vocab
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  return c


def forecast_config() -> ml_collections.ConfigDict:
  """The base of forecasting recipes: `task = forecast` with the series keys (`data.series`,
  `data.csv_path`, ...) that `fulcrum.platform.data.series` owns, at their defaults."""
  c = base_config()
  c.task = "forecast"
  c.model.head = "forecast"  # Block stacks get the forecasting head, not the LM's logits.
  for key, value in series.config_defaults().items():
    c.data[key] = value
  return c


def instruct_config() -> ml_collections.ConfigDict:
  """The base of instruction-tuning recipes: `task = instruct` with the generated problems' keys
  (`data.instruct_*`, owned by `fulcrum.platform.data.instruct`) at their defaults; a small
  byte-level transformer, loss on the responses only."""
  c = base_config()
  c.task = "instruct"
  for key, value in instruct.config_defaults().items():
    c.data[key] = value
  c.train.seq_len = 128
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_batches = 8
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 1
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  return c
