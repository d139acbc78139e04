"""`optimizer.name` → an optax GradientTransformation, with warmup + cosine and clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax

from fulcrum.platform.optim import _boxes, galore
from fulcrum.platform.optim.quantized import adamw_8bit


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


OPTIMIZERS = ("adamw", "galore", "adam8bit", "galore8bit")


def make_optimizer(
  opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer a config names, and its learning-rate schedule (for logging).

  GaLore reads which parameters are attention/MLP matrices from the logical axis names of the
  boxed parameters `init` receives (`galore.matrices_from_axes`); parameters without names fall
  back to "every plain 2-D parameter".
  """
  schedule = learning_rate_schedule(opt, total_steps)
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer.name {opt.name!r}; known: {', '.join(OPTIMIZERS)}")
  adam = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  eight_bit = dict(block_size=opt.quant.block_size, min_8bit_size=opt.quant.min_size)
  if opt.name == "adamw":
    core = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask, **adam)
  elif opt.name == "adam8bit":
    core = adamw_8bit(
      schedule, weight_decay=opt.weight_decay, decay_mask=decay_mask, **adam, **eight_bit
    )
  else:
    g = opt.galore
    core = galore.galore_adamw(
      schedule,
      rank=g.rank,
      update_proj_gap=g.update_proj_gap,
      scale=g.scale,
      weight_decay=opt.weight_decay,
      side=g.side,
      matrices=_matrices,
      decay_mask=decay_mask,
      eight_bit=opt.name == "galore8bit",
      **adam,
      **eight_bit,
    )
  chain = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  return optax.chain(*chain, core), schedule


def _matrices(params):
  """GaLore's matrices: by logical axis names when `params` are boxed, else the 2-D ones."""
  if any(_boxes.is_box(x) for x in jax.tree.leaves(params, is_leaf=_boxes.is_box)):
    return galore.matrices_from_axes(params)
  return galore.default_matrices(params)
