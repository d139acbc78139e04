"""Shared layers: RMSNorm, embeddings, rotary position embeddings and the gated MLP.

Shape vocabulary (used in annotations and einsum strings across `fulcrum.modules`):
  b batch, t time (queries), s time (keys), d model width, h heads, k key/value heads,
  e per-head width, f MLP width, v vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

Dtype = jnp.dtype

# Logical axis names; only platform/sharding.py maps them onto mesh axes.
BATCH, LENGTH, EMBED, VOCAB = "batch", "length", "embed", "vocab"
HEADS, KV_HEADS, HEAD_DIM, MLP = "heads", "kv_heads", "head_dim", "mlp"


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32.

  Attributes:
    eps: added to the mean square before the rsqrt.
    scale_offset: the output is scaled by `scale + scale_offset`; 0 with scale initialised to
      ones (Llama), or 1 with scale initialised to zeros (Gemma/Griffin, "1 + w").
  """

  eps: float = 1e-6
  scale_offset: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param(
      "scale", nn.with_logical_partitioning(init, (EMBED,)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (scale.astype(jnp.float32) + self.scale_offset)).astype(self.dtype)


class Embedder(nn.Module):
  """Token embedding table; `attend` reuses it as the output projection (tied embeddings)."""

  vocab_size: int
  d_model: int
  scale_by_sqrt_dim: bool = False  # Gemma-style sqrt(d) input scaling.
  stddev: float = 1.0  # Init scale; the LM uses d**-0.5 when the table is also the output layer.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=self.stddev), (VOCAB, EMBED)),
      (self.vocab_size, self.d_model),
      self.param_dtype,
    )

  def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    if self.scale_by_sqrt_dim:
      x = x * jnp.sqrt(self.d_model).astype(self.dtype)
    return x

  def attend(self, x: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
    return jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype))


def rope(x: Float[Array, "b t h e"], positions: Int[Array, "b t"], theta: float) -> Array:
  """Rotary position embedding (Su et al. 2021) in the half-split layout used by Llama.

  The first and second halves of each head vector form the (real, imaginary) pairs, which is
  the layout of Hugging Face Llama checkpoints, so their q/k weights load without permuting.
  Computed in float32; returns x's dtype.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, t, 1, e/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Dense(nn.Module):
  """A linear map contracting x's trailing `len(in_shape)` axes with a kernel.

  The kernel has shape `in_shape + out_shape` and carries the logical names `axes`; it is
  initialised LeCun-normal with fan-in = prod(in_shape). (Flax's DenseGeneral initialises a
  flattened kernel, which clashes with multi-axis logical partitioning under a mesh.)
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    init = nn.initializers.variance_scaling(
      1.0,
      "fan_in",
      "truncated_normal",
      in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, n_in + n_out)),
    )
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, self.axes),
      self.in_shape + self.out_shape,
      self.param_dtype,
    )
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
    )
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
        self.out_shape,
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


def dense(
  in_shape: int | tuple[int, ...],
  out_shape: int | tuple[int, ...],
  axes: tuple[str | None, ...],
  name: str,
  **kw,
) -> Dense:
  """A `Dense` from int-or-tuple shapes; `axes` names the kernel's axes (inputs, then outputs)."""
  as_tuple = lambda s: (s,) if isinstance(s, int) else tuple(s)
  in_shape, out_shape = as_tuple(in_shape), as_tuple(out_shape)
  if len(axes) != len(in_shape) + len(out_shape):
    raise ValueError(f"{name}: {len(axes)} axis names for a {in_shape}+{out_shape} kernel")
  return Dense(in_shape, out_shape, axes, name=name, **kw)


class GatedMLP(nn.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))` — SwiGLU with silu (Shazeer 2020), GeGLU with gelu."""

  d_model: int
  hidden_dim: int
  activation: str = "silu"  # silu (Llama) or gelu (Griffin, tanh approximation).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, f = self.d_model, self.hidden_dim
    gate = dense(d, f, (EMBED, MLP), "gate", **kw)(x)
    up = dense(d, f, (EMBED, MLP), "up", **kw)(x)
    act = nn.silu if self.activation == "silu" else lambda g: nn.gelu(g, approximate=True)
    h = nn.with_logical_constraint(act(gate) * up, (BATCH, LENGTH, MLP))
    return dense(f, d, (MLP, EMBED), "down", **kw)(h)
