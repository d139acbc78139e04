"""`optimizer.name` → an optax GradientTransformation, with warmup + cosine and clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=opt.learning_rate * opt.min_lr_ratio,
  )


# SSM parameters that must not decay (Mamba's A_log: decaying it toward 0 forces A → -1).
NO_DECAY = frozenset({"A_log"})


def decay_mask(params):
  """Weight decay applies to matrices only — not to norms' scales, biases or SSM parameters."""

  def keep(path, p):
    name = getattr(path[-1], "key", None)
    return p.ndim >= 2 and name not in NO_DECAY

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
  opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer a config names, and its learning-rate schedule (for logging)."""
  schedule = learning_rate_schedule(opt, total_steps)
  if opt.name != "adamw":
    raise ValueError(f"unknown optimizer.name {opt.name!r}")
  core = optax.adamw(
    schedule,
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    weight_decay=opt.weight_decay,
    mask=decay_mask,
  )
  chain = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  return optax.chain(*chain, core), schedule
