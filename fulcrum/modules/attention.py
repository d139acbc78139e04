"""Multi-head attention (MHA, GQA, MQA) with full-causal or sliding-window masks and a KV cache.

Masks are derived from token positions: query at position p sees key at position q when
`0 <= q <= p` and, for local attention, `p - q < window`. Position -1 marks an empty cache slot
or padding, so the one rule serves training, left-padded batches, a full cache and a
window-sized ring-buffer cache.

RoPE rotates all of each head's dims, or only the leading `rope_fraction` of them (the rest pass
through unrotated, as in RecurrentGemma, which rotates half).
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from fulcrum.modules import kvquant
from fulcrum.modules.layers import (
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  KV_HEADS,
  LENGTH,
  LoRA,
  dense,
  rope,
  tap,
)
from fulcrum.modules.model_config import ModelConfig, require


def rotary_dims(head_dim: int, fraction: float) -> int:
  """How many leading dims of a head RoPE rotates: int(head_dim · fraction), as transformers does.

  Raises:
    ValueError: fraction is not in (0, 1], or the rotated dims are not a positive even number.
  """
  dims = int(head_dim * fraction)
  if not 0 < fraction <= 1 or dims <= 0 or dims % 2:
    raise ValueError(
      f"rope_fraction={fraction} of head_dim={head_dim} rotates {dims} dims; RoPE needs a "
      "positive even number of rotated dims (rope_fraction in (0, 1])"
    )
  return dims


def partial_rope(
  x: Float[Array, "b t h e"], positions: Int[Array, "b t"], theta: float, fraction: float = 1.0
) -> Float[Array, "b t h e"]:
  """RoPE (half-split layout) on the leading `rotary_dims(e, fraction)` dims; the rest pass."""
  dims = rotary_dims(x.shape[-1], fraction)
  if dims == x.shape[-1]:
    return rope(x, positions, theta)
  return jnp.concatenate([rope(x[..., :dims], positions, theta), x[..., dims:]], axis=-1)


class AttentionImpl(enum.StrEnum):
  """How scores are computed. AUTO lets `jax.nn.dot_product_attention` pick per backend."""

  AUTO = "auto"  # cuDNN fused attention on GPU where it applies, XLA elsewhere.
  XLA = "xla"
  CUDNN = "cudnn"
  REFERENCE = "reference"  # Plain einsum + softmax; the test oracle.


# cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) runs on
# NVIDIA GPUs only, on float16/bfloat16 inputs: anything else fails at the first step.
CUDNN_DTYPES = ("bfloat16", "float16")


class KVCache(NamedTuple):
  """Keys and values of past tokens for one attention layer.

  Token at position p lives in slot p mod s: a full cache has one slot per position up to the
  context limit; a local-attention cache is a ring buffer of at least `window` slots. Rows of a
  batch advance independently (their own positions), so speculative and lookahead decoding can
  accept a different number of tokens per row and `truncate` back.
  """

  k: Float[Array, "b s k e"]  # Keys, RoPE applied.
  v: Float[Array, "b s k e"]
  positions: Int[Array, "b s"]  # Position held in each slot; -1 = empty.

  FEATURE_NDIM = (3, 3, 1)  # Per-field dims after the batch axis (k: s k e, positions: s).

  @classmethod
  def init(
    cls, batch: int, size: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype = jnp.float32
  ) -> KVCache:
    z = jnp.zeros((batch, size, num_kv_heads, head_dim), dtype)
    return cls(z, z, jnp.full((batch, size), -1, jnp.int32))

  def truncate(self, lengths: Int[Array, " b"]) -> KVCache:
    """Forgets every token at position >= lengths[row] (rejected speculative tokens)."""
    return self._replace(positions=_truncated(self.positions, lengths))


@struct.dataclass
class QuantizedKVCache:
  """A KV cache stored quantized (KVQuant, Hooper et al. 2024; `fulcrum.modules.kvquant`).

  Keys are cached before RoPE when `spec.pre_rope` (rotated after dequantization, at the
  positions held in the cache), values per token; the token at position 0 (the attention sink)
  is kept in full precision beside them. Slots work as in `KVCache`. Attention reads keys and
  values only through the quantizer, the chunk being decoded included, so decoding a sequence
  in one chunk or token by token gives the same result (up to float rounding deciding
  an entry right at a calibrated outlier threshold).
  """

  k: kvquant.QuantizedVectors  # Leaves [b, s, ...].
  v: kvquant.QuantizedVectors
  positions: Int[Array, "b s"]  # Position held in each slot; -1 = empty.
  sink_k: Float[Array, "b k e"]  # Keys and values of position 0, full precision.
  sink_v: Float[Array, "b k e"]
  spec: kvquant.KVQuantSpec  # This layer's codebooks and key thresholds.

  @classmethod
  def init(
    cls, batch: int, size: int, num_kv_heads: int, head_dim: int, spec: kvquant.KVQuantSpec
  ) -> QuantizedKVCache:
    z = jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32)
    return cls(
      k=kvquant.empty(batch, size, num_kv_heads, head_dim, spec, "key"),
      v=kvquant.empty(batch, size, num_kv_heads, head_dim, spec, "value"),
      positions=jnp.full((batch, size), -1, jnp.int32),
      sink_k=z,
      sink_v=z,
      spec=spec,
    )

  def truncate(self, lengths: Int[Array, " b"]) -> QuantizedKVCache:
    """Forgets every token at position >= lengths[row] (rejected speculative tokens)."""
    return self.replace(positions=_truncated(self.positions, lengths))

  def map_batched(self, fn) -> QuantizedKVCache:
    """fn(array, batch_axis) over every array with a batch axis (not the spec)."""
    per_token = lambda a: fn(a, a.ndim - 3)  # [.., b, s, x]
    return self.replace(
      k=jax.tree.map(per_token, self.k),
      v=jax.tree.map(per_token, self.v),
      positions=fn(self.positions, self.positions.ndim - 2),
      sink_k=fn(self.sink_k, self.sink_k.ndim - 3),
      sink_v=fn(self.sink_v, self.sink_v.ndim - 3),
    )

  @property
  def shape(self) -> tuple[int, int]:  # (kv heads, head dim)
    return self.sink_k.shape[-2:]

  def read(self, k: Array, v: Array, positions: Array) -> tuple[Array, Array, Array, Array]:
    """Quantizes a chunk's keys and values, writes them, and returns what attention sees.

    Returns:
      (keys, values, key positions) over the old slots followed by the chunk — keys still
      pre-RoPE when `spec.pre_rope` — and the updated cache.
    """
    spec, shape = self.spec, self.shape
    qk, qv = kvquant.quantize(k, spec, "key"), kvquant.quantize(v, spec, "value")
    at_zero = positions == 0
    has_zero = at_zero.any(1)[:, None, None]
    first = jnp.argmax(at_zero, axis=1)
    pick = lambda x: jnp.take_along_axis(x, first[:, None, None, None], 1)[:, 0].astype(jnp.float32)
    sink_k = jnp.where(has_zero, pick(k), self.sink_k)
    sink_v = jnp.where(has_zero, pick(v), self.sink_v)

    def restore_sink(x, pos, sink):
      return jnp.where((pos == 0)[..., None, None], sink[:, None], x)

    keys = jnp.concatenate(
      [kvquant.dequantize(self.k, spec, "key", shape), kvquant.dequantize(qk, spec, "key", shape)],
      axis=1,
    )
    values = jnp.concatenate(
      [
        kvquant.dequantize(self.v, spec, "value", shape),
        kvquant.dequantize(qv, spec, "value", shape),
      ],
      axis=1,
    )
    k_pos = jnp.concatenate([self.positions, positions], axis=1)
    keys, values = restore_sink(keys, k_pos, sink_k), restore_sink(values, k_pos, sink_v)
    slots = cache_slots(positions, self.positions.shape[1])
    write = lambda old, new: jax.tree.map(lambda o, n: scatter_tokens(o, slots, n), old, new)
    cache = self.replace(
      k=write(self.k, qk),
      v=write(self.v, qv),
      positions=scatter_tokens(self.positions, slots, positions),
      sink_k=sink_k,
      sink_v=sink_v,
    )
    return keys, values, k_pos, cache


def _truncated(positions: Array, lengths: Array) -> Array:
  # positions may carry leading stacked-layer axes: [..., b, s].
  return jnp.where(positions >= lengths[:, None], -1, positions)


def cache_slots(positions: Int[Array, "b t"], size: int) -> Int[Array, "b t"]:
  """Slot of each new token (position mod size); `size` (out of range: dropped) for padding
  (position < 0) and for tokens a later token of the same chunk overwrites in a ring buffer."""
  last = positions.max(axis=1, keepdims=True)
  keep = (positions >= 0) & (positions > last - size)
  return jnp.where(keep, positions % size, size)


def scatter_tokens(buffer: Array, slots: Int[Array, "b t"], values: Array) -> Array:
  """buffer[b, slots[b, t]] = values[b, t] (leading axes [b, s] / [b, t]); out-of-range dropped."""
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


def attention_mask(q_pos: Int[Array, "b t"], k_pos: Int[Array, "b s"], window: int) -> Array:
  """Boolean [b, 1, t, s] mask: causal by position, within `window` if window > 0."""
  q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
  mask = (k >= 0) & (k <= q)
  if window:
    mask &= q - k < window
  return mask


def attention_weights(q: Array, k: Array, mask: Bool[Array, "b 1 t s"]) -> Array:
  """softmax(q kᵀ / sqrt(e)) [b, h, t, s] in float32, kv heads repeated for GQA/MQA; a query
  with no visible key (only padding rows) gets zeros, not a uniform average."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  scores = jnp.einsum("bthe,bshe->bhts", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.where(mask.any(-1, keepdims=True), probs, 0.0)


