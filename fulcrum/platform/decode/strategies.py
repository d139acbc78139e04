"""The `decode.*` config section: defaults of `fulcrum decode` / `fulcrum calibrate`."""

from __future__ import annotations

import ml_collections

from fulcrum.platform.decode.kv_calibration import BITS as KV_BITS
from fulcrum.platform.decode.kv_calibration import METHODS as KV_METHODS
from fulcrum.platform.decode.speculative import RULES

STRATEGIES = ("greedy", "sample", "lookahead", "speculative", "cascade")
KV_CACHES = ("none", *KV_METHODS)


def config_defaults() -> ml_collections.ConfigDict:
  """Every `decode.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.strategy = "greedy"  # greedy | sample | lookahead | speculative | cascade.
  c.temperature = 0.8  # `--strategy sample` temperature (the others are greedy).
  c.top_k = 0  # Sample from the k most likely tokens only; 0 = all.
  c.top_p = 1.0  # Nucleus sampling mass; 1 = off.
  c.gamma = 4  # Speculative / cascade: draft tokens per target call.
  c.lookahead_window = 7  # Lookahead W: Jacobi window (tokens guessed ahead).
  c.lookahead_ngram = 5  # Lookahead N: n-gram size (verified continuations are N - 1).
  c.lookahead_candidates = 7  # Lookahead G: pool n-grams verified per step.
  c.cascade_rule = "opt"  # Speculative Cascades deferral rule: chow | diff | opt.
  c.cascade_alpha = 0.1  # Its threshold α.
  c.kv_cache = "none"  # none | kvquant | int-token | int-channel (`fulcrum calibrate`).
  c.kv_bits = 3  # Bits per cached key/value entry (2, 3 or 4).
  c.kv_outlier_fraction = 0.01  # KVQuant dense-and-sparse outliers per vector.
  c.calibration_batches = 16  # Training batches `fulcrum calibrate` fits on.
  c.max_len = 4096  # Context limit: prompt + new tokens that decode accepts.
  return c


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
    (d.temperature >= 0, f"decode.temperature must be >= 0, got {d.temperature}"),
    (d.top_k >= 0, f"decode.top_k must be >= 0 (0 = off), got {d.top_k}"),
    (0 < d.top_p <= 1, f"decode.top_p must be in (0, 1], got {d.top_p}"),
    (d.gamma >= 1, f"decode.gamma must be >= 1, got {d.gamma}"),
    (d.lookahead_window >= 1, f"decode.lookahead_window must be >= 1, got {d.lookahead_window}"),
    (d.lookahead_ngram >= 2, f"decode.lookahead_ngram must be >= 2, got {d.lookahead_ngram}"),
    (d.lookahead_candidates >= 0, "decode.lookahead_candidates must be >= 0, got "
     f"{d.lookahead_candidates}"),
    (d.max_len >= 2, f"decode.max_len must be >= 2, got {d.max_len}"),
    (d.calibration_batches >= 1, "decode.calibration_batches must be >= 1, got "
     f"{d.calibration_batches}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
