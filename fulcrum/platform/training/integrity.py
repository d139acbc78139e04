"""What makes a checkpoint trustworthy: fingerprints of its arrays and the layout it must fit.

`summarize(state)` computes, on device, a 32-bit fingerprint of every array leaf and whether
every floating leaf is finite. The fingerprint is `sum_i bits(x_i) * w_i (mod 2^32)` over the
raw bit patterns with odd weights `w_i`, so any single flipped bit changes it (the difference
is an odd multiple of a power of two below 2^32), and it is independent of how the array is
sharded (integer addition mod 2^32 is associative). The checkpointer stores the fingerprints
next to the state and compares them after every restore.

`layout(tree)` / `layout_differences(saved, wanted)` compare the shapes and dtypes a checkpoint
holds with the ones a config builds, so that a checkpoint that does not fit the config is a
refusal, not "corrupt".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(0x9E3779B1)  # Any odd constant spreads the weights; this is 2^32 / phi.


def path_name(path: tuple) -> str:
  """A key path as `a/b/0/c`, the same for a pytree and for orbax's metadata of it."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _bits(x: jax.Array) -> jax.Array:
  """The raw bit patterns of `x`, flattened, as uint32."""
  x = jnp.ravel(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jnp.ravel(jax.random.key_data(x))
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize
  if width == 8:  # Two 32-bit words per element.
    return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  return jax.lax.bitcast_convert_type(x, _UINT[width]).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * _GOLDEN | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


def _replicated(tree: Any):
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec())
  return None


def summarize(tree: Any) -> tuple[dict[str, int], bool]:
  """`({path: fingerprint}, every floating leaf finite)` of a pytree of arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [leaf for _, leaf in leaves]

  def compute(xs):
    prints = [_fingerprint(x) for x in xs]
    finite = jnp.all(jnp.stack([_finite(x) for x in xs])) if xs else jnp.bool_(True)
    return prints, finite

  prints, finite = jax.device_get(jax.jit(compute, out_shardings=_replicated(tree))(arrays))
  names = [path_name(path) for path, _ in leaves]
  return {n: int(p) for n, p in zip(names, prints, strict=True)}, bool(finite)


def changed_fingerprints(saved: dict[str, int], now: dict[str, int]) -> list[str]:
  """The leaves whose fingerprints differ (or that only one side has)."""
  return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


def digest(value: Any) -> str:
  """sha256 of a JSON value in canonical form (sorted keys)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{path: (shape, dtype)}` of a pytree of arrays, ShapeDtypeStructs or orbax metadata."""
  return {
    path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def layout_differences(saved: dict, wanted: dict, limit: int = 2) -> list[str]:
  """Human-readable differences between a checkpoint's layout and the config's (first few)."""
  out = []
  names = sorted(saved.keys() | wanted.keys(), key=lambda n: (not n.startswith("params/"), n))
  for name in names:
    if name not in wanted:
      out.append(f"{name} is in the checkpoint but not in this model")
    elif name not in saved:
      out.append(f"{name} is not in the checkpoint")
    elif saved[name] != wanted[name]:
      (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
      saved_, wanted_ = (s_shape, w_shape) if s_shape != w_shape else (s_dtype, w_dtype)
      out.append(f"{name}: {saved_} in the checkpoint, {wanted_} in this config")
  if len(out) > limit:
    out = [*out[:limit], f"and {len(out) - limit} more"]
  return out