def reference_attention(q: Array, k: Array, v: Array, mask: Bool[Array, "b 1 t s"]) -> Array:
  """softmax(q kᵀ / sqrt(e)) v in float32 with kv heads repeated for GQA/MQA."""
  probs = attention_weights(q, k, mask)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
  return jnp.einsum("bhts,bshe->bthe", probs, v.astype(jnp.float32)).astype(q.dtype)


def blocked_local_attention(
  q: Float[Array, "b t h e"],
  k: Float[Array, "b t k e"],
  v: Float[Array, "b t k e"],
  positions: Int[Array, "b t"],
  window: int,
  impl: AttentionImpl = AttentionImpl.AUTO,
) -> Float[Array, "b t h e"]:
  """Sliding-window attention in O(t·window): blocks of `window` queries see their own block
  and the previous one, which hold every key within the window (positions increase by one
  per token). Equals full attention under `attention_mask(positions, positions, window)`."""
  b, t, h, e = q.shape
  nb = -(-t // window)
  pad = nb * window - t

  def blocks(z, fill):
    z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2), constant_values=fill)
    return z.reshape(b, nb, window, *z.shape[2:])

  def with_previous(z, fill):  # [b, nb, w, ...] → [b, nb, 2w, ...]
    prev = jnp.concatenate([jnp.full_like(z[:, :1], fill), z[:, :-1]], axis=1)
    return jnp.concatenate([prev, z], axis=2)

  def fold(z):
    return z.reshape(b * nb, *z.shape[2:])

  q_pos = blocks(positions, -1)
  kk, vv = with_previous(blocks(k, 0), 0), with_previous(blocks(v, 0), 0)
  mask = attention_mask(fold(q_pos), fold(with_previous(q_pos, -1)), window)
  out = jax.nn.dot_product_attention(
    fold(blocks(q, 0)),
    fold(kk).astype(q.dtype),
    fold(vv).astype(q.dtype),
    mask=mask,
    implementation=None if impl == AttentionImpl.AUTO else str(impl),
  )
  out = jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0)  # Padding rows see no key.
  return out.reshape(b, nb * window, h, e)[:, :t]


