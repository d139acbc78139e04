"""What every task provides the trainer: data, the model's inputs, its loss and eval metrics."""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

Batch = dict[str, Any]


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
    self.check_config(config)
    self.config = config

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Checks what this task needs of the config beyond each section's own checks (e.g. a
    model vocabulary that holds the data's tokens), without loading data; raises UserError."""
    del config  # Nothing by default.

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

  def generative_metrics(self, model, params) -> dict[str, float]:
    """Metrics (without the `eval/` prefix) that need the model to generate, outside the jitted
    eval step (e.g. exact match of decoded answers); none by default."""
    del model, params
    return {}
