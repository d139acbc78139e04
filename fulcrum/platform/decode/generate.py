"""One `generate()` for every architecture and strategy, compiled end to end.

Prompts of different lengths are left-padded (padding sits at position -1: attention never
sees it and recurrent layers skip it) and prefilled in one pass; each strategy is then a
`lax.while_loop` that runs until every row has `max_new_tokens` tokens or has emitted a stop
token, with no Python dispatch per token. Strategies are values, each beside its loop:

  Greedy(), Sample()       one target call per token (`autoregressive.py`).
  Lookahead(W, N, G)       Lookahead decoding (Fu et al. 2024), greedy and lossless.
  Speculative(draft, γ)    speculative sampling with a draft model (Leviathan et al. 2023).
  Cascade(draft, γ, rule, α)  Speculative Cascades (Narasimhan et al. 2025); `speculative.py`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.decode.autoregressive import Greedy
from fulcrum.platform.decode.loop import Strategy, compiled, left_pad
from fulcrum.platform.decode.sampling import Sampling


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


def generate(
  model,
  params,
  prompts: Sequence[Sequence[int]] | np.ndarray,
  max_new_tokens: int,
  *,
  strategy: Strategy = Greedy(),
  sampling: Sampling | None = None,
  kv_quant: Any = None,
  stop_tokens: Sequence[int] = (),
  seed: int = 0,
  max_len: int | None = None,
  pad_to: int | None = None,
) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: an `LM` (any architecture, trained here or from `hf.load_pretrained`).
    params: its parameters.
    prompts: token lists of any lengths (or a [b, t] array).
    max_new_tokens: new tokens per row (fewer if a stop token comes first).
    strategy: `Greedy()`, `Sample()`, `Lookahead(...)`, `Speculative(draft, ...)` or
      `Cascade(draft, ...)`.
    sampling: temperature / top-k / top-p; None is the strategy's default (greedy, or
      temperature 1 for `Sample`). Greedy ignores it; lookahead refuses non-greedy sampling.
    kv_quant: per-layer KV-cache quantization specs (`kv_calibration.load`), or None for full
      precision.
    stop_tokens: a row ends after emitting any of these.
    seed: sampling seed.
    max_len: context limit (positions); prompts plus new tokens beyond it are refused.
    pad_to: left-pad the prompts to at least this many tokens, so calls with prompts of other
      lengths reuse one compiled program.

  Raises:
    ValueError: an empty prompt, a value that is not a strategy, sampling the strategy refuses,
      a draft with another vocabulary, a prompt over the context limit.
  """
  if not isinstance(strategy, Strategy):
    raise ValueError(
      f"strategy must be a strategy value such as Greedy() or Lookahead(), got {strategy!r}"
    )
  sampling = strategy.sampling_for(sampling)
  tokens, positions = left_pad(prompts, pad_to)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max_len is not None and tokens.shape[1] + max_new_tokens > max_len:
    raise ValueError(
      f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens exceeds the context "
      f"limit of {max_len}; shorten the prompt or lower max_new_tokens"
    )
  fn, static, dynamic = strategy.plan(model, sampling)
  dynamic = dict(
    params=params,
    tokens=jnp.asarray(tokens),
    positions=jnp.asarray(positions),
    key=jax.random.PRNGKey(seed),
    kv_quant=kv_quant,
    **dynamic,
  )
  static = dict(
    model=model,
    max_new_tokens=max_new_tokens,
    stop_tokens=tuple(int(s) for s in stop_tokens),
    **static,
  )
  program = compiled(fn, static, dynamic)  # Compiled outside the timing.
  start = time.perf_counter()
  out, target_calls, draft_calls = jax.block_until_ready(program(**dynamic))
  seconds = time.perf_counter() - start
  return Generation(
    tokens=np.asarray(out.tokens),
    lengths=np.asarray(out.count),
    target_calls=int(target_calls),
    draft_calls=int(draft_calls),
    seconds=seconds,
  )
