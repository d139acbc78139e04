"""The action grammar: a trie over the token sequences of every valid action, and decoding
constrained by it, so an LM agent never writes a malformed action.

The trie is two arrays: `next[node, token]` (the child node, -1 where the token may not follow)
and `action[node]` (the vocabulary index an action ends at, -1 for inner nodes). No action is a
prefix of another (every action text ends with ")"), so a row is done exactly when it reaches a
node with an action. Decoding masks the logits to the current node's children each token, so the
constrained greedy action equals unconstrained greedy whenever greedy's own text is a valid action.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from fulcrum.platform.decode.sampling import Sampling, pick


@struct.dataclass
class Grammar:
  """A trie over token sequences (arrays, so it is an argument of compiled loops)."""

  next: np.ndarray  # [n, v] int32: child of node n by token v; -1: not allowed there.
  action: np.ndarray  # [n] int32: the action completed at node n; -1 at inner nodes.
  max_len: int = struct.field(pytree_node=False)  # Tokens in the longest action.

  @property
  def num_actions(self) -> int:
    return int((np.asarray(self.action) >= 0).sum())


def build(sequences: Sequence[Sequence[int]], vocab_size: int) -> Grammar:
  """The trie of `sequences` (action i's tokens); node 0 is the root.

  Raises:
    ValueError: an empty sequence, a token outside the vocabulary, a duplicate, or one sequence a
      prefix of another (the decoder could not tell where an action ends).
  """
  children: list[dict[int, int]] = [{}]
  ends: list[int] = [-1]
  for i, seq in enumerate(sequences):
    if len(seq) == 0:
      raise ValueError(f"action {i} has no tokens")
    node = 0
    for tok in seq:
      tok = int(tok)
      if not 0 <= tok < vocab_size:
        raise ValueError(f"action {i} has token {tok} outside the vocabulary of {vocab_size}")
      if ends[node] >= 0:
        raise ValueError(f"action {ends[node]} is a prefix of action {i}")
      if tok not in children[node]:
        children[node][tok] = len(children)
        children.append({})
        ends.append(-1)
      node = children[node][tok]
    if ends[node] >= 0 or children[node]:
      raise ValueError(f"action {i} repeats or is a prefix of another action")
    ends[node] = i
  table = np.full((len(children), vocab_size), -1, np.int32)
  for node, kids in enumerate(children):
    for tok, child in kids.items():
      table[node, tok] = child
  # numpy, not device arrays: a grammar built while a function is traced must not hold tracers.
  return Grammar(table, np.asarray(ends, np.int32), max(len(s) for s in sequences))


def allowed(grammar: Grammar, node: Int[Array, " b"]) -> Array:
  """[b, v] bool: the tokens that may follow each row's node."""
  return jnp.asarray(grammar.next)[node] >= 0


def masked(logits: Float[Array, "b v"], grammar: Grammar, node: Int[Array, " b"]) -> Array:
  """The logits with every token the grammar forbids at `node` set to -inf (the model's
  vocabulary may be wider than the grammar's: those tokens are forbidden too)."""
  v = grammar.next.shape[1]
  ok = allowed(grammar, node)
  if logits.shape[-1] > v:
    ok = jnp.pad(ok, ((0, 0), (0, logits.shape[-1] - v)))
  return jnp.where(ok, logits[..., : ok.shape[-1]], -jnp.inf)


def decode_action(
  model,
  params: Any,
  logits: Float[Array, "b v"],
  cache: Any,
  positions: Int[Array, " b"],
  grammar: Grammar,
  key: Array,
  sampling: Sampling,
) -> tuple[Int[Array, " b"], Int[Array, "b l"], Int[Array, " b"], Any, Int[Array, " b"]]:
  """Decodes one action per row under the grammar, continuing from `logits` (the model's output
  at the last fed token) with the model's cache.

  Every token but each row's last is fed back through the model (the last, which completes the
  action, is left for the caller to feed with what follows); rows that have finished feed
  padding at position -1, which no layer reads or stores.

  Args:
    model: an `LM`.
    params: its parameters.
    logits: [b, v] next-token logits after the context.
    cache: the model's cache holding the context.
    positions: [b] the position the first action token takes.
    grammar: the action trie (`build`).
    key: sampling key (unused when greedy).
    sampling: greedy (temperature 0) or sampled (temperature / top-k / top-p).

  Returns:
    (action [b] vocabulary index, tokens [b, max_len] (-1 after the action), length [b],
    cache after every fed token, positions [b] of the next token to feed: the action's last).
  """
  b = logits.shape[0]
  out = jnp.full((b, grammar.max_len), -1, jnp.int32)
  nxt, ends = jnp.asarray(grammar.next), jnp.asarray(grammar.action)

  def body(carry, i):
    logits, cache, node, pos, out, done = carry
    tok = pick(jax.random.fold_in(key, i), masked(logits, grammar, node), sampling)
    tok = jnp.where(done, 0, tok)
    out = out.at[:, i].set(jnp.where(done, -1, tok))
    node = jnp.where(done, node, nxt[node, tok])
    finished = done | (ends[node] >= 0)
    # Feed the token unless the row is done now (finished rows feed padding at position -1).
    feed_pos = jnp.where(finished, -1, pos)
    new_logits, cache = model.apply(
      {"params": params}, tok[:, None], feed_pos[:, None], cache, method="decode"
    )
    logits = jnp.where(finished[:, None], logits, new_logits[:, -1])
    pos = jnp.where(finished, pos, pos + 1)
    return (logits, cache, node, pos, out, finished), None

  node = jnp.zeros((b,), jnp.int32)
  done = jnp.zeros((b,), bool)
  carry = (logits, cache, node, positions, out, done)
  (_, cache, node, pos, out, _), _ = jax.lax.scan(body, carry, jnp.arange(grammar.max_len))
  return ends[node], out, (out >= 0).sum(1).astype(jnp.int32), cache, pos
