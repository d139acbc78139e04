"""Griffin and Hawk (De et al. 2024): the RG-LRU, the recurrent block and the residual blocks.

Official JAX code: google-deepmind/recurrentgemma (`recurrentgemma/jax/layers.py`, `modules.py`);
parameter names follow it (`temporal_pre_norm`, `recurrent_block`, `rg_lru`, `a_param`, ...).

RG-LRU (paper Eqs. 1-4), per channel, with c = 8:

  r_t = σ(W_a x_t + b_a),  i_t = σ(W_x x_t + b_x)          block-diagonal, one block per head
  log a_t = -c · r_t · softplus(-Λ)                        i.e. a_t = σ(Λ)^(c r_t)
  h_t = a_t ⊙ h_{t-1} + sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t)

The parameter `a_param` is -Λ (RecurrentGemma's convention), so log a_t = -c r_t softplus(a_param).
At a document start (position 0) a_t = 0, so the state restarts. Recurrent block (Fig. 2):
`W_out(gelu(W_y x) ⊙ RG_LRU(conv1d(W_x x)))`. Residual block: pre-norm (RMSNorm with 1 + w)
temporal mixing, then a pre-norm gated-GeLU MLP of width 3·d. Griffin's layers cycle
(recurrent, recurrent, local MQA attention); Hawk's are all recurrent.

Sown intermediates of the RG-LRU (`mutable=["intermediates"]`): `x` (its input), `a` (a_t after
resets) and `input_scale` (sqrt(1 - a_t²) ⊙ i_t), so that
h_t = Σ_s (Π_{s<k<=t} a_k) ⊙ input_scale_s ⊙ x_s.
"""

from __future__ import annotations

import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

from fulcrum.modules import scan
from fulcrum.modules.attention import Attention, KVCache
from fulcrum.modules.layers import (
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  LENGTH,
  MLP,
  CausalConv1D,
  GatedMLP,
  LoRA,
  RMSNorm,
  dense,
  tap,
)
from fulcrum.modules.model_config import ModelConfig, require, require_sizes

RECURRENT, ATTENTION = "recurrent", "attention"


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x: Array, max_gradient: float) -> Array:
  """sqrt(x) whose gradient is clipped at `max_gradient` (it is infinite at 0: NaNs in bf16)."""
  return jnp.sqrt(x)


