"""Next-token distributions: greedy, temperature, top-k and top-p (nucleus) sampling.

Every strategy draws from, or verifies against, the same processed distribution, so greedy
speculative decoding is greedy decoding and speculative sampling preserves exactly what
`sample` would draw.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is picked from the logits.

  Attributes:
    temperature: 0 = greedy (argmax); otherwise softmax(logits / temperature).
    top_k: keep only the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be >= 0 and finite (0: greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def probabilities(logits: Float[Array, "... v"], sampling: Sampling) -> Float[Array, "... v"]:
  """The distribution a token is drawn from: one-hot argmax when greedy, else the tempered
  softmax restricted to the top-k and top-p set and renormalised (float32)."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  logits = logits / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  probs = jax.nn.softmax(logits, axis=-1)
  if sampling.top_p < 1.0:
    sorted_probs = -jnp.sort(-probs, axis=-1)
    # Keep a token if the tokens strictly more likely than it sum to less than top_p: every
    # token at least as likely as the least likely such token.
    in_nucleus = jnp.cumsum(sorted_probs, -1) - sorted_probs < sampling.top_p
    cutoff = jnp.min(jnp.where(in_nucleus, sorted_probs, jnp.inf), -1, keepdims=True)
    keep = probs >= cutoff
    probs = jnp.where(keep, probs, 0.0)
    probs = probs / probs.sum(-1, keepdims=True)
  return probs


def draw(key: Array, probs: Float[Array, "... v"]) -> Int[Array, "..."]:
  """One token per row from `probs` (argmax of a one-hot, so greedy needs no special case)."""
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def pick(key: Array, logits: Float[Array, "... v"], sampling: Sampling) -> Int[Array, "..."]:
  """The next token: argmax when greedy, otherwise a draw from `probabilities`."""
  if sampling.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return draw(key, probabilities(logits, sampling))
