"""8-bit optimizer state: blockwise dynamic quantization (Dettmers et al. 2022) as an optax wrapper.

`quantize_state(inner)` stores every large floating-point leaf of `inner`'s state (Adam's `mu`
and `nu`) as one uint8 code per element plus one float32 absmax per block of `block_size`
elements. Each update dequantizes, runs `inner.update` in float32 and quantizes the new state.

Codes index a *dynamic* map (the paper's dynamic tree quantization): values ±10⁻ᵉ·f for decades
e = 0, 1, ..., with the fraction f on a linear grid in (0.1, 1] that is finer for the larger
decades, so relative precision stays roughly constant over seven orders of magnitude. Signed
leaves (`mu`) use a sign bit; leaves that are never negative (`nu`) use the unsigned map, which
spends that bit on one more decade. A value is stored as its nearest map entry.

Blocks run along the parameter's trailing axes (the fewest trailing axes whose size is a
multiple of `block_size`), so codes keep the parameter's shape and logical axis names and shard
exactly as the parameter does; the block scales keep the names of the leading axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fulcrum.platform.optim import boxes


def dynamic_map(signed: bool, bits: int = 8) -> np.ndarray:
  """The 2**bits sorted values of the dynamic tree map (float32, in [-1, 1] or [0, 1]).

  After the optional sign bit, a code's leading zeros count the decade e (value scale 10⁻ᵉ), a
  1 marks where they end, and the remaining bits pick a fraction on a linear grid over
  (0.1, 1]: decade e gets 2^(free bits - e) fractions. The all-zero code is 0. The signed map
  has one code left over, which repeats 0.
  """
  free = bits - 1 if signed else bits  # Bits after the sign.
  magnitudes = [0.0]
  for e in range(free):
    count = 2 ** (free - 1 - e)
    fractions = 0.1 + 0.9 * np.arange(1, count + 1) / count
    magnitudes.extend((10.0**-e) * fractions)
  mags = np.asarray(magnitudes)
  values = np.concatenate([-mags[1:], mags]) if signed else mags
  values = np.sort(np.concatenate([values, np.zeros(2**bits - len(values))]))
  assert len(values) == 2**bits
  return values.astype(np.float32)


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)
# The non-negative entries, ascending (signed: from the second zero on).
_MAGNITUDES = {True: SIGNED_MAP[128:], False: UNSIGNED_MAP}


@struct.dataclass
class QuantizedArray:
  """A float array stored as uint8 codes into a dynamic map and float32 block absmaxes.

  codes: uint8, the original shape; scales: float32, `shape[:-block_axes] + (num_blocks,)`.
  """

  codes: jax.Array
  scales: jax.Array
  signed: bool = struct.field(pytree_node=False)
  block_axes: int = struct.field(pytree_node=False)  # Trailing axes the blocks run along.
  block_size: int = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return self.codes.size * self.codes.dtype.itemsize + self.scales.size * 4


def block_axes_for(shape: tuple[int, ...], block_size: int) -> int | None:
  """The fewest trailing axes whose size is a multiple of `block_size`; None if there are none."""
  for k in range(1, len(shape) + 1):
    if math.prod(shape[-k:]) % block_size == 0:
      return k
  return None


def _blocks(x: jax.Array, block_axes: int, block_size: int) -> jax.Array:
  return x.reshape(x.shape[: x.ndim - block_axes] + (-1, block_size))


def quantize(
  x: jax.Array, signed: bool, block_size: int = 256, block_axes: int | None = None
) -> QuantizedArray:
  """Blockwise dynamic 8-bit quantization: each element → its nearest map entry × block absmax."""
  k = block_axes or block_axes_for(tuple(x.shape), block_size)
  if k is None:
    raise ValueError(f"no trailing axes of {x.shape} hold a multiple of {block_size} elements")
  blocks = _blocks(x.astype(jnp.float32), k, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  codes = _encode(normed, signed)
  return QuantizedArray(codes.reshape(x.shape), absmax, signed, k, block_size, x.dtype)


def _encode(v: jax.Array, signed: bool) -> jax.Array:
  """Index of the map entry nearest to each v in [-1, 1], elementwise (so XLA fuses it with the
  optimizer update instead of running a binary search per element).

  The positive magnitudes sorted ascending are 0, then decade e = D-1, ..., 0 with n_e = 2^(D-1-e)
  entries 10⁻ᵉ(0.1 + 0.9 j / n_e), j = 1..n_e (D decades). Entry j = 0 of decade e would be
  10⁻ᵉ·0.1, which is the top entry of decade e + 1, so the grid is continuous and magnitude
  (e, j) sits at index n_e + j - 1 (0 for the smallest decade's j = 0: the zero entry). Rounding
  j within a's decade gives the nearest entry up to float error at the midpoints and the
  0-vs-smallest boundary; comparing with the two neighbouring entries settles those exactly.
  """
  decades = 7 if signed else 8
  mags = jnp.asarray(_MAGNITUDES[signed])  # [2**decades] (signed: the 128 non-negative ones)
  a = jnp.abs(v)
  e = jnp.clip(jnp.floor(-jnp.log10(jnp.maximum(a, 1e-30))), 0, decades - 1)
  n = jnp.exp2(decades - 1 - e)
  j = jnp.clip(jnp.round((a * jnp.power(10.0, e) - 0.1) / 0.9 * n), 0, n)
  idx = (n + j - 1).astype(jnp.int32)
  last = mags.shape[0] - 1
  best = idx
  best_err = jnp.abs(a - mags[idx])
  for step in (-1, 1):
    other = jnp.clip(idx + step, 0, last)
    err = jnp.abs(a - mags[other])
    better = err < best_err
    best, best_err = jnp.where(better, other, best), jnp.where(better, err, best_err)
  if not signed:
    return best.astype(jnp.uint8)
  # Signed map: 127 negatives, two zeros, 127 positives (see `dynamic_map`).
  half = mags.shape[0]
  return jnp.where(v < 0, half - 1 - best, half + best).astype(jnp.uint8)


def dequantize(q: QuantizedArray) -> jax.Array:
  table = jnp.asarray(SIGNED_MAP if q.signed else UNSIGNED_MAP)
  values = _blocks(table[q.codes.astype(jnp.int32)], q.block_axes, q.block_size)
  return (values * q.scales[..., None]).reshape(q.codes.shape).astype(q.dtype)


def is_unsigned_moment(path: tuple[Any, ...]) -> bool:
  """Default rule for which state leaves are never negative: Adam-style second moments `nu`."""
  return any(getattr(k, "name", getattr(k, "key", None)) == "nu" for k in path)


class QuantizedState(NamedTuple):
  inner: Any  # The wrapped transform's state, large float leaves as `QuantizedArray`s.


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def quantize_state(
  inner: optax.GradientTransformation,
  block_size: int = 256,
  min_size: int = 4096,
  unsigned: Callable[[tuple[Any, ...]], bool] = is_unsigned_moment,
) -> optax.GradientTransformation:
  """Wraps `inner` so its floating-point state lives in 8 bits between steps.

  Args:
    inner: any gradient transformation (e.g. `optax.scale_by_adam()`).
    block_size: elements per absmax block (the paper uses 2048; smaller blocks bound outliers'
      reach more tightly at 4/block_size bytes per element of overhead).
    min_size: leaves with fewer elements stay in float32 (norm scales, biases), as in the paper.
    unsigned: which state leaves (by tree path) are never negative and use the unsigned map.
  """
  if block_size < 2:
    raise ValueError(f"block_size must be >= 2, got {block_size}")

  def compress(path, value, names, like):
    if not jnp.issubdtype(value.dtype, jnp.floating) or value.size < min_size:
      return like
    k = block_axes_for(tuple(value.shape), block_size)
    if k is None:
      return like
    # The barrier keeps XLA from constant-folding the encoder over init's (constant) zeros, which
    # its CPU compiler does element by element: minutes for a 10M-parameter model.
    q = quantize(jax.lax.optimization_barrier(value), not unsigned(path), block_size, k)
    if names is None:
      return q
    return q.replace(
      codes=boxes.box(q.codes, names, like),
      scales=boxes.box(q.scales, tuple(names[: value.ndim - k]) + (None,), like),
    )

  def init(params):
    state = inner.init(params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=boxes.is_box)
    out = []
    for path, leaf in leaves:
      value = leaf.value if boxes.is_box(leaf) else leaf
      names = tuple(leaf.names) if boxes.is_box(leaf) else None
      out.append(compress(path, value, names, leaf))
    return QuantizedState(jax.tree.unflatten(treedef, out))

  def update(updates, state, params=None):
    full = jax.tree.map(
      lambda x: dequantize(x).astype(jnp.float32) if _is_quantized(x) else x,
      state.inner,
      is_leaf=_is_quantized,
    )
    updates, new = inner.update(updates, full, params)
    requantized = jax.tree.map(
      lambda old, x: (
        quantize(x, old.signed, old.block_size, old.block_axes) if _is_quantized(old) else x
      ),
      state.inner,
      new,
      is_leaf=_is_quantized,
    )
    return updates, QuantizedState(requantized)

  return optax.GradientTransformation(init, update)


def adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  decay_mask: Any | Callable[[Any], Any] | None = None,
  block_size: int = 256,
  min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  """AdamW whose moments are stored blockwise-quantized to 8 bits."""
  return optax.chain(
    quantize_state(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), block_size, min_8bit_size),
    optax.add_decayed_weights(weight_decay, decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def state_bytes(state: Any) -> int:
  """Bytes an optimizer state occupies (every array leaf, codes and block scales included)."""
  leaves = jax.tree.leaves(state, is_leaf=boxes.is_box)
  values = [leaf.value if boxes.is_box(leaf) else leaf for leaf in leaves]
  return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(values)))
