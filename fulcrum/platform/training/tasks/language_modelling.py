"""Language modelling (`task = "lm"`): next-byte prediction on a text corpus."""

from __future__ import annotations

import math

import jax.numpy as jnp

from fulcrum.platform import data as data_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Task, cross_entropy

LN2 = math.log(2.0)


class LanguageModelling(Task):
  """Next-byte prediction on a text corpus (the built-in stdlib corpus, text files or TFDS)."""

  name = "lm"

  @classmethod
  def check_config(cls, config):
    vocab = data_lib.ByteTokenizer.vocab_size
    if config.model.vocab_size < vocab:
      raise UserError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the byte tokenizer's "
        f"{vocab} tokens (larger ids would have no embedding); set model.vocab_size={vocab} "
        "or more"
      )

  def example_inputs(self):
    return (jnp.zeros((1, min(self.config.train.seq_len, 8)), jnp.int32),)

  def _data_kw(self, process_index, process_count):
    t = self.config.train
    return dict(
      seq_len=t.seq_len,
      batch_size=t.batch_size,
      process_index=process_index,
      process_count=process_count,
    )

  def train_iterator(self, process_index, process_count):
    return data_lib.make_train_iterator(
      self.config.data, seed=self.config.train.seed, **self._data_kw(process_index, process_count)
    )

  def eval_sets(self, process_index, process_count):
    batches = data_lib.make_eval_batches(
      self.config.data,
      num_batches=self.config.train.eval_batches,
      **self._data_kw(process_index, process_count),
    )
    return {"": batches}

  def summary(self):
    return data_lib.data_config_summary(self.config.data)

  def loss(self, outputs, batch):
    return cross_entropy(outputs, batch["targets"], batch.get("weights"))

  def eval_sums(self, outputs, batch):
    loss, count = cross_entropy(outputs, batch["targets"], batch.get("weights"))
    return {"loss": loss * count, "count": count}

  def eval_metrics(self, sums):
    loss = sums["loss"] / max(sums["count"], 1.0)
    return {
      "loss": loss,
      "perplexity": math.exp(min(loss, 80.0)),
      # Byte-level tokens: one token per byte, so nats/token / ln 2 = bits per byte.
      "bits_per_byte": loss / LN2,
    }


TASK = LanguageModelling
