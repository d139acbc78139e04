"""`fulcrum decode`: continue a text prompt with a trained workdir's model.

The workdir's `decode.*` section gives every default (`strategies.from_config` turns it and the
arguments given into a strategy and its sampling); workdirs are read through
`platform/workdir.py`, never the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.decode import strategies
from fulcrum.platform.decode.generate import generate
from fulcrum.platform.decode.speculative import Draft, Speculative
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.train_config import MAX_SEED


def _window(lookahead: str) -> tuple[int, int, int]:
  """(W, N, G) from the CLI's "W,N,G"."""
  try:
    w, n, g = (int(x) for x in lookahead.split(","))
  except ValueError:
    raise UserError(
      f"--lookahead takes W,N,G, three integers (e.g. 7,5,7), got {lookahead!r}"
    ) from None
  return w, n, g


def decode_prompt(
  workdir: str | Path,
  prompt: str,
  *,
  strategy: str | None = None,
  draft_workdir: str | Path | None = None,
  max_new_tokens: int = 128,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  stop: str | None = None,
  gamma: int | None = None,
  lookahead: str | None = None,
  rule: str | None = None,
  alpha: float | None = None,
  kv_cache: str | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """Continues `prompt` with the newest checkpoint of a language-model workdir. Arguments left
  None take the workdir's `decode.*` values.

  Args:
    workdir: a `fulcrum train` workdir of task "lm".
    prompt: the text to continue (encoded with the workdir's `data.tokenizer`).
    strategy: a name in `strategies.STRATEGIES`.
    draft_workdir: the draft's workdir, for speculative and cascade (ignored by the others).
    max_new_tokens: new tokens (fewer if a stop character comes first).
    temperature, top_k, top_p: sampling (see `strategies.from_config` for who samples).
    stop: end at any of these characters (`tokenizer.stop_ids`).
    gamma: speculative / cascade draft tokens per round.
    lookahead: "W,N,G", lookahead's window, n-gram size and candidates.
    rule, alpha: the cascade's deferral rule and threshold.
    kv_cache: "none" or a KV-cache method `fulcrum calibrate` fitted for this checkpoint.
    seed: sampling seed.

  Returns:
    {"text", "tokens", "target_calls", "draft_calls", "tokens_per_s", "strategy", "kv_cache"}:
    the new text and token ids, the model calls and speed of the decode, and the strategy and
    KV cache it used.

  Raises:
    UserError: bad input (an empty prompt, max_new_tokens < 1, a workdir that is not a language
      model, speculative or cascade without a draft, a value a strategy refuses, a missing
      calibration, a prompt over `decode.max_len`), with one line naming the fix.
  """
  if not prompt:
    raise UserError("--prompt is empty; pass the text to continue, e.g. --prompt 'def main('")
  if max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= seed <= MAX_SEED:
    raise UserError(f"--seed must be an integer in [0, 2**63 - 1], got {seed}")
  window = None if lookahead is None else _window(lookahead)
  exp, state, step = workdir_lib.load(workdir)
  if exp.config.task != "lm":
    raise UserError(f"{workdir} trains task {exp.config.task!r}; decode needs an LM")
  d = exp.config.decode
  name = strategy or d.strategy
  try:
    cls = strategies.strategy_class(name)
  except ValueError as e:
    raise UserError(str(e)) from None
  draft = None
  if issubclass(cls, Speculative):
    if not draft_workdir:
      raise UserError(f"--strategy {name} needs --draft-workdir (e.g. a `lm_draft` run)")
    draft_exp, draft_state, _ = workdir_lib.load(draft_workdir)
    if draft_exp.config.task != "lm":
      raise UserError(
        f"--draft-workdir {draft_workdir} trains task {draft_exp.config.task!r}; a draft must be "
        "a language model with the target's tokenizer (e.g. an `lm_draft` run)"
      )
    if draft_exp.config.data.tokenizer != exp.config.data.tokenizer:
      raise UserError(
        f"--draft-workdir {draft_workdir} uses tokenizer {draft_exp.config.data.tokenizer}, the "
        f"target {exp.config.data.tokenizer}; use a draft trained with the target's tokenizer"
      )
    draft = Draft(draft_exp.model, draft_state.params)
  kv_cache = kv_cache or d.kv_cache
  if kv_cache not in strategies.KV_CACHES:
    raise UserError(
      f"unknown KV cache {kv_cache!r}; choose one of {', '.join(strategies.KV_CACHES)}"
    )
  tok = tokenizer_lib.get_tokenizer(exp.config.data.tokenizer)
  try:
    value, sampling = strategies.from_config(
      d,
      strategy=name,
      draft=draft,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      gamma=gamma,
      lookahead=window,
      rule=rule,
      alpha=alpha,
    )
    kv_quant = None
    if kv_cache != "none":
      kv_quant = workdir_lib.kv_cache_specs(workdir, exp.model, step, kv_cache, d.kv_bits)
    out = generate(
      exp.model,
      state.params,
      [tok.encode(prompt)],
      max_new_tokens,
      strategy=value,
      sampling=sampling,
      kv_quant=kv_quant,
      stop_tokens=tokenizer_lib.stop_ids(tok, stop or ""),
      seed=seed,
      max_len=d.max_len,
    )
  except ValueError as e:
    raise UserError(str(e)) from None
  tokens = out.rows()[0]
  return {
    "text": tok.decode(tokens),
    "tokens": tokens.tolist(),
    "target_calls": out.target_calls,
    "draft_calls": out.draft_calls,
    "tokens_per_s": out.tokens_per_s,
    "strategy": name,
    "kv_cache": kv_cache,
  }
