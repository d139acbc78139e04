"""LoRA training (Hu et al. 2021): only the low-rank adapters train, and they merge back.

With `model.lora_rank > 0` every `Dense` that `model.lora_targets` names carries adapters
`lora_a` [in..., r] and `lora_b` [r, out...] beside its frozen kernel W
(`fulcrum.modules.layers.LoRA`): y = x W + (alpha / r) · (x A) B. This module is the
optimizer's and the exporter's side of it:

- `trainable_mask(params)`: True on the adapters; `make_optimizer(..., trainable=...)` updates
  only those leaves and keeps optimizer state (moments, 8-bit codes) for nothing else; gradient
  clipping and weight decay see the adapters alone. GaLore projects `kernel`s only, so with
  `optimizer.name=galore` the adapters (rank r already) get its plain Adam and no projector.
- `merge(params, config)`: W + (alpha / r) · A B folded into each kernel, the adapters dropped,
  and the config with `lora_rank=0` that these params belong to (eq. 3's "no additional
  inference latency"; `hf.save_pretrained` exports this).
- `adapter_count(params)`: the number of adapter parameters, i.e. of trained ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fulcrum.modules.layers import LORA_A, LORA_B, LoRA
from fulcrum.modules.model_config import ModelConfig
from fulcrum.platform.optim import boxes

ADAPTERS = (LORA_A, LORA_B)


def _is_adapter(path: tuple[Any, ...]) -> bool:
  return getattr(path[-1], "key", None) in ADAPTERS


def trainable_mask(params: Any) -> Any:
  """A tree of bools over `params` (boxed or not): True on the adapter leaves."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _is_adapter(path), params, is_leaf=boxes.is_box
  )


def adapter_count(params: Any) -> int:
  """How many scalar parameters the adapters hold (what LoRA trains)."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
  return sum(math.prod(leaf.shape) for path, leaf in leaves if _is_adapter(path))


def merged_kernel(kernel: Any, a: Any, b: Any, scale: float) -> jax.Array:
  """W + scale · A B for a kernel [lead..., in..., out...] and its adapters A [lead..., in..., r],
  B [lead..., r, out...] (lead: the stacked `layers` axis of `scan_layers`), in float32."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  rank = a.shape[-1]
  batch = kernel.shape[:lead]
  a = jnp.asarray(a, jnp.float32).reshape(*batch, -1, rank)
  b = jnp.asarray(b, jnp.float32).reshape(*batch, rank, -1)
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(
  params: Mapping[str, Any], model_config: Mapping[str, Any] | ModelConfig
) -> tuple[dict[str, Any], ModelConfig]:
  """Folds every adapter pair into its kernel: the plain model with the adapted function.

  Args:
    params: the LoRA model's params (boxed or not, without the outer {"params": ...}).
    model_config: its `model.*` config (`lora_alpha / lora_rank` is the adapters' scale).

  Returns:
    `(params, config)`: unboxed params without `lora_a` / `lora_b`, whose kernels are
    W + (alpha / r) · A B, and `config` with `lora_rank=0`, whose model they fit. In float32
    that model's outputs equal the adapted model's (up to rounding); with `model.quant` the
    merged kernel is quantized as a whole, so they differ by its quantization error.
  """
  config = ModelConfig.from_mapping(model_config)
  params = nn.unbox(params)
  if not config.lora_rank:
    return dict(params), config
  scale = LoRA.from_config(config).scale

  def fold(tree):
    if not isinstance(tree, Mapping):
      return tree
    if LORA_A not in tree:
      return {k: fold(v) for k, v in tree.items()}
    out = {k: v for k, v in tree.items() if k not in ADAPTERS}
    out["kernel"] = merged_kernel(tree["kernel"], tree[LORA_A], tree[LORA_B], scale)
    return out

  return fold(params), dataclasses.replace(config, lora_rank=0)