def _sqrt_fwd(x: Array, max_gradient: float) -> tuple[Array, Array]:
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient: float, x: Array, g: Array) -> tuple[Array]:
  # d sqrt(x) / dx = 1 / (2 sqrt(x)) <= max_gradient  ⇔  x >= 1 / (4 max_gradient²).
  return (g / (2 * jnp.sqrt(jnp.maximum(x, 1 / (4 * max_gradient**2)))),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def rg_lru_coefficients(
  log_a: Float[Array, "b t f"],
  input_gate: Float[Array, "b t f"],
  reset: Int[Array, "b t"] | None = None,
) -> tuple[Float[Array, "b t f"], Float[Array, "b t f"]]:
  """The RG-LRU as a linear recurrence h_t = a_t h_{t-1} + scale_t x_t (paper Eq. 4).

  Args:
    log_a: log a_t (<= 0).
    input_gate: i_t.
    reset: true at a document start, where a_t = 0 (and so sqrt(1 - a_t²) = 1).

  Returns:
    (a, scale) in float32 with scale = sqrt(1 - a²) ⊙ i.
  """
  log_a = log_a.astype(jnp.float32)
  a = jnp.exp(log_a)
  one_minus_a2 = -jnp.expm1(2 * log_a)  # 1 - a², accurate for a close to 1.
  if reset is not None:
    reset = reset.astype(bool)[..., None]
    a = jnp.where(reset, 0.0, a)
    one_minus_a2 = jnp.where(reset, 1.0, one_minus_a2)
  # The clip bounds the gradient where a -> 1 (bf16 training NaNs otherwise).
  scale = sqrt_bound_derivative(one_minus_a2, 1000.0) * input_gate.astype(jnp.float32)
  return a, scale


def a_param_init(
  low: float = 0.9, high: float = 0.999, c: float = 8.0
) -> nn.initializers.Initializer:
  """Initialises `a_param` = -Λ so that σ(Λ)^c (a_t at r_t = 1) is uniform in [low, high].

  This is the paper's statement (Sec. 2.4). RecurrentGemma's code instead draws σ(Λ) itself
  in [0.9, 0.999] (uniform on the ring's area), which gives a slower-decaying init.
  """

  def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    a_c = jax.random.uniform(key, shape, jnp.float32, low, high)
    softplus_a_param = -jnp.log(a_c) / c  # = -log σ(Λ)
    return jnp.log(jnp.expm1(softplus_a_param)).astype(dtype)  # softplus⁻¹

  return init


class BlockDiagonalLinear(nn.Module):
  """x ↦ W x + b with W block-diagonal: one [f/h, f/h] block per head (the RG-LRU gates)."""

  width: int
  num_blocks: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t f"]) -> Float[Array, "b t f"]:
    h, i = self.num_blocks, self.width // self.num_blocks
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "normal"), (HEADS, None, HEAD_DIM)
      ),
      (h, i, i),
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (HEADS, HEAD_DIM)),
      (h, i),
      self.param_dtype,
    )
    xh = x.astype(self.dtype).reshape(*x.shape[:-1], h, i)
    y = jnp.einsum("bthi,hij->bthj", xh, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return y.reshape(x.shape)


class RGLRU(nn.Module):
  """Real-Gated Linear Recurrent Unit (paper Sec. 2.4); see the module docstring.

  Attributes:
    width: channels f.
    num_heads: blocks of the block-diagonal gate projections.
    c: the constant c of log a_t = -c r_t softplus(-Λ).
    scan_impl: `fulcrum.modules.scan.ScanImpl` name of the linear-scan implementation.
  """

  width: int
  num_heads: int
  c: float = 8.0
  scan_impl: str = "auto"
  history: bool = False  # Return every state h_t (fp32) in place of the last one.
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t f"],
    positions: Int[Array, "b t"],
    h0: Float[Array, "b f"] | None = None,
  ) -> tuple[Float[Array, "b t f"], Float[Array, "b f"]]:
    """Runs the recurrence from h0 (zeros if None); returns all h_t and the last state (fp32),
    or with `history` all h_t twice (compute dtype, and fp32 [b, t, f] as the state)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a_param = self.param(
      "a_param",
      nn.with_logical_partitioning(a_param_init(c=self.c), (MLP,)),
      (self.width,),
      self.param_dtype,
    )
    input_gate = jax.nn.sigmoid(
      BlockDiagonalLinear(self.width, self.num_heads, name="input_gate", **kw)(x)
    )
    r = jax.nn.sigmoid(BlockDiagonalLinear(self.width, self.num_heads, name="a_gate", **kw)(x))
    log_a = -self.c * r.astype(jnp.float32) * jax.nn.softplus(a_param.astype(jnp.float32))
    a, scale = rg_lru_coefficients(log_a, input_gate, positions == 0)
    pad = (positions < 0)[..., None]  # Left padding while decoding: h passes unchanged.
    a, scale = jnp.where(pad, 1.0, a), jnp.where(pad, 0.0, scale)
    x, a, scale = tap(self, "x", x), tap(self, "a", a), tap(self, "input_scale", scale)
    h, h_last = scan.linear_scan(a, scale * x.astype(jnp.float32), h0, impl=self.scan_impl)
    return h.astype(self.dtype), h if self.history else h_last


class RecurrentCache(NamedTuple):
  """The state of one recurrent (RG-LRU) temporal-mixing block."""

  rg_lru: Float[Array, "b f"]  # RG-LRU state h (float32).
  conv: Float[Array, "b w-1 f"]  # The last w - 1 inputs of the conv (compute dtype).

  FEATURE_NDIM = (1, 2)  # Per-field dims after the batch axis (see MambaCache).

  @classmethod
  def init(
    cls, batch: int, width: int, conv_width: int, dtype: jnp.dtype = jnp.float32
  ) -> RecurrentCache:
    """The state before the first token: zeros."""
    return cls(
      rg_lru=jnp.zeros((batch, width), jnp.float32),
      conv=jnp.zeros((batch, conv_width - 1, width), dtype),
    )


class RecurrentBlock(nn.Module):
  """Griffin's recurrent temporal-mixing block: W_out(gelu(W_y x) ⊙ RG_LRU(conv1d(W_x x))).

  Attributes:
    d_model: input/output width d.
    width: RG-LRU width f.
    num_heads: blocks of the RG-LRU gates.
    conv_width: kernel width w of the causal conv.
  """

  d_model: int
  width: int
  num_heads: int
  conv_width: int = 4
  scan_impl: str = "auto"
  history: bool = False  # Return the cache after every token ([b, t, ...]), for speculation.
  lora: LoRA = LoRA()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # Its weight matmuls (the `Dense` names), which `model.lora_targets` may name.
  DENSE: ClassVar[tuple[str, ...]] = ("linear_x", "linear_y", "linear_out")

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"] | None = None,
    cache: RecurrentCache | None = None,
  ) -> tuple[Float[Array, "b t d"], RecurrentCache | None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, f = self.d_model, self.width
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    y = dense(d, f, (EMBED, MLP), "linear_y", use_bias=True, lora=self.lora, **kw)(x)
    y = jax.nn.gelu(y, approximate=True)
    xs = dense(d, f, (EMBED, MLP), "linear_x", use_bias=True, lora=self.lora, **kw)(x)
    conv = CausalConv1D(
      f,
      self.conv_width,
      MLP,
      kernel_init=nn.initializers.variance_scaling(0.01, "fan_in", "normal"),
      history=self.history and cache is not None,
      name="conv_1d",
      **kw,
    )
    # Decoding: left padding (position -1, a prefix of each row) is skipped by the conv and the
    # RG-LRU alike, so a chunk may start with padding anywhere in a sequence.
    skip = None if cache is None else positions < 0
    xs, conv_state = conv(xs, None if cache is None else cache.conv, positions, skip)
    rg_lru = RGLRU(
      f,
      self.num_heads,
      scan_impl=self.scan_impl,
      history=self.history and cache is not None,
      name="rg_lru",
      **kw,
    )
    xs, h_last = rg_lru(xs, positions, None if cache is None else cache.rg_lru)
    h = nn.with_logical_constraint(xs * y, (BATCH, LENGTH, MLP))
    out = dense(f, d, (MLP, EMBED), "linear_out", use_bias=True, lora=self.lora, **kw)(h)
    if cache is None:
      return out, None
    return out, RecurrentCache(h_last, conv_state.astype(cache.conv.dtype))


class ResidualBlock(nn.Module):
  """Griffin/Hawk residual block (paper Fig. 2): x + T(norm(x)), then x + GeGLU-MLP(norm(x)).

  T is the recurrent block or local MQA attention, by the class attribute `temporal`; the
  subclasses `RecurrentResidualBlock` and `AttentionResidualBlock` fix it, so the LM shell can
  build a layer from its class alone. Norms are RMSNorm scaled by (1 + w), w initialised to 0.
  Attention uses `config.window` (a window-sized ring-buffer cache) and is multi-query unless
  `config.num_kv_heads` says otherwise; the MLP width is `config.mlp_dim` or 3·d. A query sees
  `window` keys, itself included, as with transformers' `attention_window_size` (DeepMind's
  `window_size` W lets it see W + 1). RecurrentGemma's RoPE on half of each head
  (`config.rope_fraction`) and its output-projection bias (`config.attn_out_bias`) are options.
  """

  config: ModelConfig
  temporal: ClassVar[str] = RECURRENT
  # The token mixer: its kind and submodule path (`fulcrum.modules.blocks.layer_paths`).
  mixer: ClassVar[str] = "rg_lru"
  mixer_path: ClassVar[tuple[str, ...]] = ("recurrent_block", "rg_lru")
  # Its weight matmuls (`Dense` names), which `model.lora_targets` may name.
  dense_names: ClassVar[tuple[str, ...]] = RecurrentBlock.DENSE + GatedMLP.DENSE

  @classmethod
  def check_config(cls, c: ModelConfig) -> None:
    """Checks the `model.*` values this block reads (its temporal mixer's and the MLP's);
    ValueError naming the fix."""
    require_sizes(c, mlp_dim=0)
    if cls.temporal == ATTENTION:
      Attention.check_config(c, num_kv_heads=c.num_kv_heads or 1)
      return
    require_sizes(c, num_heads=1, lru_width=0, conv_width=1)
    require(
      c.rg_lru_width % c.num_heads == 0,
      f"the RG-LRU gates split its width {c.rg_lru_width} (model.lru_width, 0: d_model) into "
      f"model.num_heads={c.num_heads} blocks; make it divide by num_heads",
    )
    scan.check_available(c.scan_impl)

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"] | None = None,
    cache: RecurrentCache | KVCache | None = None,
  ) -> tuple[Float[Array, "b t d"], RecurrentCache | KVCache | None]:
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=jnp.float32)
    h = RMSNorm(c.norm_eps, scale_offset=1.0, name="temporal_pre_norm", **kw)(x)
    if self.temporal == RECURRENT:
      h, cache = RecurrentBlock(
        c.d_model,
        c.rg_lru_width,
        c.num_heads,
        conv_width=c.conv_width,
        scan_impl=c.scan_impl,
        history=c.cache_history,
        lora=LoRA.from_config(c),
        name="recurrent_block",
        **kw,
      )(h, positions, cache)
    else:
      attention = Attention.from_config(c, num_kv_heads=c.num_kv_heads or 1, name="attention_block")
      h, cache = attention(h, positions, cache)
    x = nn.with_logical_constraint(x + h, (BATCH, LENGTH, EMBED))
    h = RMSNorm(c.norm_eps, scale_offset=1.0, name="channel_pre_norm", **kw)(x)
    h = GatedMLP(
      c.d_model,
      c.mlp_dim or 3 * c.d_model,
      "gelu",
      use_bias=True,
      lora=LoRA.from_config(c),
      name="mlp_block",
      **kw,
    )(h)
    x = tap(self, "output", x + h)  # The residual stream after the block, for attribution.
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED)), cache

  def init_cache(self, batch: int, max_len: int, extra: int = 0) -> RecurrentCache | KVCache:
    """Empty cache: RG-LRU + conv state, or a KV cache (a ring buffer of `window` + `extra`
    slots)."""
    c = self.config
    if self.temporal == RECURRENT:
      return RecurrentCache.init(batch, c.rg_lru_width, c.conv_width, c.compute_dtype)
    size = min(max_len, c.window + extra) if c.window else max_len
    return KVCache.init(batch, size, c.num_kv_heads or 1, c.per_head_dim, c.compute_dtype)


class RecurrentResidualBlock(ResidualBlock):
  """A residual block whose temporal mixing is the recurrent (RG-LRU) block: Hawk's only layer."""

  temporal: ClassVar[str] = RECURRENT


class AttentionResidualBlock(ResidualBlock):
  """A residual block whose temporal mixing is local multi-query attention."""

  temporal: ClassVar[str] = ATTENTION
  mixer: ClassVar[str] = "attention"
  mixer_path: ClassVar[tuple[str, ...]] = ("attention_block",)
  dense_names: ClassVar[tuple[str, ...]] = Attention.DENSE + GatedMLP.DENSE


# Griffin's layer i is GRIFFIN_PATTERN[i % 3]: (recurrent, recurrent, attention), repeated.
GRIFFIN_PATTERN: tuple[type[ResidualBlock], ...] = (
  RecurrentResidualBlock,
  RecurrentResidualBlock,
  AttentionResidualBlock,
)
