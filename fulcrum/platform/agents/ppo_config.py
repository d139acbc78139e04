"""The `ppo.*` config section: PPO on a JAX environment (`task = ppo`, agents/ppo.py)."""

from __future__ import annotations

import math

import ml_collections

from fulcrum.platform.agents import policies

ENVS = ("craftax_classic",)
BACKBONES = ("mlp", *policies.RECURRENT)  # The MLP, or a sequence model with memory.


def config_defaults() -> ml_collections.ConfigDict:
  """Every `ppo.*` key with its default (Craftax's PPO baseline's, scaled to CPU)."""
  c = ml_collections.ConfigDict()
  c.env = "craftax_classic"  # The environment.
  c.backbone = "mlp"  # The policy and value networks: mlp | mamba | hawk (agents/policies.py).
  c.width = 256  # Hidden units per layer (a sequence backbone's d_model).
  c.depth = 2  # Hidden layers (the MLP's actor and critic each have their own; blocks).
  c.num_envs = 64  # Environments stepped together.
  c.num_steps = 64  # Steps per environment per update (the rollout's length).
  c.total_steps = 1_000_000  # Environment steps in all (num_envs × num_steps per update).
  c.epochs = 4  # Passes over each rollout.
  c.minibatches = 8  # Minibatches per pass.
  c.gamma = 0.99  # Discount.
  c.gae_lambda = 0.8  # GAE's λ.
  c.clip = 0.2  # The ratio's clip ε (and the value's).
  c.ent_coef = 0.01  # Entropy bonus.
  c.vf_coef = 0.5  # Value loss weight.
  c.learning_rate = 2e-4  # Adam's, annealed linearly to 0 over the run.
  c.max_grad_norm = 1.0  # Global gradient-norm clip.
  c.pool = 64  # Fresh worlds ended episodes restart from (renewed as it runs).
  c.log_every = 10  # Updates between metrics rows.
  c.checkpoint_every = 50  # Updates between checkpoints (and at the end, and on SIGTERM).
  c.report_fraction = 0.1  # Achievement rates are over episodes ending in this last part.
  return c


def validate_config(s: ml_collections.ConfigDict) -> None:
  """Checks the `ppo.*` section; raises ValueError naming the fix."""
  checks = [
    (s.env in ENVS, f"ppo.env={s.env!r} is unknown; choose one of {', '.join(ENVS)}"),
    (s.backbone in BACKBONES, f"ppo.backbone={s.backbone!r} is unknown; choose one of "
     f"{', '.join(BACKBONES)}"),
    (s.width >= 1 and s.depth >= 1, f"ppo.width and ppo.depth must be >= 1, got {s.width}, "
     f"{s.depth}"),
    (s.num_envs >= 1 and s.num_steps >= 1, "ppo.num_envs and ppo.num_steps must be >= 1"),
    (s.total_steps >= s.num_envs * s.num_steps, f"ppo.total_steps={s.total_steps} is less "
     f"than one update (ppo.num_envs × ppo.num_steps = {s.num_envs * s.num_steps})"),
    (s.epochs >= 1, f"ppo.epochs must be >= 1, got {s.epochs}"),
    (s.backbone == "mlp" or s.num_envs % s.minibatches == 0,
     f"ppo.backbone={s.backbone} trains on minibatches of whole environments' sequences: "
     f"ppo.minibatches={s.minibatches} must divide ppo.num_envs={s.num_envs}"),
    (s.minibatches >= 1 and (s.num_envs * s.num_steps) % s.minibatches == 0,
     f"ppo.minibatches={s.minibatches} must divide ppo.num_envs × ppo.num_steps = "
     f"{s.num_envs * s.num_steps}"),
    (0 < s.gamma <= 1 and 0 <= s.gae_lambda <= 1, "ppo.gamma must be in (0, 1] and "
     "ppo.gae_lambda in [0, 1]"),
    (0 < s.clip < 1, f"ppo.clip must be in (0, 1), got {s.clip}"),
    (s.ent_coef >= 0 and s.vf_coef >= 0, "ppo.ent_coef and ppo.vf_coef must be >= 0"),
    (math.isfinite(s.learning_rate) and s.learning_rate > 0, f"ppo.learning_rate must be "
     f"positive, got {s.learning_rate}"),
    (s.max_grad_norm > 0, f"ppo.max_grad_norm must be positive, got {s.max_grad_norm}"),
    (s.pool >= 1, f"ppo.pool must be >= 1, got {s.pool}"),
    (s.log_every >= 1 and s.checkpoint_every >= 1, "ppo.log_every and ppo.checkpoint_every "
     "must be >= 1"),
    (0 < s.report_fraction <= 1, f"ppo.report_fraction must be in (0, 1], got "
     f"{s.report_fraction}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
