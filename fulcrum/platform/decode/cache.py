"""Cache surgery for multi-token decoding: copy rows, keep an accepted prefix, roll back; and the
quantized KV cache a model decodes with when given KV-cache specs.

A model's cache is a pytree of per-layer caches: `KVCache` / `QuantizedKVCache` (attention,
rolled back by forgetting positions) and `MambaCache` / `RecurrentCache` (recurrent state,
rolled back by picking the state after the last accepted token: a decode with
`ModelConfig.cache_history` returns the state after every token of its chunk). Layer stacks
scanned with `nn.scan` add leading axes; every function here finds the batch axis from the
trailing per-field feature dims, so stacked and unstacked caches are handled alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from fulcrum.modules.attention import KVCache, QuantizedKVCache
from fulcrum.modules.griffin import RecurrentCache
from fulcrum.modules.mamba import MambaCache

ATTENTION = (KVCache, QuantizedKVCache)
RECURRENT = (MambaCache, RecurrentCache)


def is_layer_cache(x: Any) -> bool:
  """Whether `x` is one layer's cache (the `is_leaf` of a walk over a model's cache)."""
  return isinstance(x, ATTENTION + RECURRENT)


def _map_layers(fn, cache: Any) -> Any:
  return jax.tree.map(fn, cache, is_leaf=is_layer_cache)


def _map_fields(node: Any, fn) -> Any:
  """fn(leaf, batch_axis) over a layer cache's batched arrays."""
  if isinstance(node, QuantizedKVCache):
    return node.map_batched(fn)
  leaves = [fn(leaf, leaf.ndim - nd - 1) for leaf, nd in zip(node, node.FEATURE_NDIM, strict=True)]
  return type(node)(*leaves)


def take_rows(cache: Any, rows: Int[Array, " r"]) -> Any:
  """The cache of batch rows `rows` (repeats allowed): [.., b, ..] → [.., r, ..]."""
  take = lambda a, axis: jnp.take(a, rows, axis=axis)
  return _map_layers(lambda node: _map_fields(node, take), cache)


def _pick(leaf: Array, index: Int[Array, " b"], axis: int, batch_axis: int) -> Array:
  """leaf[..., b, ..., index[b] along `axis`, ...] with `axis` dropped."""
  shape = [1] * leaf.ndim
  shape[batch_axis] = index.shape[0]
  return jnp.take_along_axis(leaf, index.reshape(shape), axis=axis).squeeze(axis)


def commit(history: Any, index: Int[Array, " b"], lengths: Int[Array, " b"]) -> Any:
  """Keeps, per row, the tokens of a verified chunk up to chunk index `index[b]`.

  Args:
    history: the cache returned by a `cache_history` decode of a chunk: recurrent fields carry
      a chunk axis after the batch axis.
    index: per row, the chunk index of the last accepted token.
    lengths: per row, the sequence length after acceptance (attention forgets positions >= it).
  """

  def keep(node):
    if isinstance(node, ATTENTION):
      return node.truncate(lengths)
    # Fields [.., b, t, *features]: the chunk axis is the batch axis + 1.
    return _map_fields(node, lambda a, ax: _pick(a, index, ax, ax - 1))

  return _map_layers(keep, history)


def recurrent_part(cache: Any) -> Any:
  """Only the recurrent layers' states (attention layers → None): what a step loop stacks to
  roll back without copying KV caches."""
  return _map_layers(lambda node: node if isinstance(node, RECURRENT) else None, cache)


def restore(cache: Any, stacked: Any, index: Int[Array, " b"], lengths: Int[Array, " b"]) -> Any:
  """Rolls a cache advanced one token per step back to `lengths`.

  Args:
    cache: the cache after the last step.
    stacked: `recurrent_part` after each step, stacked on a leading step axis.
    index: per row, the step whose state to keep.
    lengths: per row, the sequence length to keep (attention forgets positions >= it).
  """
  flat_stacked = iter(jax.tree.leaves(stacked, is_leaf=lambda x: x is None or is_layer_cache(x)))

  def keep(node):
    saved = next(flat_stacked)
    if isinstance(node, ATTENTION):
      return node.truncate(lengths)
    return _map_fields(saved, lambda a, ax: _pick(a, index, 0, ax))

  return _map_layers(keep, cache)


def quantized_cache(cache: Any, specs: Any) -> Any:
  """`cache` with every attention layer's `KVCache` replaced by an empty `QuantizedKVCache`.

  Args:
    cache: a model's empty cache (`init_cache`).
    specs: KV-cache specs shaped like it (`kv_calibration.calibrate` or `load`): a
      `KVQuantSpec` at each attention layer (stacked with `scan_layers`), None elsewhere.
  """

  def convert(node, spec):
    if not isinstance(node, KVCache):
      return node
    b, s, k, e = node.k.shape[-4:]
    init = lambda sp: QuantizedKVCache.init(b, s, k, e, sp)
    for _ in range(node.k.ndim - 4):  # Stacked layers: one cache per stacked spec.
      init = jax.vmap(init)
    return init(spec)

  return jax.tree.map(convert, cache, specs, is_leaf=is_layer_cache)
