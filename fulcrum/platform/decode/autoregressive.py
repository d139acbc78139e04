"""Autoregressive decoding: one target call per token, greedy (`Greedy`) or sampled (`Sample`:
temperature, top-k and top-p from `Sampling`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from fulcrum.platform.decode.loop import Plan, Strategy, emit, empty_output, prefill
from fulcrum.platform.decode.sampling import Sampling, pick


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_tokens"))
def autoregressive_decode(
  *, model, params, tokens, positions, key, kv_quant, max_new_tokens, sampling, stop_tokens
):
  """The one-token-a-call loop; see `generate`."""
  batch, t = tokens.shape
  # One spare slot in a sliding window's ring buffer: each token is written before attending.
  last, cache = prefill(model, params, tokens, positions, t + max_new_tokens, 1, kv_quant)
  pos = positions[:, -1] + 1
  first = pick(jax.random.fold_in(key, 0), last, sampling)
  out = emit(
    empty_output(batch, max_new_tokens), first[:, None], jnp.ones((batch,), jnp.int32), stop_tokens
  )

  def cond(state):
    return ~state[3].done.all()

  def body(state):
    cache, token, pos, out, calls = state
    logits, cache = model.apply(
      {"params": params}, token[:, None], pos[:, None], cache, method="decode"
    )
    nxt = pick(jax.random.fold_in(key, calls), logits[:, -1], sampling)
    out = emit(out, nxt[:, None], jnp.ones((batch,), jnp.int32), stop_tokens)
    return cache, nxt, pos + 1, out, calls + 1

  state = (cache, first, pos, out, jnp.ones((), jnp.int32))
  _, _, _, out, calls = jax.lax.while_loop(cond, body, state)
  return out, calls, jnp.zeros((), jnp.int32)


class _Autoregressive(Strategy):
  """One target call per token, each picked by `Sampling`."""

  def plan(self, model, sampling: Sampling) -> Plan:
    return Plan(autoregressive_decode, {"sampling": sampling}, {})


@dataclasses.dataclass(frozen=True)
class Greedy(_Autoregressive):
  """The most likely token each call (any sampling given is ignored)."""

  name: ClassVar[str] = "greedy"
  greedy_only: ClassVar[bool] = True

  def sampling_for(self, sampling: Sampling | None) -> Sampling:
    del sampling
    return Sampling()


@dataclasses.dataclass(frozen=True)
class Sample(_Autoregressive):
  """A token drawn from the processed distribution each call (default: temperature 1)."""

  name: ClassVar[str] = "sample"
  default_sampling: ClassVar[Sampling] = Sampling(temperature=1.0)