class Attention(nn.Module):
  """Causal self-attention with rotary embeddings; MHA, GQA or MQA by `num_kv_heads`.

  Attributes:
    num_heads: query heads h.
    num_kv_heads: key/value heads k (h % k == 0; 1 = MQA).
    head_dim: per-head width e.
    window: sliding-window size; 0 = full causal attention.
    rope_fraction: the leading fraction of each head's dims that RoPE rotates.
    use_bias: biases on all four projections.
    out_bias: a bias on the output projection only (RecurrentGemma).
  """

  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  window: int = 0
  rope_theta: float = 10000.0
  rope_fraction: float = 1.0
  impl: AttentionImpl = AttentionImpl.AUTO
  use_bias: bool = False
  out_bias: bool = False
  lora: LoRA = LoRA()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # Its weight matmuls (the `Dense` names), which `model.lora_targets` may name.
  DENSE: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o")

  @classmethod
  def check_config(cls, c: ModelConfig, num_kv_heads: int) -> None:
    """Checks the `model.*` values an attention layer reads; ValueError naming the fix.

    Args:
      c: the model config.
      num_kv_heads: the block's key/value heads (`model.num_kv_heads`, or the block's default
        where it is 0).
    """
    require(c.num_heads >= 1, f"model.num_heads must be positive, got {c.num_heads}")
    require(
      c.num_kv_heads >= 0,
      f"model.num_kv_heads must be >= 0 (0: the block's default), got {c.num_kv_heads}",
    )
    require(
      c.num_heads % num_kv_heads == 0,
      f"model.num_heads={c.num_heads} must divide by model.num_kv_heads={num_kv_heads}",
    )
    require(
      c.head_dim >= 0, f"model.head_dim must be >= 0 (0: d_model // num_heads), got {c.head_dim}"
    )
    require(
      c.head_dim > 0 or c.d_model % c.num_heads == 0,
      f"model.d_model={c.d_model} must divide by model.num_heads={c.num_heads} "
      "(or set model.head_dim)",
    )
    require(c.window >= 0, f"model.window must be >= 0 (0: full causal), got {c.window}")
    require(
      math.isfinite(c.rope_theta) and c.rope_theta > 0,
      f"model.rope_theta must be a positive number (RoPE's base, e.g. 10000), got {c.rope_theta}",
    )
    require(
      0 < c.rope_fraction <= 1, f"model.rope_fraction must be in (0, 1], got {c.rope_fraction}"
    )
    dims = int(c.per_head_dim * c.rope_fraction)
    if c.rope_fraction == 1:
      require(
        dims % 2 == 0,
        f"RoPE rotates pairs of dims, but each head has {dims} (model.head_dim, or d_model / "
        "num_heads); make it even",
      )
    require(
      dims > 0 and dims % 2 == 0,
      f"model.rope_fraction={c.rope_fraction} rotates {dims} of each head's {c.per_head_dim} "
      "dims; RoPE needs a positive even number (change model.rope_fraction or model.head_dim)",
    )
    if c.attention_impl == AttentionImpl.CUDNN:
      backend = jax.default_backend()
      require(
        backend == "gpu" and c.dtype in CUDNN_DTYPES,
        f"model.attention_impl=cudnn needs an NVIDIA GPU and model.dtype bfloat16 or float16 "
        f"(here: {backend}, {c.dtype}); use model.attention_impl=auto",
      )

  @classmethod
  def from_config(cls, c: ModelConfig, *, num_kv_heads: int, name: str) -> Attention:
    """The attention layer a model config describes (transformer and Griffin blocks share it)."""
    return cls(
      c.d_model,
      c.num_heads,
      num_kv_heads,
      c.per_head_dim,
      window=c.window,
      rope_theta=c.rope_theta,
      rope_fraction=c.rope_fraction,
      out_bias=c.attn_out_bias,
      impl=AttentionImpl(c.attention_impl),
      lora=LoRA.from_config(c),
      dtype=c.compute_dtype,
      param_dtype=jnp.float32,
      name=name,
    )

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"] | None = None,
    cache: KVCache | None = None,
  ) -> tuple[Float[Array, "b t d"], KVCache | None]:
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias, lora=self.lora
    )
    h, k_heads, e = self.num_heads, self.num_kv_heads, self.head_dim
    d = self.d_model
    q = dense(d, (h, e), (EMBED, HEADS, HEAD_DIM), "q", **kw)(x)
    k = dense(d, (k_heads, e), (EMBED, KV_HEADS, HEAD_DIM), "k", **kw)(x)
    v = dense(d, (k_heads, e), (EMBED, KV_HEADS, HEAD_DIM), "v", **kw)(x)
    implicit_positions = positions is None
    if implicit_positions:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    # Keys and values as a KV cache stores them (pre-RoPE). KVQuant calibrates on these and on
    # the loss gradients with respect to them (`tap`).
    k, v = tap(self, "keys", k), tap(self, "values", v)
    rotate = lambda z, pos: partial_rope(z, pos, self.rope_theta, self.rope_fraction)
    q = nn.with_logical_constraint(rotate(q, positions), (BATCH, LENGTH, HEADS, HEAD_DIM))

    if isinstance(cache, QuantizedKVCache):
      pre_rope = cache.spec.pre_rope
      keys, values, k_pos, cache = cache.read(k if pre_rope else rotate(k, positions), v, positions)
      if pre_rope:
        keys = rotate(keys, jnp.maximum(k_pos, 0))
      keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    else:
      k = rotate(k, positions)
    if cache is None:
      keys, values, k_pos = k, v, positions
    elif isinstance(cache, KVCache) and x.shape[1] <= cache.k.shape[1] - self.window:
      # Write, then attend over the cache alone (updated in place, no copy): the chunk's
      # tokens only overwrite slots whose positions are out of every query's window.
      cache = _write(cache, k, v, positions)
      keys, values, k_pos = cache.k, cache.v, cache.positions
    elif isinstance(cache, KVCache):
      # A chunk longer than a ring buffer's spare slots: attend over the old cache plus the
      # new tokens before writing, so every key inside the window is seen.
      keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
      values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
      k_pos = jnp.concatenate([cache.positions, positions], axis=1)
      cache = _write(cache, k, v, positions)

    if self.impl == AttentionImpl.REFERENCE:
      out = reference_attention(q, keys, values, attention_mask(positions, k_pos, self.window))
    elif cache is None and self.window and x.shape[1] > 2 * self.window:
      # Long sequences under a sliding window: O(t·window) blocked attention, not O(t²).
      out = blocked_local_attention(q, k, v, positions, self.window, impl=self.impl)
    elif cache is None and implicit_positions:
      # Plain causal (or banded) training pass: let the kernel build the mask itself.
      out = jax.nn.dot_product_attention(
        q,
        keys.astype(q.dtype),
        values.astype(q.dtype),
        is_causal=True,
        local_window_size=(self.window - 1, 0) if self.window else None,
        implementation=None if self.impl == AttentionImpl.AUTO else str(self.impl),
      )
    else:
      mask = attention_mask(positions, k_pos, self.window)
      out = jax.nn.dot_product_attention(
        q,
        keys.astype(q.dtype),
        values.astype(q.dtype),
        mask=mask,
        implementation=None if self.impl == AttentionImpl.AUTO else str(self.impl),
      )
      # Rows that see no key at all (padding) come back as zeros, as in the reference.
      out = jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0)
    if self.is_mutable_collection("attention") and not self.is_initializing():
      # Attention weights for attribution (rollout), only when asked for (never at init, whose
      # collections are all mutable): [b, h, t, s] over the keys attended (the cache's slots
      # when decoding).
      self.sow(
        "attention",
        "weights",
        attention_weights(q, keys, attention_mask(positions, k_pos, self.window)),
      )
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
    kw["use_bias"] = self.use_bias or self.out_bias
    y = dense((h, e), d, (HEADS, HEAD_DIM, EMBED), "o", **kw)(out)
    return y, cache


def _write(cache: KVCache, k: Array, v: Array, positions: Array) -> KVCache:
  """Writes the new tokens into their slots (position mod the cache size)."""
  slots = cache_slots(positions, cache.k.shape[1])
  return KVCache(
    k=scatter_tokens(cache.k, slots, k),
    v=scatter_tokens(cache.v, slots, v),
    positions=scatter_tokens(cache.positions, slots, positions),
  )
