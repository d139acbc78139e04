"""Layers against plain numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.modules.layers import Dense, GatedMLP, RMSNorm, rope


def test_rmsnorm_matches_formula():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  for offset in (0.0, 1.0):
    m = RMSNorm(eps=1e-6, scale_offset=offset)
    params = m.init(jax.random.key(0), x)
    scale = np.asarray(jax.tree.leaves(params)[0]) + offset
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(m.apply(params, x), want, rtol=1e-5, atol=1e-6)


def test_rope_rotates_pairs_and_preserves_norm():
  x = np.random.default_rng(0).normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None]
  y = np.asarray(rope(x, pos, 10000.0))
  half = 4
  freq = 10000.0 ** (-np.arange(half) / half)
  ang = pos[..., None, None] * freq
  want = np.concatenate(
    [
      x[..., :half] * np.cos(ang) - x[..., half:] * np.sin(ang),
      x[..., half:] * np.cos(ang) + x[..., :half] * np.sin(ang),
    ],
    -1,
  )
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
  q, k = x[0, 0, 0], x[0, 1, 1]
  dot = lambda m, n: float(
    rope(q[None, None, None], jnp.array([[m]]), 1e4).ravel()
    @ rope(k[None, None, None], jnp.array([[n]]), 1e4).ravel()
  )
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)


def test_dense_multi_axis_matches_einsum():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  m = Dense((4, 5), (6,), ("a", "b", "c"), use_bias=True)
  params = m.init(jax.random.key(0), x)
  k, b = params["params"]["kernel"].unbox(), params["params"]["bias"].unbox()
  np.testing.assert_allclose(
    m.apply(params, x), np.einsum("btij,ijo->bto", x, k) + b, rtol=1e-5, atol=1e-5
  )


def test_swiglu_matches_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  m = GatedMLP(8, 16)
  p = m.init(jax.random.key(0), x)["params"]
  g, u, d = (np.asarray(p[n]["kernel"].unbox()) for n in ("gate", "up", "down"))
  silu = lambda z: z / (1 + np.exp(-z))
  np.testing.assert_allclose(
    m.apply({"params": p}, x), (silu(x @ g) * (x @ u)) @ d, rtol=1e-5, atol=1e-5
  )
