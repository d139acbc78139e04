"""Layers against plain numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fulcrum.modules import ModelConfig, blocks, build
from fulcrum.modules.layers import Dense, GatedMLP, LoRA, RMSNorm, rope


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


def test_dense_lora_adds_the_scaled_low_rank_product():
  """y = x W + b + (alpha / r) (x A) B, A [in..., r] and B [r, out...] with the kernel's names."""
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  m = Dense((4, 5), (6, 2), ("a", "b", "c", "d"), use_bias=True, lora=LoRA(3, 6.0, ("all",)))
  params = m.init(jax.random.key(0), x)["params"]
  assert params["lora_a"].names == ("a", "b", None) and params["lora_b"].names == (None, "c", "d")
  p = {k: np.asarray(v.unbox()) for k, v in params.items()}
  np.testing.assert_array_equal(p["lora_b"], 0)  # At init the layer is the base layer.
  p["lora_b"] = np.random.default_rng(1).normal(size=(3, 6, 2)).astype(np.float32)
  base = np.einsum("btij,ijop->btop", x, p["kernel"]) + p["bias"]
  low_rank = np.einsum("btij,ijr,rop->btop", x, p["lora_a"], p["lora_b"])
  np.testing.assert_allclose(m.apply({"params": p}, x), base + 2.0 * low_rank, rtol=1e-5, atol=1e-5)


def test_dense_without_lora_or_untargeted_has_no_adapters():
  x = np.zeros((2, 4), np.float32)
  for lora in (LoRA(), LoRA(0, 16.0, ("all",)), LoRA(2, 16.0, ("q",))):
    params = Dense((4,), (3,), ("a", "b"), lora=lora).init(jax.random.key(0), x)["params"]
    assert set(params) == {"kernel"}


@pytest.mark.parametrize("arch", sorted(blocks.BLOCKS))
def test_dense_names_are_the_layers_lora_all_adapts(arch):
  """Each block's `dense_names` lists exactly the `Dense` layers it builds."""
  c = ModelConfig(arch=arch, vocab_size=8, d_model=8, num_layers=3, num_heads=2, lora_rank=1)
  shapes = jax.eval_shape(build(c).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  flat = traverse_util.flatten_dict(shapes["params"])
  adapted = {key[-2] for key in flat if key[-1] == "lora_a"}
  assert sorted(adapted) == sorted(blocks.dense_names(arch))


def test_swiglu_matches_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  m = GatedMLP(8, 16)
  p = m.init(jax.random.key(0), x)["params"]
  g, u, d = (np.asarray(p[n]["kernel"].unbox()) for n in ("gate", "up", "down"))
  silu = lambda z: z / (1 + np.exp(-z))
  np.testing.assert_allclose(
    m.apply({"params": p}, x), (silu(x @ g) * (x @ u)) @ d, rtol=1e-5, atol=1e-5
  )
