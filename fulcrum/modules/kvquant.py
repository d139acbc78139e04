"""KV-cache quantization of KVQuant (Hooper et al. 2024, "KVQuant: Towards 10 Million Context
Length LLM Inference with KV Cache Quantization", arXiv:2401.18079): the storage format, as pure
functions (codebooks and thresholds are fit by `kv_codebooks`). Attention decides where to call
them.

A *vector* is one token's keys (or values) across all kv heads: x of shape [k, e], flattened to
D = k·e entries. Each vector is stored as

  codes          D level indices of `bits` bits each, bit-packed into D·bits/8 bytes;
  center, scale  the per-token normalisation (values; keys in "token" mode), in `scale_dtype`;
  outliers       up to C = `spec.outliers` entries kept exactly (flat index + value; the index
                 is uint8 when D < 256, else int16).

Quantization (Section 3 of the paper; sections named, as their numbers differ between versions):
  * Keys per channel ("Per-Channel Key Quantization", "Pre-RoPE Key Quantization"):
    z = (x - key_center) / key_scale with per-channel thresholds calibrated offline. Up to C
    entries with |z| > 1 (the largest) are outliers; the rest are clipped to [-1, 1].
  * Values per token (and keys when `key_mode == "token"`): the C entries farthest from the
    vector's mean are outliers; the remaining entries' min/max give center = (max + min) / 2 and
    scale = (max - min) / 2, computed online ("Offline Calibration versus Online Computation").
    Both are rounded to `scale_dtype` first and the vector is normalised with the rounded
    numbers, so dequantization sees exactly what quantization used.
  * Each normalised entry becomes the index of the nearest level of a per-layer codebook of
    2^bits sorted levels in [-1, 1] ("nuqX"), fit offline by k-means weighted with Fisher
    information (squared gradients). The integer baselines use `linspace(-1, 1, 2^bits)`.
  * Dense-and-sparse ("Per-Vector Dense-and-Sparse Quantization"): the outliers are stored
    exactly in `outlier_dtype` and overwrite the dequantized dense entries.

Unused outlier slots (per-channel keys whose vector has fewer than C entries outside the
thresholds) carry the index D, one past the last entry; `dequantize` drops them on scatter.
`empty` marks every slot this way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int, UInt8

BITS = (1, 2, 3, 4, 8)
KINDS = ("key", "value")
KEY_MODES = ("channel", "token")


def index_dtype(size: int) -> jnp.dtype:
  """The smallest integer type holding outlier indices 0..D (D itself marks an unused slot)."""
  return jnp.dtype(jnp.uint8) if size < 256 else jnp.dtype(jnp.int16)


@struct.dataclass
class KVQuantSpec:
  """One layer's KVQuant configuration and offline calibration (Hooper et al. 2024).

  Leaves may carry extra leading axes when several layers' specs are stacked (e.g.
  `key_codebook` [layers, L]); `quantize` / `dequantize` / `empty` take one layer's spec.

  Attributes:
    key_codebook: [L] sorted float32 levels in [-1, 1] for keys, L = 2**bits.
    value_codebook: [L] sorted float32 levels in [-1, 1] for values.
    key_center: [k, e] per-channel (upper + lower) / 2 of the keys (read in "channel" mode).
    key_scale: [k, e] per-channel (upper - lower) / 2 of the keys, > 0 ("channel" mode).
    key_mode: "channel" (per-channel keys, offline thresholds) or "token" (per-token keys).
    outliers: sparse capacity C per vector, for keys and values each (0: dense only).
    outlier_dtype: storage dtype of the outlier values.
    scale_dtype: storage dtype of the per-token center / scale.
    pre_rope: quantize keys before RoPE (read only by the attention layer).
  """

  key_codebook: Float[Array, "*layers L"]
  value_codebook: Float[Array, "*layers L"]
  key_center: Float[Array, "*layers k e"]
  key_scale: Float[Array, "*layers k e"]
  key_mode: str = struct.field(pytree_node=False, default="channel")
  outliers: int = struct.field(pytree_node=False, default=0)
  outlier_dtype: str = struct.field(pytree_node=False, default="float16")
  scale_dtype: str = struct.field(pytree_node=False, default="float16")
  pre_rope: bool = struct.field(pytree_node=False, default=True)

  @property
  def bits(self) -> int:
    """log2 of the codebook length (static: read from the leaf shape).

    Raises:
      ValueError: the codebook length is not 2**bits for bits in {1, 2, 3, 4, 8}.
    """
    return _bits_of(self.key_codebook.shape[-1])


@struct.dataclass
class QuantizedVectors:
  """One quantized [b, t, k, e] tensor; every leaf has leading axes [b, t].

  Attributes:
    codes: uint8 [b, t, D·bits/8], the bit-packed level indices (`pack_codes`).
    center: [b, t, 1] per-token center in scale_dtype; [b, t, 0] for per-channel keys.
    scale: [b, t, 1] per-token half-range in scale_dtype; [b, t, 0] for per-channel keys.
    outlier_index: [b, t, C] uint8 (D < 256) or int16, flat index into the D entries; D marks
      an unused slot.
    outlier_value: [b, t, C] the exact outlier values, in outlier_dtype.
  """

  codes: UInt8[Array, "b t n"]
  center: Array
  scale: Array
  outlier_index: Int[Array, "b t c"]
  outlier_value: Array


def _bits_of(length: int) -> int:
  bits = int(length).bit_length() - 1
  if bits not in BITS or 2**bits != length:
    raise ValueError(
      f"codebook of {length} levels; KVQuant needs 2**bits levels with bits in {BITS}"
    )
  return bits


def check_bits(bits: int) -> None:
  """Raises ValueError unless `bits` is one of `BITS`."""
  if bits not in BITS:
    raise ValueError(f"bits={bits} is not supported; choose bits in {BITS}")


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; use 'key' or 'value'")


def check_key_mode(key_mode: str) -> None:
  """Raises ValueError unless `key_mode` is one of `KEY_MODES`."""
  if key_mode not in KEY_MODES:
    raise ValueError(f"key_mode={key_mode!r}; use 'channel' or 'token'")


def check_fraction(outlier_fraction: float) -> None:
  """Raises ValueError unless the outlier fraction is in [0, 0.5)."""
  if not 0 <= outlier_fraction < 0.5:
    raise ValueError(
      f"outlier_fraction={outlier_fraction}; use a fraction in [0, 0.5) (0.01 keeps 1% of "
      "each vector as sparse outliers)"
    )


def num_outliers(outlier_fraction: float, size: int) -> int:
  """ceil(outlier_fraction · size), robust to float noise (0.01 · 300 = 3.0000000000000004)."""
  return math.ceil(round(outlier_fraction * size, 9)) if outlier_fraction > 0 else 0


def _per_channel(spec: KVQuantSpec, kind: str) -> bool:
  _check_kind(kind)
  check_key_mode(spec.key_mode)
  return kind == "key" and spec.key_mode == "channel"


def _codebook(spec: KVQuantSpec, kind: str) -> Float[Array, " L"]:
  book = spec.key_codebook if kind == "key" else spec.value_codebook
  if book.ndim != 1:
    raise ValueError(f"{kind} codebook has shape {book.shape}; pass one layer's (unstacked) spec")
  return jnp.asarray(book, jnp.float32)


def check_layout(spec: KVQuantSpec, size: int, per_channel: bool) -> int:
  """Validates a layer spec against D = `size` entries per vector; returns bits."""
  bits = spec.bits
  if spec.value_codebook.shape[-1] != spec.key_codebook.shape[-1]:
    raise ValueError(
      f"key codebook has {spec.key_codebook.shape[-1]} levels and value codebook "
      f"{spec.value_codebook.shape[-1]}; give both 2**bits levels for the same bits"
    )
  if size * bits % 8:
    raise ValueError(
      f"D={size} entries at {bits} bits is not a whole number of bytes; pick num_kv_heads · "
      "head_dim a multiple of 8"
    )
  if size > np.iinfo(np.int16).max:
    raise ValueError(f"D={size} entries per vector do not fit the int16 outlier index (< 32768)")
  limit = size if per_channel else size - 1
  if not 0 <= spec.outliers <= limit:
    raise ValueError(
      f"outliers={spec.outliers} of D={size} entries; use 0 <= outliers <= {limit} (a "
      "per-token vector needs at least one dense entry)"
    )
  return bits


def pack_codes(codes: UInt8[Array, "... D"], bits: int) -> UInt8[Array, "... P"]:
  """Bit-packs level indices: code i occupies bits [i·bits, (i+1)·bits) of a little-endian
  bit stream, so 8 codes fill `bits` bytes (for 3 bits: 8 codes = 24 bits = 3 bytes).

  Args:
    codes: uint8 level indices in [0, 2**bits).
    bits: 1, 2, 3, 4 or 8.

  Returns:
    uint8 [..., D·bits/8].

  Raises:
    ValueError: bits is unsupported or D·bits is not a multiple of 8.
  """
  check_bits(bits)
  size = codes.shape[-1]
  if size * bits % 8:
    raise ValueError(
      f"cannot pack {size} codes of {bits} bits into whole bytes; D·bits must be a multiple "
      "of 8 (pad D to a multiple of 8)"
    )
  codes = jnp.asarray(codes, jnp.uint8)
  if bits == 8:
    return codes
  lead = codes.shape[:-1]
  shifts = jnp.arange(bits, dtype=jnp.uint8)
  stream = (codes[..., None] >> shifts) & jnp.uint8(1)  # [..., D, bits]
  stream = stream.reshape(*lead, size * bits // 8, 8)
  return jnp.sum(stream << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def unpack_codes(packed: UInt8[Array, "... P"], bits: int, size: int) -> UInt8[Array, "... D"]:
  """Inverse of `pack_codes`: the `size` level indices of a packed uint8 [..., size·bits/8].

  Raises:
    ValueError: bits is unsupported, size·bits is not a multiple of 8, or the byte count is not
      size·bits/8.
  """
  check_bits(bits)
  if size * bits % 8:
    raise ValueError(
      f"{size} codes of {bits} bits are not whole bytes; D·bits must be a multiple of 8"
    )
  if packed.shape[-1] != size * bits // 8:
    raise ValueError(
      f"packed codes have {packed.shape[-1]} bytes; {size} codes of {bits} bits need "
      f"{size * bits // 8}"
    )
  packed = jnp.asarray(packed, jnp.uint8)
  if bits == 8:
    return packed
  lead = packed.shape[:-1]
  stream = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
  stream = stream.reshape(*lead, size, bits)
  return jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _scatter_last(base: Array, index: Array, values: Array) -> Array:
  """base[..., index[..., j]] = values[..., j] per leading position; out-of-range indices drop."""
  lead, size = base.shape[:-1], base.shape[-1]
  flat = base.reshape(-1, size)
  rows = jnp.arange(flat.shape[0])[:, None]
  flat = flat.at[rows, index.reshape(flat.shape[0], -1)].set(
    values.reshape(flat.shape[0], -1).astype(flat.dtype), mode="drop"
  )
  return flat.reshape(*lead, size)


def _round_stats(center: Array, scale: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
  """center and scale rounded to the storage dtype (scale kept in [tiny, max] of it)."""
  info = jnp.finfo(dtype)
  center = jnp.clip(center, -float(info.max), float(info.max)).astype(dtype)
  scale = jnp.clip(scale, float(info.tiny), float(info.max)).astype(dtype)
  return center, scale


def normalise(
  flat: Float[Array, "... D"], spec: KVQuantSpec, per_channel: bool
) -> tuple[Array, Array, Array, Array, Array]:
  """The shared quantization rule, before coding.

  Returns:
    z: [..., D] float32 normalised entries, clipped to [-1, 1].
    center, scale: [..., 1] per-token statistics in scale_dtype ([..., 0] when per-channel).
    index: [..., C] int32 outlier positions (D where a slot is unused).
    used: [..., C] bool, which slots hold an outlier.
  """
  lead, size = flat.shape[:-1], flat.shape[-1]
  capacity = spec.outliers
  if per_channel:
    center = jnp.asarray(spec.key_center, jnp.float32).reshape(size)
    scale = jnp.asarray(spec.key_scale, jnp.float32).reshape(size)
    z = (flat - center) / scale
    if capacity:
      magnitude = jnp.abs(z)
      top, index = jax.lax.top_k(jnp.where(magnitude > 1, magnitude, -1.0), capacity)
      used = top > 1
      index = jnp.where(used, index, size)
    else:
      index = jnp.zeros((*lead, 0), jnp.int32)
      used = jnp.zeros((*lead, 0), bool)
    sdt = jnp.dtype(spec.scale_dtype)
    stored = (jnp.zeros((*lead, 0), sdt), jnp.zeros((*lead, 0), sdt))
  else:
    if capacity:
      deviation = jnp.abs(flat - jnp.mean(flat, axis=-1, keepdims=True))
      _, index = jax.lax.top_k(deviation, capacity)
      mask = _scatter_last(jnp.zeros(flat.shape, bool), index, jnp.ones(index.shape, bool))
      lower = jnp.min(jnp.where(mask, jnp.inf, flat), axis=-1, keepdims=True)
      upper = jnp.max(jnp.where(mask, -jnp.inf, flat), axis=-1, keepdims=True)
    else:
      index = jnp.zeros((*lead, 0), jnp.int32)
      lower = jnp.min(flat, axis=-1, keepdims=True)
      upper = jnp.max(flat, axis=-1, keepdims=True)
    used = jnp.ones(index.shape, bool)
    stored = _round_stats((upper + lower) / 2, (upper - lower) / 2, jnp.dtype(spec.scale_dtype))
    center, scale = (s.astype(jnp.float32) for s in stored)
    z = (flat - center) / scale
  return jnp.clip(z, -1.0, 1.0), stored[0], stored[1], index, used


def _nearest(z: Float[Array, "... D"], book: Float[Array, " L"]) -> UInt8[Array, "... D"]:
  """Index of the nearest level of the sorted codebook: the number of midpoints below z."""
  mids = (book[1:] + book[:-1]) / 2
  return jnp.sum(z[..., None] > mids, axis=-1, dtype=jnp.int32).astype(jnp.uint8)


def quantize(x: Float[Array, "b t k e"], spec: KVQuantSpec, kind: str) -> QuantizedVectors:
  """Quantizes keys or values to KVQuant's dense-and-sparse nuqX format (Hooper et al. 2024).

  Args:
    x: [b, t, k, e] keys or values (any float dtype; computed in float32).
    spec: one layer's spec (unstacked).
    kind: "key" (per-channel when spec.key_mode == "channel") or "value" (per-token).

  Returns:
    The stored form; `dequantize` inverts it up to the codebook resolution, outliers exactly.
  """
  per_channel = _per_channel(spec, kind)
  lead, size = x.shape[:-2], x.shape[-2] * x.shape[-1]
  bits = check_layout(spec, size, per_channel)
  flat = jnp.asarray(x, jnp.float32).reshape(*lead, size)
  z, center, scale, index, used = normalise(flat, spec, per_channel)
  codes = _nearest(z, _codebook(spec, kind))
  values = jnp.take_along_axis(flat, jnp.minimum(index, size - 1), axis=-1)
  values = jnp.where(used, values, 0.0)
  return QuantizedVectors(
    codes=pack_codes(codes, bits),
    center=center,
    scale=scale,
    outlier_index=index.astype(index_dtype(size)),
    outlier_value=values.astype(jnp.dtype(spec.outlier_dtype)),
  )


def dequantize(
  q: QuantizedVectors, spec: KVQuantSpec, kind: str, shape: tuple[int, int]
) -> Float[Array, "b t k e"]:
  """level[code] · scale + center, then the outliers overwritten with their stored values.

  Args:
    q: from `quantize` (or `empty`), any leading axes.
    spec: the layer spec it was quantized with.
    kind: "key" or "value", as given to `quantize`.
    shape: (k, e), the kv heads and head dim of one token.

  Returns:
    float32 [..., k, e].
  """
  per_channel = _per_channel(spec, kind)
  size = shape[0] * shape[1]
  bits = check_layout(spec, size, per_channel)
  lead = q.codes.shape[:-1]
  codes = unpack_codes(q.codes, bits, size)
  levels = _codebook(spec, kind)[codes]
  if per_channel:
    scale = jnp.asarray(spec.key_scale, jnp.float32).reshape(size)
    center = jnp.asarray(spec.key_center, jnp.float32).reshape(size)
  else:
    scale, center = q.scale.astype(jnp.float32), q.center.astype(jnp.float32)
  out = levels * scale + center
  if q.outlier_index.shape[-1]:
    index = q.outlier_index.astype(jnp.int32)
    out = _scatter_last(out, index, q.outlier_value.astype(jnp.float32))
  return out.reshape(*lead, *shape)


def empty(
  batch: int, size: int, num_kv_heads: int, head_dim: int, spec: KVQuantSpec, kind: str
) -> QuantizedVectors:
  """Zeros with leading axes [batch, size], for the cache to allocate; every outlier slot is
  marked unused (index D)."""
  per_channel = _per_channel(spec, kind)
  entries = num_kv_heads * head_dim
  bits = check_layout(spec, entries, per_channel)
  stats = 0 if per_channel else 1
  sdt = jnp.dtype(spec.scale_dtype)
  return QuantizedVectors(
    codes=jnp.zeros((batch, size, entries * bits // 8), jnp.uint8),
    center=jnp.zeros((batch, size, stats), sdt),
    scale=jnp.zeros((batch, size, stats), sdt),
    outlier_index=jnp.full((batch, size, spec.outliers), entries, index_dtype(entries)),
    outlier_value=jnp.zeros((batch, size, spec.outliers), jnp.dtype(spec.outlier_dtype)),
  )


def bytes_per_token(spec: KVQuantSpec, num_kv_heads: int, head_dim: int) -> int:
  """Bytes one token stores in one layer (keys + values), counted from the leaves of `empty`."""
  total = 0
  for kind in KINDS:
    for leaf in jax.tree.leaves(empty(1, 1, num_kv_heads, head_dim, spec, kind)):
      total += leaf.size * leaf.dtype.itemsize
  return int(total)
