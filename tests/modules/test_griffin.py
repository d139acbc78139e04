"""Griffin/Hawk: the RG-LRU against a naive loop, its initialisation and stationary variance,
document resets, cached decoding of the LMs (past the local-attention window), the layer pattern
and nn.scan over groups of layers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import LM, build
from fulcrum.modules.griffin import (
  RGLRU,
  AttentionResidualBlock,
  RecurrentResidualBlock,
  rg_lru_coefficients,
  sqrt_bound_derivative,
)
from fulcrum.modules.scan import ScanImpl, linear_scan

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.

BASE = dict(vocab_size=31, d_model=16, num_heads=2, window=3)
B, T = 2, 10
WIDTH, HEADS = 8, 2


def init_key():
  # RBG keys compile much faster than threefry on CPU; the initialisers are the same.
  return jax.random.key(1, impl="rbg")


# RG-LRU inputs: row 0 continues a document (positions 3..5) and starts one at t = 3; row 1
# starts at t = 0, so its h0 must be ignored.
LRU_POS = jnp.array([[3, 4, 5, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
LRU_X = jax.random.normal(jax.random.key(0), (2, 8, WIDTH))
LRU_H0 = jax.random.normal(jax.random.key(2), (2, WIDTH))


@functools.cache
def rg_lru(scan_impl: str = "auto"):
  lru = RGLRU(WIDTH, HEADS, scan_impl=scan_impl)
  if scan_impl == "auto":
    params = nn.unbox(jax.jit(lru.init)(init_key(), LRU_X, LRU_POS)["params"])
  else:  # The scan implementation changes no parameter.
    params = rg_lru()[0]
  apply = jax.jit(lambda p, x, pos, h0: lru.apply({"params": p}, x, pos, h0))
  return params, apply


def naive_rg_lru(params, x, positions, h0, c=8.0):
  """The RG-LRU one timestep at a time in float64 numpy (Griffin paper Eqs. 1-4)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))

  def block_diag(v, lin):
    vh = v.reshape(v.shape[0], HEADS, -1)
    return (np.einsum("bhi,hij->bhj", vh, lin["kernel"]) + lin["bias"]).reshape(v.shape)

  x, h = np.asarray(x, np.float64), np.asarray(h0, np.float64)
  out = np.zeros_like(x)
  for t in range(x.shape[1]):
    xt = x[:, t]
    i_t = sigmoid(block_diag(xt, p["input_gate"]))
    r_t = sigmoid(block_diag(xt, p["a_gate"]))
    a_t = np.exp(-c * r_t * np.log1p(np.exp(p["a_param"])))
    a_t = np.where(np.asarray(positions)[:, t, None] == 0, 0.0, a_t)
    h = a_t * h + np.sqrt(1 - a_t**2) * (i_t * xt)
    out[:, t] = h
  return out, h


def test_rg_lru_matches_naive_recurrence_with_resets():
  params, apply = rg_lru()
  y, h_last = apply(params, LRU_X, LRU_POS, LRU_H0)
  want_y, want_h = naive_rg_lru(params, LRU_X, LRU_POS, LRU_H0)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, want_h, rtol=1e-5, atol=1e-5)
  assert h_last.dtype == jnp.float32
  # A reset at t = 0 makes the incoming state irrelevant.
  y0, _ = apply(params, LRU_X, LRU_POS, jnp.zeros_like(LRU_H0))
  np.testing.assert_array_equal(y0[1], y[1])
  assert not np.allclose(y0[0, :3], y[0, :3])
  np.testing.assert_allclose(y0[0, 3:], y[0, 3:], rtol=1e-6)


def test_a_to_the_c_is_uniform_in_paper_range_at_init():
  lru = RGLRU(4096, 64)  # 64 gate blocks: a's init does not depend on them, and they're small.
  params = jax.jit(lru.init)(init_key(), jnp.zeros((1, 1, 4096)), jnp.zeros((1, 1), jnp.int32))
  a_param = nn.unbox(params)["params"]["a_param"]
  a_c = np.exp(-8.0 * jax.nn.softplus(a_param))  # σ(Λ)^c with Λ = -a_param.
  assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
  assert abs(a_c.mean() - 0.9495) < 0.005 and abs(a_c.std() - 0.099 / 12**0.5) < 0.003


def test_stationary_variance_is_one():
  # Fixed a, i = 1, x ~ N(0, 1) i.i.d.: Var h = (1 - a²) Σ_k a^{2k} = 1 (Griffin Sec. 2.4).
  a = jnp.repeat(jnp.array([0.5, 0.9, 0.99]), 4096)
  x = jax.random.normal(jax.random.key(3), (1, 1200, a.size))
  log_a = jnp.broadcast_to(jnp.log(a), x.shape)

  @jax.jit
  def last_state(x, log_a):
    coef, scale = rg_lru_coefficients(log_a, jnp.ones_like(x))
    return linear_scan(coef, scale * x)[1]

  var = np.asarray(last_state(x, log_a)).reshape(3, 4096).var(axis=1)
  np.testing.assert_allclose(var, 1.0, atol=0.1)


