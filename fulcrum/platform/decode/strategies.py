"""The strategy registry and the `decode.*` config section: the defaults of `fulcrum decode` and
`fulcrum calibrate`, and the one place they become a strategy value and its sampling."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from fulcrum.platform.decode.autoregressive import Greedy, Sample
from fulcrum.platform.decode.kv_calibration import BITS as KV_BITS
from fulcrum.platform.decode.kv_calibration import METHODS as KV_METHODS
from fulcrum.platform.decode.lookahead import Lookahead
from fulcrum.platform.decode.loop import Strategy
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.decode.speculative import RULES, Cascade, Draft, Speculative

BY_NAME: dict[str, type[Strategy]] = {
  cls.name: cls for cls in (Greedy, Sample, Lookahead, Speculative, Cascade)
}
STRATEGIES = tuple(BY_NAME)
KV_CACHES = ("none", *KV_METHODS)
# A strategy field → the `decode.*` key that holds its value for `fulcrum decode`.
FIELD_KEYS = {
  "gamma": "gamma",  # Speculative / cascade: draft tokens per target call.
  "window": "lookahead_window",  # Lookahead W: Jacobi window (tokens guessed ahead).
  "ngram": "lookahead_ngram",  # Lookahead N: n-gram size (verified continuations are N - 1).
  "candidates": "lookahead_candidates",  # Lookahead G: pool n-grams verified per step.
  "rule": "cascade_rule",  # Speculative Cascades deferral rule (one of speculative.RULES).
  "alpha": "cascade_alpha",  # Its threshold α.
}


def _field_defaults(*classes: type) -> dict[str, Any]:
  return {
    f.name: f.default
    for cls in classes
    for f in dataclasses.fields(cls)
    if f.default is not dataclasses.MISSING
  }


def config_defaults() -> ml_collections.ConfigDict:
  """Every `decode.*` key with its default (a strategy's or `Sampling`'s own where it has one)."""
  fields = _field_defaults(Sampling, *BY_NAME.values())
  c = ml_collections.ConfigDict()
  c.strategy = Greedy.name  # One of STRATEGIES (the strategy classes' names).
  c.temperature = 0.8  # `sample`'s temperature (the others are greedy unless given one).
  c.top_k = fields["top_k"]  # Sample from the k most likely tokens only; 0 = all.
  c.top_p = fields["top_p"]  # Nucleus sampling mass; 1 = off.
  for field, key in FIELD_KEYS.items():
    c[key] = fields[field]
  c.kv_cache = "none"  # "none" or a KV-cache method (`fulcrum calibrate` fits it).
  c.kv_bits = 3  # Bits per cached key/value entry (one of kv_calibration.BITS).
  c.kv_outlier_fraction = 0.01  # KVQuant dense-and-sparse outliers per vector.
  c.calibration_batches = 16  # Training batches `fulcrum calibrate` fits on.
  c.max_len = 4096  # Context limit: prompt + new tokens that decode accepts.
  return c


def strategy_class(name: str) -> type[Strategy]:
  """The strategy class called `name` (ValueError naming the choices if none is)."""
  if name not in BY_NAME:
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
  return BY_NAME[name]


def from_config(
  d: ml_collections.ConfigDict,
  *,
  strategy: str | None = None,
  draft: Draft | None = None,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  gamma: int | None = None,
  lookahead: Sequence[int] | None = None,
  rule: str | None = None,
  alpha: float | None = None,
) -> tuple[Strategy, Sampling]:
  """The strategy and sampling `fulcrum decode` decodes with: the `decode.*` section `d`, with
  each argument that is not None taking the place of its key.

  Sampling: `decode.temperature` is the temperature of a strategy that samples by default
  (`sample`); the others are greedy unless a temperature is given (speculative and cascade then
  sample), and greedy-only ones (greedy, lookahead) always are.

  Args:
    d: the `decode.*` section.
    strategy: a name in STRATEGIES (default `decode.strategy`).
    draft: the draft model, for speculative and cascade.
    temperature, top_k, top_p: sampling.
    gamma: speculative / cascade draft tokens per round.
    lookahead: (W, N, G), lookahead's window, n-gram size and candidates.
    rule, alpha: the cascade's deferral rule and threshold.

  Raises:
    ValueError: an unknown strategy, a value a strategy or `Sampling` refuses, a missing draft.
  """
  given = lambda value, key: d[key] if value is None else value
  cls = strategy_class(given(strategy, "strategy"))
  if cls.greedy_only:
    t = 0.0  # A temperature given is not for it.
  elif cls.default_sampling.greedy:
    t = 0.0 if temperature is None else temperature
  else:
    t = given(temperature, "temperature")
  sampling = Sampling(temperature=t, top_k=given(top_k, "top_k"), top_p=given(top_p, "top_p"))
  w = n = g = None
  if lookahead is not None:
    if len(lookahead) != 3:
      raise ValueError(f"lookahead takes W, N, G (three integers), got {tuple(lookahead)}")
    w, n, g = lookahead
  overrides = dict(gamma=gamma, window=w, ngram=n, candidates=g, rule=rule, alpha=alpha)
  values = {field: given(overrides[field], key) for field, key in FIELD_KEYS.items()}
  fields = {f.name for f in dataclasses.fields(cls)}
  values = {k: v for k, v in dict(values, draft=draft).items() if k in fields}
  return cls(**values), sampling


def validate_config(d: ml_collections.ConfigDict) -> None:
  """Checks the `decode.*` section; raises ValueError naming the fix."""
  choices = [
    ("strategy", STRATEGIES), ("kv_cache", KV_CACHES), ("cascade_rule", RULES),
    ("kv_bits", KV_BITS),
  ]  # fmt: skip
  for key, options in choices:
    if d[key] not in options:
      raise ValueError(
        f"decode.{key}={d[key]!r} is unknown; choose one of {', '.join(map(str, options))}"
      )
  checks = [
    (0 <= d.kv_outlier_fraction < 0.5, "decode.kv_outlier_fraction must be in [0, 0.5), got "
     f"{d.kv_outlier_fraction}"),
    (d.max_len >= 2, f"decode.max_len must be >= 2, got {d.max_len}"),
    (d.calibration_batches >= 1, "decode.calibration_batches must be >= 1, got "
     f"{d.calibration_batches}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
  # Every strategy and its `Sampling` check their own fields (`sample`'s reads
  # decode.temperature; a placeholder draft, as the section holds no model).
  try:
    for name in STRATEGIES:
      from_config(d, strategy=name, draft=Draft(None, None))
  except ValueError as e:
    raise ValueError(f"decode.*: {e}") from None
