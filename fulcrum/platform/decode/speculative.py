"""Speculative decoding and Speculative Cascades, batched, for any draft/target architectures.

Each round the draft proposes γ tokens, one call each; the target scores the pending token and
all γ drafts in one call. Draft token d_j is accepted with probability min(1, π(d_j)/q(d_j));
at the first rejection a token is drawn from norm(max(0, π − q)), and if all γ are accepted a
bonus token from π. The result is distributed as π (Leviathan et al. 2023, Thm. 1; Chen et al.
2023). Plain speculative decoding uses π = p, the target. Speculative Cascades (Narasimhan et al.,
ICLR 2025, Sec. 4) use π = (1 − δ)·q + δ·p with a per-token deferral decision δ(q, p):

  chow  δ = 1[max q < 1 − α]                   defer when the drafter is unsure
  diff  δ = 1[max q < max p − α]               defer when the target is surer by α
  opt   δ = 1[max q < max p − α·TV(p, q)]      the plug-in optimal rule (TV: total variation)

δ ≡ 1 recovers speculative sampling (lossless), δ ≡ 0 the drafter alone. The rules read the
models' plain softmax (temperature 1) so they also apply to greedy decoding, where π is a mix
of the two argmax one-hots.

Rows accept different numbers of tokens: caches hold per-row positions, the target verifies
with `cache_history` and keeps the state after its last accepted token, and the draft stacks
its recurrent states over the round's steps to roll back to the same point.

Draft calls: γ a round. When every draft is accepted the draft has not read d_γ yet; the next
round's first draft call reads it together with the new pending token (a 2-token chunk whose
first slot is padding, position -1, in rounds that rejected a draft — every layer skips it).
A cascade runs one more draft step a round: its π mixes in q at the bonus position too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fulcrum.platform.decode import cache as cache_lib
from fulcrum.platform.decode.loop import (
  Plan,
  Strategy,
  emit,
  empty_output,
  prefill,
  with_history,
)
from fulcrum.platform.decode.sampling import Sampling, draw, probabilities

# Speculative Cascades deferral rules (the module docstring gives each δ).
RULES = ("chow", "diff", "opt")


def deferral(
  rule: str, q: Float[Array, "... v"], p: Float[Array, "... v"], alpha: Array
) -> Float[Array, "..."]:
  """δ(q, p) ∈ {0, 1} of a cascade rule (1 = defer to the target); "target" is δ ≡ 1,
  "draft" δ ≡ 0."""
  if rule == "target":
    return jnp.ones(q.shape[:-1], jnp.float32)
  if rule == "draft":
    return jnp.zeros(q.shape[:-1], jnp.float32)
  max_q, max_p = q.max(-1), p.max(-1)
  if rule == "chow":
    defer = max_q < 1 - alpha
  elif rule == "diff":
    defer = max_q < max_p - alpha
  elif rule == "opt":
    defer = max_q < max_p - alpha * 0.5 * jnp.abs(p - q).sum(-1)
  else:
    raise ValueError(f"unknown deferral rule {rule!r}")
  return defer.astype(jnp.float32)


def mixture(rule, q_logits, p_logits, q, p, alpha):
  """π = (1 − δ)·q + δ·p, δ from the raw softmaxes of the two models' logits."""
  delta = deferral(rule, jax.nn.softmax(q_logits, -1), jax.nn.softmax(p_logits, -1), alpha)
  return (1 - delta)[..., None] * q + delta[..., None] * p


