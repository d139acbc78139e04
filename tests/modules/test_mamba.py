"""Mamba block: a naive per-timestep reference, cached (chunked and step) decoding, causality,
the official initialisation, the LTI ablation and agreement of every scan implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import LM, ModelConfig, build
from fulcrum.modules.mamba import MambaBlock, MambaCache
from fulcrum.modules.scan import ScanImpl

# Small models and many short programs: XLA's optimisation passes would dominate the runtime.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

BASE = dict(arch="mamba", vocab_size=29, d_model=16, num_layers=2, ssm_state=4)
B, T = 2, 10


def init_key():
  # RBG keys compile much faster than threefry on CPU; the initialisers are the same.
  return jax.random.key(1, impl="rbg")


@functools.cache
def block_and_params(selective: bool = True, scan_impl: str = "auto"):
  """A jitted block apply (returning sown intermediates) and its params, shared across tests."""
  config = ModelConfig(**BASE, selective=selective, scan_impl=scan_impl)
  block = MambaBlock(config)
  x = jax.random.normal(jax.random.key(0), (B, T, config.d_model))
  if scan_impl == "auto":
    params = nn.unbox(jax.jit(block.init)(init_key(), x)["params"])
  else:  # The scan implementation changes no parameter.
    params = block_and_params(selective)[1]
  apply = jax.jit(
    lambda p, x, cache=None: block.apply({"params": p}, x, None, cache, mutable="intermediates")
  )
  return config, params, x, apply


def run(apply, params, x, cache=None):
  (y, cache), state = apply(params, x, cache)
  return y, cache, state["intermediates"]["mixer"]


def naive_block(params, x, config):
  """The Mamba block one timestep at a time in float64 numpy (paper Alg. 2, Eq. 4)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  m = p["mixer"]
  silu = lambda v: v / (1 + np.exp(-v))
  softplus = lambda v: np.log1p(np.exp(v))
  x = np.asarray(x, np.float64)
  normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + config.norm_eps) * p["norm"]["scale"]
  xz = np.einsum("btd,dcf->btcf", normed, m["in_proj"]["kernel"])
  u_in, z = xz[..., 0, :], xz[..., 1, :]
  kernel = m["conv1d"]["kernel"]
  w, n, r = kernel.shape[0], config.ssm_state, config.ssm_dt_rank
  A = -np.exp(m["A_log"])
  h = np.zeros((x.shape[0], u_in.shape[-1], n))
  out = np.zeros_like(x)
  for t in range(x.shape[1]):
    conv = m["conv1d"]["bias"] + sum(kernel[w - 1 - j] * u_in[:, t - j] for j in range(w) if t >= j)
    u = silu(conv)
    if config.selective:
      dbc = u @ m["x_proj"]["kernel"]
      dt = softplus(dbc[:, :r] @ m["dt_proj"]["kernel"] + m["dt_proj"]["bias"])
      Bt, Ct = dbc[:, r : r + n], dbc[:, r + n :]
    else:
      dt = np.broadcast_to(softplus(m["dt_bias"]), u.shape)
      Bt, Ct = np.broadcast_to(m["B"], (u.shape[0], n)), np.broadcast_to(m["C"], (u.shape[0], n))
    h = np.exp(dt[..., None] * A) * h + (dt * u)[..., None] * Bt[:, None, :]
    y = np.einsum("ben,bn->be", h, Ct) + m["D"] * u
    out[:, t] = (y * silu(z[:, t])) @ m["out_proj"]["kernel"]
  return x + out


@pytest.mark.parametrize("selective", [True, False])
def test_block_matches_naive_recurrence(selective):
  config, params, x, apply = block_and_params(selective)
  y, _, _ = run(apply, params, x)
  np.testing.assert_allclose(y, naive_block(params, x, config), rtol=1e-5, atol=1e-5)


def test_chunked_and_stepwise_decoding_equal_full_pass():
  config, params, x, apply = block_and_params()
  full, _, _ = run(apply, params, x)
  empty = MambaBlock(config).init_cache(B, T)
  assert isinstance(empty, MambaCache)
  assert empty.conv.shape == (B, config.conv_width - 1, 2 * config.d_model)
  assert empty.ssm.shape == (B, 2 * config.d_model, config.ssm_state)
  for chunks in ([1] * T, [6, 4]):  # Token by token; two chunks.
    cache, outs, start = empty, [], 0
    for size in chunks:
      y, cache, _ = run(apply, params, x[:, start : start + size], cache)
      outs.append(y)
      start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_causal():
  _, params, x, apply = block_and_params()
  y1, _, _ = run(apply, params, x)
  y2, _, _ = run(apply, params, x.at[:, 6].add(1.0))
  np.testing.assert_array_equal(y1[:, :6], y2[:, :6])
  assert not np.allclose(y1[:, 6:], y2[:, 6:])


