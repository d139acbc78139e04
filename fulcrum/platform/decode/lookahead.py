"""Lookahead decoding (Fu et al., ICML 2024): greedy, lossless, one target call per step.

Each step runs one forward pass over 1 + G rows that share the accepted prefix:

  lookahead branch  row 0: the pending token and a window of W - 1 Jacobi guesses for the next
                    positions. Its greedy outputs are the next Jacobi iterate (W new guesses).
                    Guesses of successive iterations, aligned by position, form n-grams along
                    the diagonals — token i+1 of iteration s+1 was predicted from token i of
                    iteration s — and the last N - 1 iterations give W - N + 1 n-grams a step.
  verification      rows 1..G: the pending token followed by the (N - 1)-token continuations the
                    n-gram pool holds for it (the pool is keyed by first token, seeded with the
                    prompt's n-grams, and fed the lookahead branch's n-grams and the n-grams of
                    the accepted output).

One row (G = 0), for machines with few spare FLOPs (a CPU, where a pass over k tokens costs
up to k times one token's compute): the window's first guesses are the n-grams the pool holds,
chained — the freshest continuation of the pending token, then the freshest continuation of
its last token, and so on while the pool has one — and the Jacobi iterate fills the rest. The
Jacobi diagonals then only fill keys the accepted output has not (the output's n-grams, which
repeat far more often than Jacobi guesses, are never displaced by them). A step costs one pass
over max(W, N) tokens and no cache copy; on the benchmark's CPU target (6, 6, 0) takes more
tokens per step than (4, 4, 1) in fewer tokens per pass (`benchmarks/bench_decode.py`).

Every row, the Jacobi row included, is checked against the model's own greedy predictions:
the longest prefix that matches them is accepted, plus the model's next token, so each step
emits at least one token and exactly the greedy tokens (the invariant the tests check).

The rows are batch rows, not one sequence under a tree attention mask, so the same code serves
attention and recurrent models: the winning row's cache is kept (attention forgets the rest,
recurrent layers take the state after the last accepted token, from a `cache_history` pass).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from fulcrum.platform.decode import cache as cache_lib
from fulcrum.platform.decode.loop import (
  Plan,
  Strategy,
  emit,
  empty_output,
  prefill,
  with_history,
)
from fulcrum.platform.decode.sampling import Sampling


def insert_ngrams(pool, count, grams, valid, weak=None):
  """Adds n-grams to the pool unless already there (sequentially, in order); `weak` ones only
  where the pool holds nothing yet for their first token.

  Args:
    pool: [b, v, g, n-1] continuations per first token (-1 = empty slot).
    count: [b, v] insertions so far per first token (the next slot is count mod g).
    grams: [b, k, n] n-grams.
    valid: [b, k] which n-grams to add.
    weak: [b, k] n-grams that must not displace any held for their first token.
  """
  rows = jnp.arange(pool.shape[0])
  slots = pool.shape[2]

  def add(i, carry):
    pool, count = carry
    first, rest = grams[:, i, 0], grams[:, i, 1:]
    held = pool[rows, first]  # [b, g, n-1]
    new = valid[:, i] & ~(held == rest[:, None]).all(-1).any(-1)
    if weak is not None:
      new &= ~weak[:, i] | (count[rows, first] == 0)
    slot = count[rows, first] % slots
    current = pool[rows, first, slot]
    pool = pool.at[rows, first, slot].set(jnp.where(new[:, None], rest, current))
    return pool, count.at[rows, first].add(new.astype(count.dtype))

  if slots == 0 or grams.shape[1] == 0:
    return pool, count
  # Up to the last n-gram any row adds (the output's come last, valid up to the accepted count).
  upper = jnp.max(jnp.where(valid.any(0), jnp.arange(grams.shape[1]) + 1, 0))
  return jax.lax.fori_loop(0, upper, add, (pool, count))


def _windows(seq, n: int):
  """All length-n windows of seq [b, t] → [b, t - n + 1, n]."""
  idx = jnp.arange(seq.shape[1] - n + 1)[:, None] + jnp.arange(n)
  return seq[:, idx]


def _shift_left(x, by):
  """x[..., i + by[b]] per row (the last entry repeated past the end); x is [b, ..., w]."""
  w = x.shape[-1]
  idx = jnp.minimum(jnp.arange(w) + by.reshape(-1, *([1] * (x.ndim - 1))), w - 1)
  return jnp.take_along_axis(x, idx, axis=-1)


@functools.partial(
  jax.jit,
  static_argnames=("model", "max_new_tokens", "stop_tokens", "window", "ngram", "candidates"),
)
def lookahead_decode(
  *,
  model,
  params,
  tokens,
  positions,
  key,
  kv_quant,
  max_new_tokens,
  stop_tokens,
  window,
  ngram,
  candidates,
):
  """The lookahead loop; see `generate` and the module docstring."""
  del key  # Greedy.
  w, n, g = window, ngram, candidates
  width = max(w, n)  # Tokens per row: the pending token and up to width - 1 guesses.
  num_rows = 1 + g
  batch, t = tokens.shape
  vocab = model.config.vocab_size
  rows = jnp.arange(batch)
  last, cache = prefill(
    model, params, tokens, positions, t + max_new_tokens + width, width, kv_quant
  )
  first = jnp.argmax(last, -1).astype(jnp.int32)
  ones = jnp.ones((batch,), jnp.int32)
  out = emit(empty_output(batch, max_new_tokens), first[:, None], ones, stop_tokens)
  verifier = with_history(model)

  # Pool seeded with the prompt's n-grams (and the one ending at the first new token).
  slots = max(g, 1)  # G = 0 still keeps the freshest n-gram per key (it seeds the window).
  pool = jnp.full((batch, vocab, slots, n - 1), -1, jnp.int32)
  count = jnp.zeros((batch, vocab), jnp.int32)
  seq = jnp.concatenate([tokens, first[:, None]], axis=1)
  seq_pos = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)
  if seq.shape[1] >= n:
    pool, count = insert_ngrams(pool, count, _windows(seq, n), _windows(seq_pos, n)[..., 0] >= 0)
  # The last n - 1 accepted tokens (for the output's n-grams): padding, and what a prompt
  # shorter than n - 2 tokens lacks, as token 0.
  short = max(n - 1 - seq.shape[1], 0)
  recent = jnp.pad(jnp.where(seq_pos >= 0, seq, 0), ((0, 0), (short, 0)))[:, -(n - 1) :]
  # Jacobi levels: the last n - 1 iterates of the window, oldest first, aligned by position.
  guess = jnp.broadcast_to(seq[:, -1:], (batch, w))
  levels = jnp.broadcast_to(guess[:, None], (batch, n - 1, w))

  def body(state):
    cache, pending, pos, levels, pool, count, recent, out, calls = state
    jacobi = levels[:, -1, : w - 1]
    jacobi = jnp.pad(jacobi, ((0, 0), (0, width - w)), constant_values=-1)
    held = jnp.pad(pool[rows, pending], ((0, 0), (0, 0), (0, width - n)), constant_values=-1)
    if g == 0:
      # One row: the freshest n-gram the pool holds for the pending token, chained (the freshest
      # one for its last token, ...) while the pool holds one, takes the window's first guesses;
      # the Jacobi iterate fills the rest.
      chain, ok, key = [], jnp.ones((batch,), bool), pending
      for _ in range(-(-(width - 1) // (n - 1))):
        ok = ok & (count[rows, key] > 0)
        gram = pool[rows, key, (count[rows, key] - 1) % slots]
        chain.append(jnp.where(ok[:, None], gram, -1))
        key = gram[:, -1]
      chain = jnp.concatenate(chain, axis=1)[:, : width - 1]
      guesses = jnp.where(chain >= 0, chain, jacobi)[:, None]
    else:
      guesses = jnp.concatenate([jacobi[:, None], held], axis=1)  # [b, 1 + g, width - 1]
    inputs = jnp.concatenate(
      [jnp.broadcast_to(pending[:, None, None], (batch, num_rows, 1)), jnp.maximum(guesses, 0)],
      axis=-1,
    ).reshape(batch * num_rows, width)
    chunk_pos = jnp.repeat(pos[:, None] + jnp.arange(width), num_rows, axis=0)
    expanded = cache_lib.take_rows(cache, jnp.repeat(rows, num_rows)) if num_rows > 1 else cache
    logits, history = verifier.apply(
      {"params": params}, inputs, chunk_pos, expanded, method="decode"
    )
    predicted = jnp.argmax(logits, -1).astype(jnp.int32).reshape(batch, num_rows, width)
    match = (guesses == predicted[..., :-1]) & (guesses >= 0)
    accepted = jnp.cumprod(match, axis=-1).sum(-1).astype(jnp.int32)  # [b, 1 + g]
    best = jnp.argmax(accepted, axis=-1)
    a = accepted[rows, best]
    chosen, model_next = guesses[rows, best], predicted[rows, best]
    j = jnp.arange(width)
    new = jnp.where(j < a[:, None], jnp.pad(chosen, ((0, 0), (0, 1))), model_next)
    out = emit(out, new, a + 1, stop_tokens)

    length = pos + a + 1
    flat_best = rows * num_rows + best
    kept = cache_lib.commit(history, jnp.repeat(a, num_rows), jnp.repeat(length, num_rows))
    cache = cache_lib.take_rows(kept, flat_best) if num_rows > 1 else kept

    # n-grams: the lookahead branch's diagonals, then those ending at each accepted token.
    iterate = predicted[:, 0, :w]  # Guesses for positions pos + 1 .. pos + w.
    grams, valid, weak = [], [], []
    if w >= n:
      diag = jnp.stack(
        [levels[:, i, i : w - n + 1 + i] for i in range(n - 1)] + [iterate[:, n - 1 :]], axis=-1
      )
      grams.append(diag)
      # Only once every level holds an iterate (the first levels are filler).
      valid.append(jnp.broadcast_to(calls >= n, diag.shape[:2]))
      weak.append(jnp.full(diag.shape[:2], g == 0))
    tail = jnp.concatenate([recent, new], axis=1)  # [b, n - 1 + width]
    grams.append(_windows(tail, n)[:, :width])
    valid.append(j[None, :] <= a[:, None])
    weak.append(jnp.zeros((batch, width), bool))
    pool, count = insert_ngrams(
      pool,
      count,
      jnp.concatenate(grams, axis=1),
      jnp.concatenate(valid, axis=1),
      jnp.concatenate(weak, axis=1),
    )
    recent = jnp.take_along_axis(tail, (a + 1)[:, None] + jnp.arange(n - 1), axis=1)
    levels = _shift_left(jnp.concatenate([levels[:, 1:], iterate[:, None]], axis=1), a + 1)
    return cache, new[rows, a], length, levels, pool, count, recent, out, calls + 1

  def cond(state):
    return ~state[7].done.all()

  pos = positions[:, -1] + 1
  state = (cache, first, pos, levels, pool, count, recent, out, jnp.ones((), jnp.int32))
  state = jax.lax.while_loop(cond, body, state)
  return state[7], state[8], jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True)
class Lookahead(Strategy):
  """Lookahead decoding: greedy and lossless, up to max(W, N) tokens a target call.

  Attributes:
    window: W, the Jacobi window (tokens guessed ahead).
    ngram: N, the n-gram size (verified continuations are N - 1 tokens).
    candidates: G, pool n-grams verified per step (0: one row, the pool's n-grams chained into
      the window; the layout for hardware with few spare FLOPs).
  """

  name: ClassVar[str] = "lookahead"
  greedy_only: ClassVar[bool] = True
  window: int = 7
  ngram: int = 5
  candidates: int = 7

  def __post_init__(self):
    w, n, g = self.window, self.ngram, self.candidates
    if not all(isinstance(x, numbers.Integral) for x in (w, n, g)):
      raise ValueError(f"lookahead W, N, G must be integers; got W={w!r}, N={n!r}, G={g!r}")
    if w < 1 or n < 2 or g < 0:
      raise ValueError(
        f"lookahead needs W >= 1, N >= 2, G >= 0 (window, ngram, candidates); got W={w}, "
        f"N={n}, G={g}"
      )

  def plan(self, model, sampling: Sampling) -> Plan:
    del sampling  # Greedy (`sampling_for` refused any other).
    static = dict(window=self.window, ngram=self.ngram, candidates=self.candidates)
    return Plan(lookahead_decode, static, {})
