"""`optimizer.name` → an optax GradientTransformation, with warmup + cosine and clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from fulcrum.platform.optim import boxes, galore
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


def config_defaults() -> ml_collections.ConfigDict:
  """Every `optimizer.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.name = "adamw"  # adamw | galore | adam8bit | galore8bit (`OPTIMIZERS`).
  c.learning_rate = 3e-3  # Peak learning rate.
  c.warmup_steps = 100  # Linear warmup steps.
  c.min_lr_ratio = 0.1  # Cosine decays to learning_rate * min_lr_ratio.
  c.weight_decay = 0.1  # Decoupled weight decay (matrices only).
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
  c.galore = ml_collections.ConfigDict()  # optimizer.name = galore | galore8bit.
  c.galore.rank = 128  # Projection rank r (capped at min(m, n) per matrix).
  c.galore.update_proj_gap = 200  # Steps T between projector refreshes (SVD).
  c.galore.scale = 0.25  # α on the projected-back updates.
  c.galore.side = "auto"  # auto (smaller dimension) | left | right.
  c.quant = ml_collections.ConfigDict()  # optimizer.name = adam8bit | galore8bit.
  c.quant.block_size = 256  # Elements per absmax block of the 8-bit moments.
  c.quant.min_size = 4096  # Smaller state leaves stay float32.
  return c


# Keys that change the optimizer state's shapes: a run's checkpoints cannot resume under other
# values (the learning rate, weight decay or GaLore's gap and scale may change).
STATE_LAYOUT_KEYS = ("name", "galore.rank", "galore.side", "quant.block_size", "quant.min_size")


def validate_config(o: ml_collections.ConfigDict) -> None:
  """Checks the `optimizer.*` section; raises ValueError naming the fix."""
  checks = [
    (o.name in OPTIMIZERS, f"optimizer.name={o.name!r} is unknown; choose one of "
     f"{', '.join(OPTIMIZERS)}"),
    (o.learning_rate > 0, f"optimizer.learning_rate must be positive, got {o.learning_rate}"),
    (o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}"),
    (0 <= o.b1 < 1, f"optimizer.b1 must be in [0, 1) (Adam's first-moment decay, e.g. 0.9), got "
     f"{o.b1}"),
    (0 <= o.b2 < 1, f"optimizer.b2 must be in [0, 1) (Adam's second-moment decay, e.g. 0.95), "
     f"got {o.b2}"),
    (o.eps >= 0, f"optimizer.eps must be >= 0 (e.g. 1e-8), got {o.eps}"),
    (0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}"),
    (o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}"),
    (o.clip_norm >= 0, f"optimizer.clip_norm must be >= 0 (0: off), got {o.clip_norm}"),
    (o.galore.rank >= 1, f"optimizer.galore.rank must be >= 1, got {o.galore.rank}"),
    (o.galore.update_proj_gap >= 1, "optimizer.galore.update_proj_gap must be >= 1, got "
     f"{o.galore.update_proj_gap}"),
    (o.galore.side in galore.SIDES, f"optimizer.galore.side={o.galore.side!r} is unknown; choose "
     f"one of {', '.join(galore.SIDES)}"),
    (o.quant.block_size >= 2, f"optimizer.quant.block_size must be >= 2, got {o.quant.block_size}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)


def make_optimizer(
  opt: ml_collections.ConfigDict,
  total_steps: int,
  trainable: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer a config names, and its learning-rate schedule (for logging).

  GaLore reads which parameters are attention/MLP matrices from the logical axis names of the
  boxed parameters `init` receives (`galore.matrices_from_axes`); parameters without names fall
  back to "every plain 2-D parameter".

  Args:
    opt: the `optimizer.*` section.
    total_steps: `train.steps`, the schedule's length.
    trainable: a function of the (boxed or unboxed) params returning a tree of bools over them
      (e.g. `lora.trainable_mask`); only the True leaves are updated and have optimizer state,
      and clipping and weight decay see only them. None: every parameter trains.
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
  tx = optax.chain(*chain, core)
  if trainable is not None:

    def labels(params):
      return jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))

    # The frozen leaves get zero updates from a stateless transform, so no state is kept for
    # them; they are empty nodes (optax.MaskedNode) in the trained branch's state.
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _matrices(params):
  """GaLore's matrices: by logical axis names when `params` are boxed, else the 2-D ones."""
  if any(boxes.is_box(x) for x in jax.tree.leaves(params, is_leaf=boxes.is_box)):
    return galore.matrices_from_axes(params)
  return galore.default_matrices(params)
