"""The synthetic-sequence task: selective copying, induction heads and multi-query recall.

Configured by the recipe's `data.generator` (selective_copying | induction_heads | mqar) and
its sizes (`data.length`, `data.vocab`, `data.num_tokens`, `data.num_pairs`). The loss is
cross-entropy on the answer positions only; eval reports `eval/accuracy` (fraction of answer
tokens predicted exactly) and, for `data.eval_length_multiples` other than 1, the same at
longer lengths as `eval/accuracy_4x`, ... (length extrapolation).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fulcrum.platform.data import synthetic
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Task, cross_entropy

_ARGS = {
  "selective_copying": ("length", "vocab", "num_tokens"),
  "induction_heads": ("length", "vocab"),
  "mqar": ("length", "vocab", "num_pairs"),
}
_EVAL_SEED_OFFSET = 1_000_003  # Eval examples never coincide with training ones.


def _sizes(d) -> dict[str, int]:
  """The generator's size arguments from the `data` section."""
  return {k: int(d[k]) for k in _ARGS[d.generator]}


def _sequence_length(generator: str, sizes: dict[str, int]) -> int:
  """Tokens per sequence of `generator` at these sizes (from one generated example)."""
  return len(synthetic.GENERATORS[generator](np.random.default_rng(0), **sizes)["inputs"])


class SyntheticSequences(Task):
  """A generated sequence task on the LM shell (token inputs, next-token targets, weights)."""

  name = "synthetic"

  def __init__(self, config):
    super().__init__(config)
    self.generator = config.data.generator
    self.kwargs = _sizes(config.data)
    self.seq_len = _sequence_length(self.generator, self.kwargs)

  @classmethod
  def check_config(cls, config):
    d = config.data
    if d.get("generator") not in _ARGS:
      raise UserError(
        f"data.generator={d.get('generator')!r} is unknown; choose one of {', '.join(_ARGS)}"
      )
    seq_len = _sequence_length(d.generator, _sizes(d))
    if config.train.seq_len != seq_len:
      raise UserError(
        f"train.seq_len={config.train.seq_len} but {d.generator} sequences of data.length="
        f"{d.length} have {seq_len} tokens; set --set train.seq_len={seq_len}"
      )
    vocab_needed = int(d.vocab) + 2
    if config.model.vocab_size < vocab_needed:
      raise UserError(
        f"model.vocab_size={config.model.vocab_size} is too small for data.vocab={d.vocab}; "
        f"use at least {vocab_needed}"
      )

  def _dataset(self, seed: int, size: int, length: int, process_index: int, count: int):
    kwargs = {**self.kwargs, "length": length}
    ds = synthetic.dataset(self.generator, seed=seed, size=size, **kwargs)
    local = self.config.train.batch_size // count
    return ds[process_index::count].batch(local, drop_remainder=True)

  def example_inputs(self):
    return (jnp.zeros((1, self.seq_len), jnp.int32),)

  def train_iterator(self, process_index, process_count):
    # 2**40 examples: effectively endless, and every index is a fresh sample.
    ds = self._dataset(
      self.config.train.seed, 2**40, self.kwargs["length"], process_index, process_count
    )
    return iter(ds.to_iter_dataset())

  def eval_sets(self, process_index, process_count):
    t = self.config.train
    sets = {}
    for multiple in self.config.data.get("eval_length_multiples", (1,)):
      name = "" if multiple == 1 else f"{multiple}x"
      seed = t.seed + _EVAL_SEED_OFFSET * int(multiple)
      ds = self._dataset(
        seed,
        t.eval_batches * t.batch_size,
        self.kwargs["length"] * int(multiple),
        process_index,
        process_count,
      )
      sets[name] = [ds[i] for i in range(len(ds))]
    return sets

  def summary(self):
    sizes = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
    return f"synthetic {self.generator} ({sizes}; {self.seq_len} tokens per sequence)"

  def loss(self, outputs, batch):
    return cross_entropy(outputs, batch["targets"], batch["weights"])

  def eval_sums(self, outputs, batch):
    loss, count = cross_entropy(outputs, batch["targets"], batch["weights"])
    correct = (outputs.argmax(-1) == batch["targets"]).astype(jnp.float32) * batch["weights"]
    return {"loss": loss * count, "correct": correct.sum(), "count": count}

  def eval_metrics(self, sums):
    count = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}


TASK = SyntheticSequences
