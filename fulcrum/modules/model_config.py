"""The typed model config every module is built from: the one owner of the `model.*` defaults.

A recipe's `model.*` section is derived from this dataclass (`fulcrum.platform.sections`), so a
field's default and comment here are the config key's default and documentation. Option lists
live with the code that implements them: architectures in `modules.models.ARCHS`, attention
implementations in `attention.AttentionImpl`, scans in `scan.ScanImpl`, `quant.MODES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# Field metadata marking a field the decoder sets at run time: not a `model.*` config key.
RUNTIME = "runtime"


def require(ok: bool, message: str) -> None:
  """Raises ValueError(message) unless `ok`: the config checks' one step (`models.validate`)."""
  if not ok:
    raise ValueError(message)


def require_sizes(c: ModelConfig, **minimums: int) -> None:
  """Raises ValueError naming the first `model.KEY` below its minimum (a minimum of 0 is a size
  where 0 means "derive the default")."""
  for key, low in minimums.items():
    value = getattr(c, key)
    hint = " (0: the default)" if low == 0 else ""
    require(value >= low, f"model.{key} must be >= {low}{hint}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters (the recipe's `model.*` section, typed).

  Zero-valued sizes mean "derive the usual default", see the properties below.
  """

  arch: str = (
    "transformer"  # A block stack (transformer | mamba | griffin | hawk) or dlinear | nlinear.
  )
  vocab_size: int = 256  # Byte-level default.
  d_model: int = 256  # Residual stream width.
  num_layers: int = 4  # Number of blocks.
  num_heads: int = 4  # Query heads.
  num_kv_heads: int = 0  # 0: num_heads (MHA; Griffin: 1, MQA); 1: MQA; otherwise GQA.
  head_dim: int = 0  # 0: d_model // num_heads.
  mlp_dim: int = 0  # 0: 8/3 d_model rounded up to a multiple of 64 (Griffin/Hawk: 3 d_model).
  window: int = 0  # Sliding-window attention; 0 = full causal.
  rope_theta: float = 10000.0  # RoPE base frequency.
  rope_fraction: float = 1.0  # Leading fraction of each head's dims RoPE rotates (RG: 0.5).
  attn_out_bias: bool = False  # Bias on the attention output projection (RecurrentGemma).
  norm_eps: float = 1e-6  # RMSNorm epsilon.
  tie_embeddings: bool = True  # Share the input embedding with the output projection.
  scan_layers: bool = False  # Stack identical blocks with nn.scan (faster compiles).
  remat: bool = False  # Rematerialise blocks in the backward pass (saves memory).
  dtype: str = "float32"  # Compute dtype (models.DTYPES); parameters stay float32.
  attention_impl: str = "auto"  # auto | xla | cudnn | reference (attention.AttentionImpl).
  # Decoding: recurrent layers return their state after every token of a chunk (not only the
  # last), so speculative and lookahead decoding can roll back to any accepted prefix. Set by
  # the decoder at run time, so not a config key (`RUNTIME` metadata).
  cache_history: bool = dataclasses.field(default=False, metadata={RUNTIME: True})
  quant: str = "none"  # Quantized training of the weight matmuls: none | int8 | int8_weight | fp8.
  # LoRA (Hu et al. 2021): low-rank adapters on the blocks' weight matmuls, the only parameters
  # trained (`fulcrum.platform.optim.lora`); `hf.save_pretrained` merges them into the weights.
  lora_rank: int = 0  # Adapter rank r; 0 = off.
  lora_alpha: float = 16.0  # The adapters' output is scaled by lora_alpha / lora_rank.
  # Comma-separated `Dense` names to adapt (attention q,k,v,o; MLP gate,up,down; Mamba
  # in_proj,x_proj,dt_proj,out_proj; Griffin/Hawk linear_x,linear_y,linear_out; the list for an
  # arch: `blocks.dense_names`), or all of them (embeddings and lm_head are never adapted).
  lora_targets: str = "all"
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
  # Forecasting (`task = "forecast"`, `modules.forecasting`).
  head: str = "lm"  # lm (logits) | forecast (a block stack with the forecasting head).
  input_len: int = 0  # Input window L in time steps (forecasters).
  horizon: int = 0  # Forecast horizon H in time steps (forecasters).
  channels: int = 0  # Channels C checked against the data; 0 = take them from the data.
  individual: bool = False  # DLinear/NLinear: one time-mixing map per channel.
  moving_avg: int = 25  # DLinear trend kernel (moving average, edges replicated).

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Builds from a dict/ConfigDict (a recipe's `model` section).

    Raises:
      ValueError: a key that is not a field (a typo would otherwise be silently dropped).
    """
    if isinstance(m, ModelConfig):
      return m
    m = dict(m.items())
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - names)
    if unknown:
      raise ValueError(
        f"unknown model key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
      )
    return cls(**m)

  @classmethod
  def config_fields(cls) -> tuple[dataclasses.Field, ...]:
    """The fields that are `model.*` config keys (all but the run-time ones)."""
    return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get(RUNTIME))

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