@functools.partial(
  jax.jit,
  static_argnames=(
    "model", "draft_model", "max_new_tokens", "stop_tokens", "sampling", "gamma", "rule"
  ),
)  # fmt: skip
def speculative_decode(
  *,
  model,
  params,
  tokens,
  positions,
  key,
  kv_quant,
  draft_model,
  draft_params,
  alpha,
  max_new_tokens,
  stop_tokens,
  sampling,
  gamma,
  rule,
):
  """The speculative / cascade loop; see `Speculative` and `generate` for the arguments."""
  batch, t = tokens.shape
  chunk = gamma + 1
  # Draft steps per round. A cascade needs q at the bonus position too (its π mixes q and p
  # there), so its draft also reads the last draft token. Plain speculative decoding does not:
  # when all γ drafts are accepted, the next round's first draft step reads the last draft
  # token and the new pending token together (one 2-token call instead of one more step).
  steps = chunk if rule != "target" else gamma
  max_len = t + max_new_tokens + chunk
  p_last, cache_t = prefill(model, params, tokens, positions, max_len, chunk, kv_quant)
  q_last, cache_d = prefill(draft_model, draft_params, tokens, positions, max_len, chunk)
  verifier = with_history(model)
  # Greedy: π and q are (mixes of) one-hots; argmax needs no random numbers.
  draw_from = (
    (lambda k, probs: jnp.argmax(probs, -1).astype(jnp.int32)) if sampling.greedy else draw
  )
  pi = mixture(
    rule, q_last, p_last, probabilities(q_last, sampling), probabilities(p_last, sampling), alpha
  )
  first = draw_from(jax.random.fold_in(key, 0), pi)
  ones = jnp.ones((batch,), jnp.int32)
  out = emit(empty_output(batch, max_new_tokens), first[:, None], ones, stop_tokens)
  rows = jnp.arange(batch)

  def draft_call(cache, chunk_tokens, chunk_pos, k, j):
    logits, cache = draft_model.apply(
      {"params": draft_params}, chunk_tokens, chunk_pos, cache, method="decode"
    )
    logits = logits[:, -1]
    q = probabilities(logits, sampling)
    nxt = draw_from(jax.random.fold_in(k, j), q)
    return cache, (nxt, q, logits, cache_lib.recurrent_part(cache))

  def draft_step(carry, j):
    cache, token, pos, k = carry
    cache, outputs = draft_call(cache, token[:, None], (pos + j)[:, None], k, j)
    return (cache, outputs[0], pos, k), outputs

  def body(state):
    cache_t, cache_d, pending, carried, pos, out, calls, rnd = state
    k_draft, k_accept, k_fix = jax.random.split(jax.random.fold_in(key, rnd), 3)
    # The first draft call reads the previous round's last draft token when it was accepted
    # and not yet read (position -1, i.e. skipped, otherwise) followed by the pending token.
    first_tokens = jnp.stack([carried[0], pending], axis=1)
    first_pos = jnp.stack([jnp.where(carried[1], pos - 1, -1), pos], axis=1)
    cache_d, step0 = draft_call(cache_d, first_tokens, first_pos, k_draft, 0)
    (cache_d, _, _, _), later = jax.lax.scan(
      draft_step, (cache_d, step0[0], pos, k_draft), jnp.arange(1, steps)
    )
    stacked = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), step0, later)
    drafts, qs, q_logits, saved = stacked
    drafts, qs, q_logits = drafts.T, qs.swapaxes(0, 1), q_logits.swapaxes(0, 1)
    if steps < chunk:  # No q at the bonus position: never read (π = p there, see below).
      qs = jnp.pad(qs, ((0, 0), (0, chunk - steps), (0, 0)))
      q_logits = jnp.pad(q_logits, ((0, 0), (0, chunk - steps), (0, 0)))
    chunk_tokens = jnp.concatenate([pending[:, None], drafts[:, :gamma]], axis=1)
    chunk_pos = pos[:, None] + jnp.arange(chunk)
    p_logits, history = verifier.apply(
      {"params": params}, chunk_tokens, chunk_pos, cache_t, method="decode"
    )
    pis = mixture(rule, q_logits, p_logits, qs, probabilities(p_logits, sampling), alpha)

    proposed = drafts[:, :gamma]
    q_d = jnp.take_along_axis(qs[:, :gamma], proposed[..., None], -1)[..., 0]
    pi_d = jnp.take_along_axis(pis[:, :gamma], proposed[..., None], -1)[..., 0]
    if sampling.greedy:  # q(d) = 1 and π(d) is 1 or 0 (δ is 0 or 1): accept iff π(d) > 0.
      u = jnp.zeros((batch, gamma))
    else:
      u = jax.random.uniform(k_accept, (batch, gamma))
    accepted = u * q_d < pi_d  # u < π(d)/q(d); q(d) > 0 as d was drawn from q.
    n = jnp.cumprod(accepted, axis=1).sum(1).astype(jnp.int32)

    pi_n, q_n = pis[rows, n], qs[rows, n]
    residual = jnp.maximum(pi_n - q_n, 0.0)
    mass = residual.sum(-1, keepdims=True)
    # All accepted: the bonus comes from π. Rejected: from the residual (π where π = q, which
    # only floating point can reach, as then nothing is rejected).
    use_pi = (n == gamma)[:, None] | (mass <= 0)
    fix_dist = jnp.where(use_pi, pi_n, residual / jnp.maximum(mass, 1e-30))
    fix = draw_from(k_fix, fix_dist)
    proposed_and_fix = jnp.pad(proposed, ((0, 0), (0, 1)))
    new = jnp.where(jnp.arange(chunk) == n[:, None], fix[:, None], proposed_and_fix)
    out = emit(out, new, n + 1, stop_tokens)

    length = pos + n + 1
    cache_t = cache_lib.commit(history, n, length)
    # The draft read pending, d_1 .. d_read: keep the state after d_min(n, read).
    kept = jnp.minimum(n, steps - 1)
    cache_d = cache_lib.restore(cache_d, saved, kept, pos + kept + 1)
    carried = (drafts[:, gamma - 1], n > kept)
    return cache_t, cache_d, fix, carried, length, out, calls + 1, rnd + 1

  def cond(state):
    return ~state[5].done.all()

  pos = positions[:, -1] + 1
  carried = (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
  one = jnp.ones((), jnp.int32)
  state = (cache_t, cache_d, first, carried, pos, out, one, one)
  state = jax.lax.while_loop(cond, body, state)
  out, calls = state[5], state[6]
  return out, calls, (calls - 1) * steps + 1


class Draft(NamedTuple):
  """The draft model of speculative decoding and cascades: any architecture with the target's
  vocabulary."""

  model: Any
  params: Any


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compared by identity (it holds params).
class Speculative(Strategy):
  """Speculative decoding (Leviathan et al. 2023): the draft proposes `gamma` tokens a round, the
  target verifies them in one call. Greedy unless given sampling; lossless either way.

  Attributes:
    draft: `Draft(model, params)` (or a (model, params) pair).
    gamma: draft tokens per round (per target call).
  """

  name: ClassVar[str] = "speculative"
  draft: Draft = dataclasses.field(repr=False)
  gamma: int = 4

  def __post_init__(self):
    if not isinstance(self.draft, tuple) or len(self.draft) != 2:
      raise ValueError(
        f"{self.name} decoding needs a draft model: draft=Draft(model, params), got "
        f"{type(self.draft).__name__}"
      )
    if not isinstance(self.draft, Draft):
      object.__setattr__(self, "draft", Draft(*self.draft))
    if not isinstance(self.gamma, numbers.Integral) or self.gamma < 1:
      raise ValueError(f"gamma (draft tokens per round) must be an integer >= 1, got {self.gamma}")

  @property
  def deferral(self) -> tuple[str, float]:
    """(rule, α) of the round's π: the target alone (δ ≡ 1)."""
    return "target", 0.0

  def plan(self, model, sampling: Sampling) -> Plan:
    v_t, v_d = model.config.vocab_size, self.draft.model.config.vocab_size
    if v_t != v_d:
      raise ValueError(
        f"the draft's vocabulary ({v_d} tokens) differs from the target's ({v_t}); speculative "
        "decoding needs a draft with the target's tokenizer"
      )
    rule, alpha = self.deferral
    static = dict(draft_model=self.draft.model, sampling=sampling, gamma=int(self.gamma), rule=rule)
    dynamic = dict(draft_params=self.draft.params, alpha=jnp.float32(alpha))
    return Plan(speculative_decode, static, dynamic)


@dataclasses.dataclass(frozen=True, eq=False)
class Cascade(Speculative):
  """Speculative Cascades (Narasimhan et al., ICLR 2025): speculative decoding against
  π = (1 − δ)·q + δ·p with a per-token deferral rule δ (the module docstring gives each).

  Attributes:
    rule: the deferral rule, one of `RULES`.
    alpha: its threshold α (traced: changing it reuses the compiled loop).
  """

  name: ClassVar[str] = "cascade"
  rule: str = "opt"
  alpha: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    if self.rule not in RULES:
      raise ValueError(f"unknown cascade rule {self.rule!r}; choose one of {', '.join(RULES)}")
    if not math.isfinite(self.alpha):
      raise ValueError(
        f"cascade alpha (the deferral threshold) must be a finite number, got {self.alpha}"
      )

  @property
  def deferral(self) -> tuple[str, float]:
    return self.rule, self.alpha
