"""The `spin.*` config section: SPIN's keys, defaults and checks (read by `driver.py`)."""

from __future__ import annotations

import math

import ml_collections

from fulcrum.platform.selfplay.loss import LOSSES


def config_defaults() -> ml_collections.ConfigDict:
  """Every `spin.*` key with its default (used when `task = spin`)."""
  c = ml_collections.ConfigDict()
  c.init_from = ""  # The SFT workdir SPIN starts from (θ_0): its newest checkpoint.
  c.iterations = 3  # Self-play iterations T (θ_0 → θ_1 → ... → θ_T).
  c.num_prompts = 2048  # Training prompts answered by θ_t each iteration (pairs per iteration).
  c.steps = 200  # Optimizer steps per iteration (train.steps of each iteration's run).
  c.beta = 0.1  # β in the SPIN loss (the paper's 0.1).
  c.loss = "logistic"  # logistic (−log σ(h), the paper's) | hinge (max(0, 1 − h)).
  c.temperature = 0.8  # Sampling of y' (the official generation: 0.8).
  c.top_p = 0.95  # Nucleus of y' (the official generation: 0.95).
  c.mix_previous = False  # Also train on the previous iteration's pairs (opponent θ_t rescored).
  c.lr_decay = 1.0  # Iteration t trains at optimizer.learning_rate * lr_decay**t.
  c.nll_weight = 0.0  # Adds nll_weight · (mean NLL of y) against falling log-probabilities.
  c.pairs = ""  # Set by the driver: the pairs file an iteration's run trains on.
  return c


def validate_config(s: ml_collections.ConfigDict) -> None:
  """Checks the `spin.*` section; raises ValueError naming the fix."""
  checks = [
    (s.iterations >= 1, f"spin.iterations must be >= 1, got {s.iterations}"),
    (s.num_prompts >= 1, f"spin.num_prompts must be >= 1, got {s.num_prompts}"),
    (s.steps >= 1, f"spin.steps must be >= 1, got {s.steps}"),
    (math.isfinite(s.beta) and s.beta > 0, f"spin.beta must be positive, got {s.beta}"),
    (s.loss in LOSSES, f"spin.loss={s.loss!r} is unknown; choose one of {', '.join(LOSSES)}"),
    (math.isfinite(s.temperature) and s.temperature > 0,
     f"spin.temperature must be positive (SPIN samples its own responses), got {s.temperature}"),
    (0 < s.top_p <= 1, f"spin.top_p must be in (0, 1], got {s.top_p}"),
    (math.isfinite(s.lr_decay) and s.lr_decay > 0, f"spin.lr_decay must be positive, got "
     f"{s.lr_decay}"),
    (math.isfinite(s.nll_weight) and s.nll_weight >= 0, f"spin.nll_weight must be >= 0, got "
     f"{s.nll_weight}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
