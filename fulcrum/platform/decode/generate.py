"""One `generate()` for every architecture and strategy, compiled end to end.

Prompts of different lengths are left-padded (padding sits at position -1: attention never
sees it and recurrent layers skip it) and prefilled in one pass; each strategy is then a
`lax.while_loop` that runs until every row has `max_new_tokens` tokens or has emitted a stop
token, with no Python dispatch per token. Strategies:

  greedy, sample   one target call per token (temperature / top-k / top-p in `Sampling`).
  lookahead        Lookahead decoding (Fu et al. 2024), greedy and lossless; `lookahead.py`.
  speculative      speculative sampling with a draft model (Leviathan et al. 2023).
  cascade          Speculative Cascades (Narasimhan et al. 2025); `speculative.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from fulcrum.platform.decode.sampling import Sampling, pick

STRATEGIES = ("greedy", "sample", "lookahead", "speculative", "cascade")


@dataclasses.dataclass
class Generation:
  """What `generate` returns.

  Attributes:
    tokens: [b, max_new_tokens] new tokens per row, -1 after the row's end.
    lengths: [b] new tokens per row (a stop token, when emitted, is included).
    target_calls: forward passes of the target model (the prefill included).
    draft_calls: forward passes of the draft model (speculative and cascade).
    seconds: wall-clock time of the compiled decode (after compilation).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  target_calls: int
  draft_calls: int = 0
  seconds: float = 0.0

  def rows(self) -> list[np.ndarray]:
    """Each row's new tokens, without padding."""
    return [t[:n] for t, n in zip(self.tokens, self.lengths, strict=True)]

  @property
  def tokens_per_call(self) -> float:
    """New tokens per target forward pass, over the batch (>= 1 for every strategy but sample's
    first call)."""
    return float(self.lengths.max()) / max(self.target_calls, 1)

  @property
  def tokens_per_s(self) -> float:
    return float(self.lengths.sum()) / max(self.seconds, 1e-9)


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


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[b, t] tokens (0 as padding) and [b, t] positions (-1 on padding) of left-padded prompts."""
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
  t = int(lengths.max())
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
    from fulcrum.platform.decode.kv_calibration import quantized_cache

    cache = quantized_cache(cache, kv_quant)
  logits, cache = model.apply({"params": params}, tokens, positions, cache, method="decode")
  return logits[:, -1], cache


def with_history(model):
  """The same model returning every recurrent state of a decoded chunk (for rollback)."""
  return model.clone(config=dataclasses.replace(model.config, cache_history=True))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_tokens"))
def _autoregressive(
  *, model, params, tokens, positions, key, kv_quant, max_new_tokens, sampling, stop_tokens
):
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


_COMPILED: dict[Any, Any] = {}


def _compiled(fn, static: dict[str, Any], dynamic: dict[str, Any]):
  """fn compiled for these static arguments and argument shapes (kept for later calls)."""
  leaves, treedef = jax.tree.flatten(dynamic)
  key = (fn, tuple(sorted(static.items())), treedef, tuple((x.shape, x.dtype) for x in leaves))
  if key not in _COMPILED:
    if len(_COMPILED) > 32:
      _COMPILED.clear()
    _COMPILED[key] = fn.lower(**static, **dynamic).compile()
  return _COMPILED[key]


def _check_vocab(model, draft_model) -> None:
  v_t, v_d = model.config.vocab_size, draft_model.config.vocab_size
  if v_t != v_d:
    raise ValueError(
      f"the draft's vocabulary ({v_d} tokens) differs from the target's ({v_t}); speculative "
      "decoding needs a draft with the target's tokenizer"
    )


def generate(
  model,
  params,
  prompts: Sequence[Sequence[int]] | np.ndarray,
  max_new_tokens: int,
  *,
  strategy: str = "greedy",
  sampling: Sampling | None = None,
  temperature: float | None = None,
  stop_tokens: Sequence[int] = (),
  seed: int = 0,
  draft: tuple[Any, Any] | None = None,
  gamma: int = 4,
  lookahead: tuple[int, int, int] = (7, 5, 7),
  rule: str = "opt",
  alpha: float = 0.1,
  kv_quant: Any = None,
  max_len: int | None = None,
) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: an `LM` (any architecture, trained here or from `hf.load_pretrained`).
    params: its parameters.
    prompts: token lists of any lengths (or a [b, t] array).
    max_new_tokens: new tokens per row (fewer if a stop token comes first).
    strategy: greedy | sample | lookahead | speculative | cascade.
    sampling: temperature / top-k / top-p; default greedy, or temperature 1 for "sample".
    temperature: shorthand for `Sampling(temperature=...)`.
    stop_tokens: a row ends after emitting any of these.
    seed: sampling seed.
    draft: (draft model, draft params) for speculative and cascade.
    gamma: draft tokens per speculative round.
    lookahead: (W, N, G) window, n-gram size and verified candidates per step.
    rule: cascade deferral rule, chow | diff | opt.
    alpha: cascade deferral threshold α.
    kv_quant: per-layer KV-cache quantization specs (`kvquant.load`), or None for full
      precision.
    max_len: context limit (positions); prompts plus new tokens beyond it are refused.

  Raises:
    ValueError: an empty prompt, an unknown strategy, a missing or mismatched draft, a prompt
      over the context limit.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
  if sampling is None:
    t = temperature if temperature is not None else (1.0 if strategy == "sample" else 0.0)
    sampling = Sampling(temperature=t)
  if strategy == "greedy":
    sampling = Sampling()
  tokens, positions = left_pad(prompts)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max_len is not None and tokens.shape[1] + max_new_tokens > max_len:
    raise ValueError(
      f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens exceeds the context "
      f"limit of {max_len}; shorten the prompt or lower max_new_tokens"
    )
  dynamic = dict(
    params=params,
    tokens=jnp.asarray(tokens),
    positions=jnp.asarray(positions),
    key=jax.random.PRNGKey(seed),
    kv_quant=kv_quant,
  )
  static = dict(
    model=model, max_new_tokens=max_new_tokens, stop_tokens=tuple(int(s) for s in stop_tokens)
  )
  if strategy in ("greedy", "sample"):
    fn, static["sampling"] = _autoregressive, sampling
  elif strategy == "lookahead":
    from fulcrum.platform.decode.lookahead import lookahead_decode

    if not sampling.greedy:
      raise ValueError("lookahead decoding is greedy (lossless); use temperature 0")
    w, n, g = (int(x) for x in lookahead)
    if w < 1 or n < 2 or g < 0:
      raise ValueError(f"lookahead needs W >= 1, N >= 2, G >= 0; got W={w}, N={n}, G={g}")
    fn = lookahead_decode
    static.update(window=w, ngram=n, candidates=g)
  else:
    from fulcrum.platform.decode.speculative import speculative_decode

    if draft is None:
      raise ValueError(f"strategy {strategy!r} needs a draft model (draft=(model, params))")
    _check_vocab(model, draft[0])
    if gamma < 1:
      raise ValueError(f"gamma (draft tokens per round) must be >= 1, got {gamma}")
    if strategy == "cascade" and rule not in ("chow", "diff", "opt"):
      raise ValueError(f"unknown cascade rule {rule!r}; choose chow, diff or opt")
    fn = speculative_decode
    dynamic.update(draft_params=draft[1], alpha=jnp.float32(alpha))
    static.update(
      draft_model=draft[0],
      sampling=sampling,
      gamma=int(gamma),
      rule=rule if strategy == "cascade" else "target",
    )
  compiled = _compiled(fn, static, dynamic)  # Compiled outside the timing.
  start = time.perf_counter()
  out, target_calls, draft_calls = jax.block_until_ready(compiled(**dynamic))
  seconds = time.perf_counter() - start
  return Generation(
    tokens=np.asarray(out.tokens),
    lengths=np.asarray(out.count),
    target_calls=int(target_calls),
    draft_calls=int(draft_calls),
    seconds=seconds,
  )
