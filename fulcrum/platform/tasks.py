"""Tasks: what a recipe trains on — its data, the model's inputs, its loss and eval metrics.

The trainer is task-agnostic: it asks the task (chosen by the config's `task` key) for
iterators and evaluation sets, and calls `task.loss` / `task.eval_sums` inside its jitted
steps. Language modelling ("lm") is defined here; other tasks register themselves in `TASKS`
from their own modules (synthetic sequence tasks, forecasting).
"""

from __future__ import annotations

import abc
import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fulcrum.platform import data as data_lib
from fulcrum.platform.errors import UserError

Batch = dict[str, Any]
LN2 = math.log(2.0)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
  """Mean next-token cross-entropy in nats (float32) and the weight it averages over."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if weights is None:
    weights = jnp.ones_like(losses)
  weights = weights.astype(jnp.float32)
  total = weights.sum()
  return (losses * weights).sum() / jnp.maximum(total, 1.0), total


class Task(abc.ABC):
  """One kind of training problem. Subclasses set `name` and implement the methods."""

  name: str = ""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def example_inputs(self) -> tuple[Any, ...]:
    """Model inputs of batch size 1 used to initialise parameters."""

  def model_inputs(self, batch: Batch) -> tuple[Any, ...]:
    """What `model.apply` takes from a batch (after the variables)."""
    return (batch["inputs"],)

  @abc.abstractmethod
  def train_iterator(self, process_index: int, process_count: int):
    """A checkpointable (grain) iterator of host-local training batches."""

  @abc.abstractmethod
  def eval_sets(self, process_index: int, process_count: int) -> dict[str, list[Batch]]:
    """Named lists of host-local eval batches; the name "" gives unsuffixed `eval/` keys."""

  def summary(self) -> str:
    return self.name

  @abc.abstractmethod
  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(mean loss, weight it averages over) for one batch, inside jit."""

  @abc.abstractmethod
  def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Additive statistics of one eval batch, inside jit (finished by `eval_metrics`)."""

  @abc.abstractmethod
  def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
    """Metrics (without the `eval/` prefix) from statistics summed over an eval set."""


class LanguageModelling(Task):
  """Next-byte prediction on a text corpus (the built-in stdlib corpus, text files or TFDS)."""

  name = "lm"

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


# Task name → class, or "module:Class" imported on first use (keeps this file free of their deps).
TASKS: dict[str, type[Task] | str] = {
  "lm": LanguageModelling,
  "forecast": "fulcrum.platform.forecasting:Forecasting",
  "synthetic": "fulcrum.platform.synthetic:SyntheticSequences",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The task a config names in its `task` key."""
  name = config.get("task", "lm")
  if name not in TASKS:
    raise UserError(f"task={name!r} is unknown; choose one of {', '.join(sorted(TASKS))}")
  cls = TASKS[name]
  if isinstance(cls, str):
    module, attr = cls.split(":")
    cls = getattr(importlib.import_module(module), attr)
  return cls(config)
