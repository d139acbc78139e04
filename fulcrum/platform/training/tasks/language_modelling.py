"""Language modelling (`task = "lm"`): next-token prediction on a text corpus.

Tokens come from `data.tokenizer` (bytes by default, or a Hugging Face tokenizer.json). Eval
reports `loss` (nats per token), `perplexity` (per token) and `bits_per_byte`: the summed nats
over the UTF-8 bytes the targets stand for (`target_bytes` of the eval batches; an EOS counts
one byte), / ln 2 — so it compares across tokenizers, and equals loss / ln 2 for bytes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from fulcrum.platform import data as data_lib
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.training.tasks.base import Task, cross_entropy

LN2 = math.log(2.0)


class LanguageModelling(Task):
  """Next-token prediction on a text corpus (the built-in stdlib corpus, text files or TFDS)."""

  name = "lm"

  @classmethod
  def check_config(cls, config):
    tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer)
    tokenizer_lib.check_vocab(tokenizer, config.model.vocab_size)

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
    text = data_lib.data_config_summary(self.config.data)
    spec = self.config.data.tokenizer
    return text if spec == tokenizer_lib.BYTES else f"{text}; tokenizer {spec}"

  def loss(self, outputs, batch):
    return cross_entropy(outputs, batch["targets"], batch.get("weights"))

  def eval_sums(self, outputs, batch):
    loss, count = cross_entropy(outputs, batch["targets"], batch.get("weights"))
    return {"loss": loss * count, "count": count, "bytes": batch["target_bytes"].sum()}

  def eval_metrics(self, sums):
    loss = sums["loss"] / max(sums["count"], 1.0)
    return {
      "loss": loss,
      "perplexity": math.exp(min(loss, 80.0)),
      "bits_per_byte": sums["loss"] / max(sums["bytes"], 1.0) / LN2,
    }


TASK = LanguageModelling
