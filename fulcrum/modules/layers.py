"""Shared layers: RMSNorm, embeddings, rotary position embeddings, the linear map `Dense` (with
optional LoRA adapters), the gated MLP and the causal depthwise convolution of the recurrent
blocks.

Shape vocabulary (used in annotations and einsum strings across `fulcrum.modules`):
  b batch, t time (queries), s time (keys), d model width, h heads, k key/value heads,
  e per-head width, f MLP width (also the expanded width of Mamba and the RG-LRU width),
  n SSM state size, w convolution kernel width, r rank of Mamba's dt projection, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Bool, Float, Int

from fulcrum.modules.model_config import require

if TYPE_CHECKING:
  from fulcrum.modules.model_config import ModelConfig

Dtype = jnp.dtype

# Logical axis names; only platform/training/sharding.py maps them onto mesh axes.
BATCH, LENGTH, EMBED, VOCAB = "batch", "length", "embed", "vocab"
HEADS, KV_HEADS, HEAD_DIM, MLP = "heads", "kv_heads", "head_dim", "mlp"


def tap(module: nn.Module, name: str, value: Array) -> Array:
  """Exposes an activation by name: sown to "intermediates" (when that collection is mutable)
  and, for gradients with respect to it, plus a zero "perturbations" variable — only when an
  `apply` passes a mutable "perturbations" collection or one that holds this name, never at
  init (so `init` returns params only). Attribution and KV-cache calibration read these.
  """
  module.sow("intermediates", name, value)
  if not module.is_initializing() and (
    module.is_mutable_collection("perturbations") or module.has_variable("perturbations", name)
  ):
    value = module.perturb(name, value)
  return value


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
  scale_in_bf16: bool = False  # Round sqrt(d) to bfloat16 first, as RecurrentGemma was trained.
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
      scale = jnp.sqrt(self.d_model)
      if self.scale_in_bf16:
        scale = scale.astype(jnp.bfloat16)
      x = x * scale.astype(self.dtype)
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


# `model.lora_targets` value that adapts every weight matmul of the architecture.
ALL_TARGETS = "all"
# The names of an adapted `Dense`'s adapter params, beside its "kernel".
LORA_A, LORA_B = "lora_a", "lora_b"


def parse_targets(targets: str) -> tuple[str, ...]:
  """`model.lora_targets` ("q,v", "all", ...) as a tuple of names, in order, without repeats."""
  return tuple(dict.fromkeys(t.strip() for t in targets.split(",") if t.strip()))


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adaptation (Hu et al. 2021, eq. 3) of the `Dense` layers named in `targets`.

  An adapted layer computes y = x W + (alpha / rank) · (x A) B with A [in..., r] random and
  B [r, out...] zeros, so a model with adapters starts out equal to its base model.

  Attributes:
    rank: r, the adapters' rank; 0 switches LoRA off.
    alpha: the adapters' output is scaled by alpha / rank.
    targets: names of the `Dense` layers to adapt ("q", "up", "in_proj", ...), or
      `ALL_TARGETS` for every `Dense` that is given this value.
  """

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, c: ModelConfig) -> LoRA:
    """The adapters `model.lora_rank`, `model.lora_alpha` and `model.lora_targets` describe."""
    return cls(c.lora_rank, c.lora_alpha, parse_targets(c.lora_targets))

  def adapts(self, name: str | None) -> bool:
    return self.rank > 0 and (name in self.targets or ALL_TARGETS in self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def check_lora(c: ModelConfig, names: tuple[str, ...]) -> None:
  """Checks the `model.lora_*` keys against `names`, the weight matmuls (`Dense` names) that
  `c.arch` has; raises ValueError naming the fix. Targets are checked only with LoRA on (the
  default targets need not exist in every architecture when they are unused)."""
  require(c.lora_rank >= 0, f"model.lora_rank must be >= 0 (0: off), got {c.lora_rank}")
  if not c.lora_rank:
    return
  require(
    bool(names),
    f"model.arch={c.arch} has no weight matmuls LoRA can adapt; set model.lora_rank=0",
  )
  require(
    math.isfinite(c.lora_alpha) and c.lora_alpha > 0,
    f"model.lora_alpha must be a positive number (the scale is alpha / rank), got {c.lora_alpha}",
  )
  targets = parse_targets(c.lora_targets)
  options = (*names, ALL_TARGETS)
  unknown = [t for t in targets if t not in options]
  require(
    bool(targets) and not unknown,
    f"model.lora_targets={c.lora_targets!r} names no weight matmul of {c.arch}"
    f"{' (' + ', '.join(unknown) + ')' if unknown else ''}; give a comma-separated list of "
    f"{', '.join(options)}",
  )


class Dense(nn.Module):
  """A linear map contracting x's trailing `len(in_shape)` axes with a kernel.

  The kernel has shape `in_shape + out_shape` and carries the logical names `axes`; it is
  initialised LeCun-normal with fan-in = prod(in_shape). (Flax's DenseGeneral initialises a
  flattened kernel, which clashes with multi-axis logical partitioning under a mesh.)
  `kernel_init` / `bias_init` override the initialisers (e.g. Mamba's dt projection).
  When `lora` adapts this layer's name, it adds the adapters `lora_a` [in..., r] (axes: the
  input axes, then none) and `lora_b` [r, out...] (none, then the output axes); see `LoRA`.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer | None = None  # None: LeCun truncated normal.
  bias_init: nn.initializers.Initializer | None = None  # None: zeros.
  lora: LoRA = LoRA()  # Low-rank adapters, if `lora` names this layer.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    init = self.kernel_init or _lecun(n_in, n_out)
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
        nn.with_logical_partitioning(self.bias_init or nn.initializers.zeros, self.axes[n_in:]),
        self.out_shape,
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    if self.lora.adapts(self.name):
      y = y + self._adapter(x)
    return y

  def _adapter(self, x: Array) -> Array:
    """(alpha / r) · (x A) B in the compute dtype, with A and B created on first use."""
    n_in, r = len(self.in_shape), self.lora.rank
    a = self.param(
      LORA_A,
      nn.with_logical_partitioning(_lecun(n_in, 1), (*self.axes[:n_in], None)),
      (*self.in_shape, r),
      self.param_dtype,
    )
    b = self.param(
      LORA_B,
      nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.axes[n_in:])),
      (r, *self.out_shape),
      self.param_dtype,
    )
    ins, outs = _LETTERS[:n_in], _LETTERS[n_in : n_in + len(self.out_shape)]
    # einsum, not lax.dot_general: quantized training (`quant.py`) fake-quantizes the
    # dot_generals with a weight, which should be the base kernel only (QLoRA keeps the
    # adapters in full precision).
    xa = jnp.einsum(f"...{ins},{ins}r->...r", x.astype(self.dtype), a.astype(self.dtype))
    xa = xa * jnp.asarray(self.lora.scale, self.dtype)
    return jnp.einsum(f"...r,r{outs}->...{outs}", xa, b.astype(self.dtype))


_LETTERS = string.ascii_lowercase.replace("r", "")  # einsum axis names; "r" is the rank.


def _lecun(n_in: int, n_out: int) -> nn.initializers.Initializer:
  """LeCun truncated normal for a kernel whose first `n_in` axes are its inputs."""
  return nn.initializers.variance_scaling(
    1.0,
    "fan_in",
    "truncated_normal",
    in_axis=tuple(range(n_in)),
    out_axis=tuple(range(n_in, n_in + n_out)),
  )


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
  use_bias: bool = False  # RecurrentGemma's MLP has biases; Llama's has none.
  lora: LoRA = LoRA()
  # Its weight matmuls (the `Dense` names), which `model.lora_targets` may name.
  DENSE: ClassVar[tuple[str, ...]] = ("gate", "up", "down")

  @nn.compact
  def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias, lora=self.lora
    )
    d, f = self.d_model, self.hidden_dim
    gate = dense(d, f, (EMBED, MLP), "gate", **kw)(x)
    up = dense(d, f, (EMBED, MLP), "up", **kw)(x)
    act = nn.silu if self.activation == "silu" else lambda g: nn.gelu(g, approximate=True)
    h = nn.with_logical_constraint(act(gate) * up, (BATCH, LENGTH, MLP))
    return dense(f, d, (MLP, EMBED), "down", **kw)(h)


def _skip_prefix(xs: Array, skip: Array, held: int) -> Array:
  """Moves each row's skipped prefix of the chunk in xs = [state (held), chunk] in front of the
  state, zeroed: [0 (skipped), state, the rest of the chunk], so the state is followed by the
  first kept input."""
  n = skip.sum(1)[:, None]  # Skipped inputs per row (a prefix).
  j = jnp.arange(xs.shape[1])[None]
  source = jnp.where(j < n + held, jnp.maximum(j - n, 0), j)
  trailing = (1,) * (xs.ndim - 2)
  moved = jnp.take_along_axis(xs, source.reshape(source.shape + trailing), axis=1)
  zero = j < n
  return jnp.where(zero.reshape(zero.shape + trailing), jnp.zeros((), xs.dtype), moved)


class CausalConv1D(nn.Module):
  """Causal depthwise convolution over time (the short conv of Mamba and Griffin's recurrent block).

  `y_t = bias + sum_{j<w} kernel[w-1-j] ⊙ x_{t-j}`: `kernel[-1]` weighs the current input, as
  in Mamba's `conv1d` (torch weight [f, 1, w]) and RecurrentGemma's `Conv1D` (w [w, f]).
  The state holds the last w - 1 inputs, so a sequence split into chunks (or single tokens)
  gives the same outputs as one pass. With `positions`, inputs from before a document start
  (position 0) are masked out, as RecurrentGemma does for packed sequences. With `skip`, the
  inputs it marks (left padding of a decoded chunk: a prefix of each row) are left out as if
  they were not there: the state moves past them untouched and the next inputs follow it.

  Attributes:
    features: channels f (one filter per channel).
    kernel_size: temporal width w.
    channel_axis: logical axis name of the channels.
    kernel_init: initialiser of the [w, f] kernel; the default is torch's Conv1d default
      U(±1/sqrt(w)) (Mamba); RecurrentGemma uses N(0, 0.01 / w).
  """

  features: int
  kernel_size: int = 4
  channel_axis: str = MLP
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform"
  )
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  history: bool = False  # Return the state after every token, [b, t, w-1, f] (speculation).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "b t f"],
    state: Float[Array, "b w-1 f"] | None = None,
    positions: Int[Array, "b t"] | None = None,
    skip: Bool[Array, "b t"] | None = None,
  ) -> tuple[Float[Array, "b t f"], Float[Array, "b w-1 f"]]:
    """Convolves x after the inputs held in `state` (zeros: sequence start).

    `skip` marks a prefix of each row to leave out (their outputs are meaningless).

    Returns:
      The outputs y [b, t, f] and the new state: the last w - 1 inputs, in this layer's dtype
      ([b, t, w-1, f], the state after each token, with `history`).
    """
    w, f = self.kernel_size, self.features
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(self.kernel_init, (None, self.channel_axis)),
      (w, f),
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(self.bias_init, (self.channel_axis,)),
      (f,),
      self.param_dtype,
    )
    b, t, _ = x.shape
    if state is None:
      state = jnp.zeros((b, w - 1, f), self.dtype)
    xs = jnp.concatenate([state.astype(self.dtype), x.astype(self.dtype)], axis=1)
    if skip is not None:
      xs = _skip_prefix(xs, skip, w - 1)
    segment = None
    if positions is not None:
      # Document index of every input; an input contributes only within its own document.
      starts = jnp.concatenate([jnp.zeros((b, w - 1), bool), positions == 0], axis=1)
      if skip is not None:
        starts = _skip_prefix(starts, skip, w - 1)
      segment = jnp.cumsum(starts, axis=1)
    y = jnp.broadcast_to(bias.astype(self.dtype), (b, t, f))
    for j in range(w):  # x_{t-j} sits at index w-1-j+t of xs.
      window = xs[:, w - 1 - j : w - 1 - j + t]
      if segment is not None:
        same = segment[:, w - 1 - j : w - 1 - j + t] == segment[:, w - 1 :]
        window = jnp.where(same[..., None], window, 0)
      y = y + window * kernel[w - 1 - j].astype(self.dtype)
    # The state after token i holds inputs i+1 .. i+w-1 of xs; without history only the last.
    ends = jnp.arange(t) if self.history else jnp.array([t - 1])
    idx = ends[:, None] + 1 + jnp.arange(w - 1)  # [n, w-1]
    new_state = xs[:, idx]  # [b, n, w-1, f]
    if segment is not None:
      # Inputs before the latest document start can never be seen again: store zeros.
      same = segment[:, idx] == segment[:, w - 1 + ends][:, :, None]
      new_state = jnp.where(same[..., None], new_state, 0)
    if not self.history:
      new_state = new_state[:, 0]
    return nn.with_logical_constraint(y, (BATCH, LENGTH, self.channel_axis)), new_state
