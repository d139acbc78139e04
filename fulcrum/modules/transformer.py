"""Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

from fulcrum.modules.attention import Attention, KVCache
from fulcrum.modules.layers import BATCH, EMBED, LENGTH, GatedMLP, LoRA, RMSNorm, tap
from fulcrum.modules.model_config import ModelConfig, require_sizes


class TransformerBlock(nn.Module):
  """One decoder block in the Llama layout.

  RMSNorm → attention → residual, then RMSNorm → SwiGLU MLP → residual.
  """

  config: ModelConfig
  # The token mixer: its kind and submodule path (`fulcrum.modules.blocks.layer_paths`).
  mixer: ClassVar[str] = "attention"
  mixer_path: ClassVar[tuple[str, ...]] = ("attn",)
  # Its weight matmuls (`Dense` names), which `model.lora_targets` may name.
  dense_names: ClassVar[tuple[str, ...]] = Attention.DENSE + GatedMLP.DENSE

  @classmethod
  def check_config(cls, c: ModelConfig) -> None:
    """Checks the `model.*` values this block reads; ValueError naming the fix."""
    Attention.check_config(c, num_kv_heads=c.kv_heads)
    require_sizes(c, mlp_dim=0)

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"] | None = None,
    cache: KVCache | None = None,
  ) -> tuple[Float[Array, "b t d"], KVCache | None]:
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=jnp.float32)
    h = RMSNorm(c.norm_eps, name="attn_norm", **kw)(x)
    h, cache = Attention.from_config(c, num_kv_heads=c.kv_heads, name="attn")(h, positions, cache)
    x = nn.with_logical_constraint(x + h, (BATCH, LENGTH, EMBED))
    h = RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x)
    h = GatedMLP(c.d_model, c.hidden_dim, "silu", lora=LoRA.from_config(c), name="mlp", **kw)(h)
    x = tap(self, "output", x + h)  # The residual stream after the block, for attribution.
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED)), cache

  def init_cache(self, batch: int, max_len: int, extra: int = 0) -> KVCache:
    c = self.config
    size = min(max_len, c.window + extra) if c.window else max_len
    return KVCache.init(batch, size, c.kv_heads, c.per_head_dim, c.compute_dtype)