def test_sqrt_gradient_is_clipped():
  g = jax.grad(lambda v: sqrt_bound_derivative(v, 1000.0))
  assert g(0.0) == pytest.approx(1000.0) and g(0.25) == pytest.approx(1.0)


# AUTO is one of the others; PALLAS runs interpreted on CPU.
@pytest.mark.parametrize("impl", [i.value for i in ScanImpl if i != ScanImpl.AUTO])
def test_every_linear_scan_impl_gives_the_same_rg_lru(impl):
  params, ref = rg_lru()
  _, apply = rg_lru(impl)
  want = ref(params, LRU_X, LRU_POS, LRU_H0)
  got = apply(params, LRU_X, LRU_POS, LRU_H0)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@functools.cache
def lm(arch: str, scan_layers: bool, num_layers: int):
  """A tiny model with soft-capped logits and sqrt(d)-scaled embeddings, and jitted apply fns."""
  config = dict(
    BASE,
    arch=arch,
    num_layers=num_layers,
    scan_layers=scan_layers,
    logits_soft_cap=5.0,
    scale_embeddings=True,
  )
  model = build(config)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, BASE["vocab_size"])
  params = nn.unbox(jax.jit(model.init)(init_key(), tokens)["params"])
  forward = jax.jit(lambda p, x, pos=None: model.apply({"params": p}, x, pos))
  return model, params, tokens, forward


@pytest.mark.parametrize(("arch", "scan_layers"), [("griffin", True), ("hawk", False)])
def test_lm_cached_decoding_reproduces_forward_past_the_window(arch, scan_layers):
  model, params, tokens, forward = lm(arch, scan_layers, 3)
  full = forward(params, tokens)
  assert full.shape == (B, T, BASE["vocab_size"]) and full.dtype == jnp.float32
  assert np.abs(full).max() < 5.0  # Soft cap.
  step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method=LM.decode))
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  cache, outs, start = model.init_cache(B, T), [], 0
  if arch == "griffin":  # The local-attention cache is a ring buffer of `window` slots.
    assert cache[2].k.shape == (1, B, BASE["window"], 1, BASE["d_model"] // 2)  # 1 group.
  for size in [5] + [1] * (T - 5):  # A prompt longer than the window, then single tokens.
    sl = slice(start, start + size)
    logits, cache = step(params, tokens[:, sl], positions[:, sl], cache)
    outs.append(logits)
    start += size
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_hawk_packed_documents_equal_separate_runs():
  # RG-LRU and conv both restart at position 0, so two packed documents do not interact.
  _, params, tokens, forward = lm("hawk", False, 3)
  separate = forward(params, tokens)
  packed = forward(params, tokens.reshape(1, 2 * T), jnp.tile(jnp.arange(T), 2)[None])
  np.testing.assert_allclose(packed.reshape(separate.shape), separate, rtol=1e-5, atol=1e-5)


def test_griffin_layer_pattern_is_recurrent_recurrent_attention():
  assert RecurrentResidualBlock.temporal == "recurrent"
  assert AttentionResidualBlock.temporal == "attention"
  for arch, want in [("griffin", "rrarr"), ("hawk", "rrrrr")]:
    model = build(dict(BASE, arch=arch, num_layers=5))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    kinds = "".join("a" if "attention_block" in boxed[f"blocks_{i}"] else "r" for i in range(5))
    assert kinds == want
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_scanned_groups_equal_unrolled_layers():
  model, params, tokens, forward = lm("griffin", True, 3)
  # nn.scan stacks group g's layer 3g + j under blocks/block_j; one group here.
  flat = {k: v for k, v in params.items() if k != "blocks"}
  for j in range(3):
    flat[f"blocks_{j}"] = jax.tree.map(lambda x: x[0], params["blocks"][f"block_{j}"])
  unrolled = build(dataclasses.replace(model.config, scan_layers=False))
  np.testing.assert_allclose(
    jax.jit(unrolled.apply)({"params": flat}, tokens),
    forward(params, tokens),
    rtol=1e-5,
    atol=1e-5,
  )


def test_scan_layers_needs_whole_groups():
  with pytest.raises(ValueError, match="multiple of 3"):
    build(dict(BASE, arch="griffin", num_layers=4, scan_layers=True))
  build(dict(BASE, arch="hawk", num_layers=4, scan_layers=True))  # Period 1: any depth.
