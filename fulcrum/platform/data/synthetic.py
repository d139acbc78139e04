"""Generated sequence tasks from the Mamba paper (§4.1) and Zoology, as grain datasets.

Every example is a pure function of (seed, index), so datasets need no storage, are identical
on every machine, and a grain iterator over them resumes exactly. Each example is a dict of
int32 `inputs` and `targets` [t] and float32 `weights` [t] (1 where the loss is taken).

Token layout: 0 is the noise/padding token; data tokens are 1..vocab; task markers follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import numpy as np

Example = dict[str, np.ndarray]


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, index])


def _example(inputs, targets, weights) -> Example:
  return {
    "inputs": np.asarray(inputs, np.int32),
    "targets": np.asarray(targets, np.int32),
    "weights": np.asarray(weights, np.float32),
  }


def selective_copying(rng: np.random.Generator, *, length: int, vocab: int, num_tokens: int):
  """Selective copying (Gu & Dao 2023, §3.1 and §4.1.1; Fig. 2).

  `num_tokens` data tokens (from 1..vocab) sit at random positions among `length` noise
  tokens; then `num_tokens` copy markers (id vocab + 1) follow, and at the i-th marker the
  model must output the i-th data token. Solving it needs content-aware (selective) memory:
  the spacing is random, so a fixed (LTI) convolution cannot find the tokens.
  Vocabulary size: vocab + 2.
  """
  positions = np.sort(rng.choice(length, size=num_tokens, replace=False))
  data = rng.integers(1, vocab + 1, size=num_tokens)
  content = np.zeros(length, np.int64)
  content[positions] = data
  marker = vocab + 1
  inputs = np.concatenate([content, np.full(num_tokens, marker)])
  targets = np.concatenate([np.zeros(length, np.int64), data])
  weights = np.concatenate([np.zeros(length), np.ones(num_tokens)])
  return _example(inputs, targets, weights)


def induction_heads(rng: np.random.Generator, *, length: int, vocab: int):
  """Induction heads (Olsson et al. 2022; Gu & Dao 2023, §4.1.2).

  Random tokens from 1..vocab with a trigger token (vocab + 1) placed once in the sequence,
  followed by a random answer token; the sequence ends with the trigger again, and the model
  must predict the answer at the last position. Vocabulary size: vocab + 2.
  """
  trigger = vocab + 1
  tokens = rng.integers(1, vocab + 1, size=length)
  where = int(rng.integers(0, length - 2))
  tokens[where] = trigger
  answer = tokens[where + 1]
  tokens[-1] = trigger
  targets = np.zeros(length, np.int64)
  targets[-1] = answer
  weights = np.zeros(length)
  weights[-1] = 1.0
  return _example(tokens, targets, weights)


def multi_query_recall(rng: np.random.Generator, *, length: int, vocab: int, num_pairs: int):
  """Multi-query associative recall (Arora et al. 2023, Zoology).

  `num_pairs` key-value pairs (keys from 1..vocab/2 without repeats, values from the upper
  half), then every key again in a random order; after each query key the model must output
  that key's value. `length` must be at least 3·num_pairs (the rest is noise padding before
  the queries). Vocabulary size: vocab + 1.
  """
  half = vocab // 2
  keys = rng.choice(np.arange(1, half + 1), size=num_pairs, replace=False)
  values = rng.integers(half + 1, vocab + 1, size=num_pairs)
  context = np.stack([keys, values], axis=1).reshape(-1)
  order = rng.permutation(num_pairs)
  pad = np.zeros(length - 3 * num_pairs, np.int64)
  inputs = np.concatenate([context, pad, keys[order]])
  targets = np.concatenate([np.zeros(2 * num_pairs + len(pad), np.int64), values[order]])
  weights = np.concatenate([np.zeros(2 * num_pairs + len(pad)), np.ones(num_pairs)])
  return _example(inputs, targets, weights)


GENERATORS: dict[str, Callable[..., Example]] = {
  "selective_copying": selective_copying,
  "induction_heads": induction_heads,
  "mqar": multi_query_recall,
}


@dataclasses.dataclass(frozen=True)
class _Generate(grain.transforms.Map):
  """index → example, seeded by (seed, index)."""

  name: str
  seed: int
  kwargs: tuple[tuple[str, int], ...]

  def map(self, index: int) -> Example:
    return GENERATORS[self.name](_rng(self.seed, int(index)), **dict(self.kwargs))


def dataset(name: str, *, seed: int, size: int, **kwargs) -> grain.MapDataset:
  """`size` examples of generator `name` (a lazy grain MapDataset)."""
  return grain.MapDataset.range(size).map(_Generate(name, seed, tuple(sorted(kwargs.items()))))
