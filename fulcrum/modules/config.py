"""The typed model config every module is built from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (the recipe's `model.*` section, typed).

  Zero-valued sizes mean "derive the usual default", see the properties below.
  """

  arch: str = "transformer"  # transformer | mamba | griffin | hawk.
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: num_heads (MHA; Griffin: 1, MQA); 1: MQA; otherwise GQA.
  head_dim: int = 0  # 0: d_model // num_heads.
  mlp_dim: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64 (Griffin/Hawk: 3 d_model).
  window: int = 0  # Sliding-window attention; 0 = full causal.
  rope_theta: float = 10000.0
  rope_fraction: float = 1.0  # Leading fraction of each head's dims RoPE rotates (RG: 0.5).
  attn_out_bias: bool = False  # Bias on the attention output projection (RecurrentGemma).
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  scan_layers: bool = False
  remat: bool = False
  dtype: str = "float32"
  attention_impl: str = "auto"
  # Decoding: recurrent layers return their state after every token of a chunk (not only the
  # last), so speculative and lookahead decoding can roll back to any accepted prefix.
  cache_history: bool = False
  quant: str = "none"  # Quantized training of the weight matmuls: none | int8 | int8_weight | fp8.
  # Embedding and logits (Gemma/RecurrentGemma conventions; off by default).
  scale_embeddings: bool = False  # Multiply token embeddings by sqrt(d_model).
  embed_scale_bf16: bool = False  # Round that sqrt(d_model) to bfloat16 (RecurrentGemma).
  logits_soft_cap: float = 0.0  # cap * tanh(logits / cap); 0 = off (RecurrentGemma: 30).
  # Mamba (selective SSM) blocks.
  ssm_state: int = 16  # SSM state size N per channel.
  ssm_expand: int = 2  # Expansion E: the mixer works on E * d_model channels.
  conv_width: int = 4  # Causal depthwise conv kernel width (Mamba and Griffin/Hawk).
  dt_rank: int = 0  # Rank R of the dt projection; 0 = ceil(d_model / 16).
  selective: bool = True  # False: dt, B, C are input-independent parameters (LTI ablation).
  scan_impl: str = "auto"  # Scan implementation (fulcrum.modules.scan.ScanImpl) for SSM/RG-LRU.
  # Griffin / Hawk blocks.
  lru_width: int = 0  # RG-LRU width; 0 = d_model.

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Builds from a dict/ConfigDict, ignoring keys that are not model hyper-parameters."""
    if isinstance(m, ModelConfig):
      return m
    m = dict(m.items())
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in m.items() if k in names})

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def per_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or -(-8 * self.d_model // 3 // 64) * 64

  @property
  def ssm_dt_rank(self) -> int:
    return self.dt_rank or -(-self.d_model // 16)

  @property
  def rg_lru_width(self) -> int:
    return self.lru_width or self.d_model

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)