def test_official_initialisation():
  config, params, _, _ = block_and_params()
  m = params["mixer"]
  n, f = config.ssm_state, 2 * config.d_model
  np.testing.assert_allclose(m["A_log"], np.log(np.broadcast_to(np.arange(1, n + 1), (f, n))))
  assert m["A_log"].dtype == jnp.float32 and m["D"].dtype == jnp.float32
  np.testing.assert_array_equal(m["D"], np.ones(f))
  dt = jax.nn.softplus(m["dt_proj"]["bias"])
  assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 1e-1 * (1 + 1e-5))
  assert np.ptp(np.log(dt)) > 1.0  # Spread log-uniformly, not constant.
  r = config.ssm_dt_rank
  assert r == 1 and np.all(np.abs(m["dt_proj"]["kernel"]) <= r**-0.5)
  shapes = jax.tree.map(jnp.shape, m)
  assert shapes["in_proj"]["kernel"] == (16, 2, f)
  assert shapes["x_proj"]["kernel"] == (f, r + 2 * n)
  assert shapes["conv1d"] == {"kernel": (config.conv_width, f), "bias": (f,)}


def test_non_selective_ablation_makes_dt_b_c_input_independent():
  _, params, x, apply = block_and_params(selective=False)
  assert "x_proj" not in params["mixer"] and "dt_proj" not in params["mixer"]
  y1, _, s1 = run(apply, params, x)
  y2, _, s2 = run(apply, params, 2 * x + 1)
  for name in ("dt", "B", "C"):
    np.testing.assert_array_equal(s1[name][0], s2[name][0])
  assert not np.allclose(s1["x"][0], s2["x"][0]) and not np.allclose(y1, y2)
  # The selective model's dt, B and C do depend on the input.
  _, sel_params, _, sel_apply = block_and_params()
  _, _, t1 = run(sel_apply, sel_params, x)
  _, _, t2 = run(sel_apply, sel_params, 2 * x + 1)
  assert not any(np.allclose(t1[k][0], t2[k][0]) for k in ("dt", "B", "C"))


def test_sown_intermediates_have_stable_names_and_shapes():
  config, params, x, apply = block_and_params()
  _, _, sown = run(apply, params, x)
  f, n = 2 * config.d_model, config.ssm_state
  want = {"x": (B, T, f), "dt": (B, T, f), "B": (B, T, n), "C": (B, T, n), "gate": (B, T, f)}
  assert {k: v[0].shape for k, v in sown.items()} == want


# AUTO is one of the others; PALLAS runs interpreted on CPU.
@pytest.mark.parametrize("impl", [i.value for i in ScanImpl if i != ScanImpl.AUTO])
def test_every_scan_impl_gives_the_same_block_output(impl):
  _, params, x, ref_apply = block_and_params(scan_impl="reference")
  _, _, _, apply = block_and_params(scan_impl=impl)
  want, _, _ = run(ref_apply, params, x)
  got, _, _ = run(apply, params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lm_prefill_then_stepwise_decoding_reproduces_forward():
  # Stacked layers (nn.scan) exercise the stacked MambaCache; unrolled stacks share test_lm's path.
  model = build({**BASE, "scan_layers": True})
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, BASE["vocab_size"])
  params = nn.unbox(jax.jit(model.init)(init_key(), tokens)["params"])
  full = jax.jit(model.apply)({"params": params}, tokens)
  assert full.shape == (B, T, BASE["vocab_size"]) and full.dtype == jnp.float32
  step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method=LM.decode))
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  cache, outs, start = model.init_cache(B, T), [], 0
  for size in [6] + [1] * (T - 6):  # A prompt chunk, then one token at a time.
    sl = slice(start, start + size)
    logits, cache = step(params, tokens[:, sl], positions[:, sl], cache)
    outs.append(logits)
    start += size
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selective", [True, False])
def test_logical_axes_on_every_parameter(selective):
  model = build({**BASE, "selective": selective})
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
