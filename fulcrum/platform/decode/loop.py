"""What every decoding loop shares: the strategy interface, left-padded prompts, the prefill, the
growing output, and the cache of compiled loops.

A strategy is a frozen dataclass (a `Strategy`) that validates its fields in `__post_init__` and
plans its loop: `plan(model, sampling)` names the jitted loop and the arguments it adds to the
ones `generate` passes every loop — static `model`, `max_new_tokens`, `stop_tokens`; traced
`params`, `tokens`, `positions`, `key`, `kv_quant`. Every loop returns
`(Emitted, target_calls, draft_calls)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from fulcrum.platform.decode.cache import quantized_cache
from fulcrum.platform.decode.sampling import Sampling


class Plan(NamedTuple):
  """A strategy's compiled loop and the arguments it adds to the common ones."""

  fn: Callable[..., Any]  # A jitted loop taking keyword arguments only.
  static: dict[str, Any]  # Hashable: part of the compiled program's key.
  dynamic: dict[str, Any]  # Traced: only their shapes and dtypes select the program.


class Strategy:
  """Base of the decoding strategy values (frozen dataclasses beside their loops)."""

  name: ClassVar[str]  # What `--strategy` and `decode.strategy` call it.
  # What it samples with when `generate` is given no `Sampling`: the one place defaults live.
  default_sampling: ClassVar[Sampling] = Sampling()
  # Greedy by construction: other sampling is refused here and never given by the CLI.
  greedy_only: ClassVar[bool] = False

  def sampling_for(self, sampling: Sampling | None) -> Sampling:
    """The sampling this strategy decodes with, given the caller's (None: the default).

    Raises:
      ValueError: non-greedy sampling for a greedy-only strategy.
    """
    sampling = self.default_sampling if sampling is None else sampling
    if self.greedy_only and not sampling.greedy:
      raise ValueError(
        f"{self.name} decoding is greedy (lossless); give no sampling or temperature 0, or "
        "sample with another strategy"
      )
    return sampling

  def plan(self, model, sampling: Sampling) -> Plan:
    """The loop that decodes for `model` with this strategy, and its own arguments."""
    raise NotImplementedError


class Emitted(NamedTuple):
  """The growing output of a decode loop."""

  tokens: Int[Array, "b n"]  # -1 where nothing was written.
  count: Int[Array, " b"]
  done: Array  # [b] bool


def empty_output(batch: int, max_new_tokens: int) -> Emitted:
  return Emitted(
    jnp.full((batch, max_new_tokens), -1, jnp.int32),
    jnp.zeros((batch,), jnp.int32),
    jnp.zeros((batch,), bool),
  )


def emit(
  out: Emitted, new: Int[Array, "b m"], n_new: Int[Array, " b"], stop_tokens: tuple[int, ...]
) -> Emitted:
  """Appends the first n_new[b] tokens of each live row, up to and including a stop token and
  up to the buffer's end; rows that stop or fill up are done."""
  batch, m = new.shape
  limit = out.tokens.shape[1]
  j = jnp.arange(m)
  valid = (j < n_new[:, None]) & ~out.done[:, None]
  if stop_tokens:
    is_stop = valid & jnp.isin(new, jnp.asarray(stop_tokens, jnp.int32))
    first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, 1), m)
    valid &= j <= first_stop[:, None]
    stopped = is_stop.any(1)
  else:
    stopped = jnp.zeros((batch,), bool)
  slots = jnp.where(valid, out.count[:, None] + j, limit)
  rows = jnp.arange(batch)[:, None]
  tokens = out.tokens.at[rows, slots].set(new, mode="drop")
  count = jnp.minimum(out.count + valid.sum(1), limit)
  return Emitted(tokens, count, out.done | stopped | (count >= limit))


def left_pad(
  prompts: Sequence[Sequence[int]] | np.ndarray, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """[b, t] tokens (0 as padding) and [b, t] positions (-1 on padding) of left-padded prompts;
  t is the longest prompt, or `width` when that is longer (one shape for many calls)."""
  if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
    rows = list(prompts)
  elif isinstance(prompts, np.ndarray) and prompts.ndim == 1:
    rows = [prompts]
  else:
    rows = [np.asarray(p) for p in prompts]
  if not rows:
    raise ValueError("no prompts given")
  lengths = np.array([len(r) for r in rows])
  if (lengths == 0).any():
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; give at least one token")
  t = max(int(lengths.max()), width or 0)
  tokens = np.zeros((len(rows), t), np.int32)
  positions = np.full((len(rows), t), -1, np.int32)
  for i, r in enumerate(rows):
    tokens[i, t - len(r) :] = r
    positions[i, t - len(r) :] = np.arange(len(r))
  return tokens, positions


def prefill(model, params, tokens, positions, max_len: int, extra: int = 0, kv_quant=None):
  """Runs the prompts through a fresh cache; returns the last position's logits and the cache."""
  cache = model.init_cache(tokens.shape[0], max_len, extra)
  if kv_quant is not None:
    cache = quantized_cache(cache, kv_quant)
  logits, cache = model.apply({"params": params}, tokens, positions, cache, method="decode")
  return logits[:, -1], cache


def with_history(model):
  """The same model returning every recurrent state of a decoded chunk (for rollback)."""
  return model.clone(config=dataclasses.replace(model.config, cache_history=True))


_COMPILED: dict[Any, Any] = {}


def compiled(fn, static: dict[str, Any], dynamic: dict[str, Any]):
  """fn compiled for these static arguments and argument shapes (kept for later calls)."""
  leaves, treedef = jax.tree.flatten(dynamic)
  key = (fn, tuple(sorted(static.items())), treedef, tuple((x.shape, x.dtype) for x in leaves))
  if key not in _COMPILED:
    if len(_COMPILED) > 32:
      _COMPILED.clear()
    _COMPILED[key] = fn.lower(**static, **dynamic).compile()
  return _COMPILED[key]
