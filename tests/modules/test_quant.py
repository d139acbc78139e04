"""Quantized training (`model.quant`, qwix): a Dense layer against a naive fake-quant reference,
every architecture quantizes with the same parameters and finite gradients, cached decoding of a
quantized LM equals its full pass, and bad modes are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import ModelConfig, build, quant
from fulcrum.modules.layers import dense

# Many small programs, each run a few times: XLA's optimisation passes would dominate.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

# Scanned layers: one block traced per pattern period keeps the qwix tracing short.
ARCHS = {
  "transformer": dict(num_layers=2, scan_layers=True),
  "mamba": dict(num_layers=2, scan_layers=True),
  "hawk": dict(num_layers=2, scan_layers=True),
  "griffin": dict(num_layers=3, scan_layers=True),
}


def fake_quant_int8(a: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 with an absmax scale per channel (over `reduce_axes`): values in
  [-127.5, 127.5]·scale round to the nearest integer in [-127, 127]. Returns (dequantized,
  |a|/scale) so callers can skip the ±127.5 boundary, where rounding may go either way."""
  scale = np.max(np.abs(a), axis=reduce_axes, keepdims=True) / 127.5
  return np.clip(np.round(a / scale), -127, 127) * scale, np.abs(a) / scale


@pytest.mark.parametrize("mode", ["int8_weight", "int8"])
@jax.default_matmul_precision("float32")  # Full fp32 matmuls on GPU/TPU too (not TF32/bf16).
def test_dense_matches_naive_fake_quantization(mode):
  layer = dense((16,), (2, 8), ("embed", "heads", "head_dim"), "q")
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 16)))
  params = nn.unbox(layer.init(jax.random.key(1), x))
  w = np.asarray(params["params"]["kernel"])
  qlayer = quant.quantize(layer, mode)
  # Identity inputs read back the weight the quantized layer really uses (weight-only mode).
  if mode == "int8_weight":
    w_used = np.asarray(qlayer.apply(params, jnp.eye(16)[None]))[0]
    w_ref, w_units = fake_quant_int8(w, (0,))  # Per output channel: reduce over inputs.
    interior = w_units < 127.4
    np.testing.assert_allclose(w_used[interior], w_ref[interior], rtol=1e-6, atol=1e-7)
    assert not np.allclose(w_used, w)  # It really quantizes.
    return
  # W8A8: per-token activations (reduce over the contracted feature axis) times int8 weights.
  w_ref, w_units = fake_quant_int8(w, (0,))
  x_ref, x_units = fake_quant_int8(x, (2,))
  clean = (x_units < 127.4).all(axis=2)[..., None, None] & (w_units < 127.4).all(axis=0)
  expected = np.einsum("btd,dhe->bthe", x_ref, w_ref)
  got = np.asarray(qlayer.apply(params, x))
  np.testing.assert_allclose(got[clean], expected[clean], rtol=1e-5, atol=1e-5)
  assert np.abs(got - np.einsum("btd,dhe->bthe", x, w)).max() > 1e-3


# Every architecture in int8; the other modes on one architecture each. The modes of one
# architecture share its float model (parameters, logits, gradients) in one test.
TRAIN_MODES = {"transformer": ("int8", "int8_weight"), "mamba": ("int8", "fp8")}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_trains_quantized(arch):
  """Same parameter tree as the float model, outputs close to it but not equal, and every
  parameter that gets a gradient in float gets a finite, nonzero one quantized."""
  cfg = dict(arch=arch, vocab_size=32, d_model=32, num_heads=2, **ARCHS[arch])
  float_model = build(ModelConfig(**cfg))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 32)
  params = nn.unbox(jax.jit(float_model.init)(jax.random.key(1), tokens)["params"])
  ref = jax.jit(float_model.apply)({"params": params}, tokens)

  def loss(m):
    return lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, tokens))[..., 0])

  g_float = jax.jit(jax.grad(loss(float_model)))(params)
  for mode in TRAIN_MODES.get(arch, ("int8",)):
    qmodel = build(ModelConfig(**cfg, quant=mode))
    qparams = nn.unbox(jax.eval_shape(qmodel.init, jax.random.key(1), tokens)["params"])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, qparams), mode
    out = jax.jit(qmodel.apply)({"params": params}, tokens)
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 1e-4 < err < (0.3 if mode == "fp8" else 0.1), mode
    g_quant = jax.jit(jax.grad(loss(qmodel)))(params)
    for gf, gq in zip(jax.tree.leaves(g_float), jax.tree.leaves(g_quant), strict=True):
      assert np.isfinite(gq).all(), mode
      if np.abs(gf).max() > 0:
        assert np.abs(gq).max() > 0, mode


@pytest.mark.parametrize("arch", ["transformer", "mamba", "griffin"])
def test_quantized_cached_decoding_equals_full_pass(arch):
  """Weight quantization is deterministic, so a quantized model's cached decode matches its full
  pass. (With int8 activations too, the float paths differ in the last bit, which can move a
  value across a rounding boundary: one int8 step, not a bug, so W8A8 is not compared here.)"""
  cfg = ModelConfig(
    arch=arch, vocab_size=32, d_model=32, num_heads=2, quant="int8_weight", **ARCHS[arch]
  )
  model = build(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
  full = jax.jit(model.apply)({"params": params}, tokens)
  cache = model.init_cache(2, 9)
  step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method="decode"))
  outs = []
  for i in range(9):
    logits, cache = step(params, tokens[:, i : i + 1], jnp.full((2, 1), i), cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)
  # ... and decode really runs quantized (differs from the float model's decode).
  float_model = build(ModelConfig(**{**cfg.__dict__, "quant": "none"}))
  float_decode = jax.jit(
    lambda p, x, pos, c: float_model.apply({"params": p}, x, pos, c, method="decode")
  )  # One program, not one per operation.
  float_logits, _ = float_decode(
    params, tokens, jnp.arange(9)[None].repeat(2, 0), float_model.init_cache(2, 9)
  )
  assert float(jnp.abs(float_logits - full).max()) > 1e-4


@pytest.mark.parametrize("arch", ["dlinear", "nlinear"])
def test_linear_forecasters_quantize_their_time_maps(arch):
  section = dict(arch=arch, input_len=24, horizon=6, quant="int8_weight")
  model = build(section)
  x = jax.random.normal(jax.random.key(0), (2, 24, 3))
  params = model.init(jax.random.key(1), x)
  ref = build({**section, "quant": "none"}).apply(params, x)
  out = model.apply(params, x)
  assert 0 < float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="model.quant"):
    quant.rules("int4")
  assert quant.rules("none") == []
