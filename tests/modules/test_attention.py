"""Attention against the plain einsum reference, masks, and the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.modules.attention import (
  Attention,
  AttentionImpl,
  KVCache,
  attention_mask,
  reference_attention,
)

# Small models and many short programs: XLA's optimisation passes would dominate the runtime.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def naive_attention(q, k, v, window):
  """Loop-over-queries attention in numpy: the oracle for the oracle."""
  b, t, h, e = q.shape
  rep = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for ti in range(t):
        lo = max(0, ti - window + 1) if window else 0
        s = np.array([q[bi, ti, hi] @ k[bi, si, hi // rep] for si in range(lo, ti + 1)])
        p = np.exp(s / np.sqrt(e) - (s / np.sqrt(e)).max())
        p /= p.sum()
        out[bi, ti, hi] = sum(p[j] * v[bi, lo + j, hi // rep] for j in range(len(p)))
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 3])
def test_reference_matches_naive_loop(heads, kv_heads, window):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 7, heads, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  got = reference_attention(q, k, v, attention_mask(pos, pos, window))
  np.testing.assert_allclose(got, naive_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def _module(impl, window=0, kv_heads=2, dtype=jnp.float32):
  return Attention(
    d_model=32,
    num_heads=4,
    num_kv_heads=kv_heads,
    head_dim=8,
    window=window,
    impl=impl,
    dtype=dtype,
  )


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_dot_product_attention_matches_reference(kv_heads, window, explicit_positions):
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16)) if explicit_positions else None
  ref = _module(AttentionImpl.REFERENCE, window, kv_heads)
  params = ref.init(jax.random.key(1), x)
  want, _ = jax.jit(ref.apply)(params, x, pos)
  for impl in (AttentionImpl.AUTO, AttentionImpl.XLA):
    got, _ = jax.jit(_module(impl, window, kv_heads).apply)(params, x, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causality():
  """Changing a later token leaves earlier outputs unchanged."""
  x = jax.random.normal(jax.random.key(0), (1, 10, 32))
  m = _module(AttentionImpl.AUTO)
  params = m.init(jax.random.key(1), x)
  y1, _ = m.apply(params, x)
  y2, _ = m.apply(params, x.at[:, 6].add(3.0))
  np.testing.assert_array_equal(y1[:, :6], y2[:, :6])
  assert not np.allclose(y1[:, 6:], y2[:, 6:])


def test_left_padding_is_ignored():
  """Position -1 marks padding: a padded row equals the unpadded sequence."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 32))
  m = _module(AttentionImpl.AUTO)
  params = m.init(jax.random.key(1), x)
  want, _ = jax.jit(m.apply)(params, x)
  padded = jnp.concatenate([jnp.zeros((1, 3, 32)), x], axis=1)
  pos = jnp.array([[-1, -1, -1, 0, 1, 2, 3, 4, 5]])
  got, _ = jax.jit(m.apply)(params, padded, pos, KVCache.init(1, 9, 2, 8))
  np.testing.assert_allclose(got[:, 3:], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,cache_size", [(0, 20), (4, 4)])
@pytest.mark.parametrize("chunks", [(1,) * 12, (5, 7), (3, 6, 3)])
def test_cache_reproduces_full_pass(window, cache_size, chunks):
  """Decoding in chunks through the cache (a ring buffer when windowed) equals one pass."""
  x = jax.random.normal(jax.random.key(0), (2, 12, 32))
  m = _module(AttentionImpl.AUTO, window)
  params = m.init(jax.random.key(1), x)
  apply = jax.jit(m.apply)
  want, _ = apply(params, x)
  cache, outs, start = KVCache.init(2, cache_size, 2, 8), [], 0
  for n in chunks:
    pos = jnp.broadcast_to(jnp.arange(start, start + n), (2, n))
    y, cache = apply(params, x[:, start : start + n], pos, cache)
    outs.append(y)
    start += n
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
  assert int(cache.positions.max()) == 11


def test_bfloat16_close_to_float32():
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  m32 = _module(AttentionImpl.AUTO)
  params = m32.init(jax.random.key(1), x)
  want, _ = m32.apply(params, x)
  got, _ = _module(AttentionImpl.AUTO, dtype=jnp.bfloat16).apply(params, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("t,window", [(20, 4), (23, 5), (9, 4), (64, 16)])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_blocked_local_attention_matches_reference(t, window, kv_heads):
  """The O(t·window) path (used when t > 2·window) equals masked full attention."""
  x = jax.random.normal(jax.random.key(0), (2, t, 32))
  ref = _module(AttentionImpl.REFERENCE, window, kv_heads)
  params = ref.init(jax.random.key(1), x)
  want, _ = jax.jit(ref.apply)(params, x)
  got, _ = jax.jit(_module(AttentionImpl.AUTO, window, kv_heads).apply)(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
