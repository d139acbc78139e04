"""The LM shell: cached decoding equals the full pass for every layer layout, causality,
scan vs. unrolled layers, tied/untied heads and mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import LM, ModelConfig, build
from fulcrum.platform.decode import cache as cache_lib

BASE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)

# Many small programs, each run for microseconds: XLA's optimisation passes would dominate.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def init(config, t=10):
  model = build(config)
  tokens = jax.random.randint(jax.random.key(0), (2, t), 0, config.vocab_size)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
  return model, params, tokens


def decode_stepwise(model, params, tokens, cache_len=None):
  b, t = tokens.shape
  cache = model.init_cache(b, cache_len or t)
  step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method=LM.decode))
  outs = []
  for i in range(t):
    logits, cache = step(params, tokens[:, i : i + 1], jnp.full((b, 1), i), cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("tie", [True, False])
def test_stepwise_decoding_reproduces_forward(scan_layers, window, tie):
  config = ModelConfig(**BASE, scan_layers=scan_layers, window=window, tie_embeddings=tie)
  model, params, tokens = init(config)
  full = jax.jit(model.apply)({"params": params}, tokens)
  assert full.shape == (2, 10, 61) and full.dtype == jnp.float32
  np.testing.assert_allclose(decode_stepwise(model, params, tokens), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "arch, window, history",
  [("transformer", 0, False), ("mamba", 0, False), ("mamba", 0, True), ("griffin", 3, True)],
)
def test_padding_inside_the_sequence_is_skipped(arch, window, history):
  """A decoded chunk may start with padding (position -1; a prefix of each row) anywhere in a
  sequence, not only before the prompt: speculative decoding's first draft call of a round is
  [last draft token or padding, pending token]. The padding leaves every layer's state
  untouched: conv windows, SSM and RG-LRU states, attention (a ring buffer for griffin), with
  `cache_history` too; the logits of the real tokens equal the full pass's."""
  config = ModelConfig(**BASE, arch=arch, window=window, cache_history=history)
  model, params, tokens = init(config, t=9)
  full = jax.jit(build(ModelConfig(**BASE, arch=arch, window=window)).apply)(
    {"params": params}, tokens
  )
  step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method=LM.decode))
  cache = model.init_cache(2, 9, 4)
  # Per row, the real tokens of each chunk ([start, end) of the sequence); chunks are as wide as
  # the longer row's plus one, so each row gets its own number (1 to 3) of padding slots first.
  splits = [[(0, 3), (3, 4), (4, 6), (6, 9)], [(0, 1), (1, 4), (4, 5), (5, 9)]]
  outs = [[], []]
  for chunk in zip(*splits, strict=True):
    width = 1 + max(end - start for start, end in chunk)
    x = np.full((2, width), 7, np.int32)  # Padding holds any token: it must not matter.
    pos = np.full((2, width), -1, np.int32)
    for r, (start, end) in enumerate(chunk):
      x[r, width - (end - start) :] = tokens[r, start:end]
      pos[r, width - (end - start) :] = np.arange(start, end)
    logits, cache = step(params, jnp.asarray(x), jnp.asarray(pos), cache)
    if history:  # Keep the state after the last token (as speculative decoding does).
      ends = jnp.asarray([end for _, end in chunk])
      cache = cache_lib.commit(cache, jnp.full((2,), width - 1), ends)
    for r, (start, end) in enumerate(chunk):
      outs[r].append(logits[r, width - (end - start) :])
  got = jnp.stack([jnp.concatenate(o) for o in outs])
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_scan_and_unrolled_layers_agree():
  scanned, params, tokens = init(ModelConfig(**BASE, scan_layers=True))
  unrolled = build(ModelConfig(**BASE))
  per_layer = {
    f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]["block"])
    for i in range(BASE["num_layers"])
  }
  flat = {**{k: v for k, v in params.items() if k != "blocks"}, **per_layer}
  np.testing.assert_allclose(
    jax.jit(unrolled.apply)({"params": flat}, tokens),
    jax.jit(scanned.apply)({"params": params}, tokens),
    rtol=1e-5,
    atol=1e-5,
  )


def test_remat_changes_nothing_numerically():
  model, params, tokens = init(ModelConfig(**BASE))
  remat = build(ModelConfig(**BASE, remat=True))

  def loss(m):
    return lambda p: m.apply({"params": p}, tokens).mean()

  g1, g2 = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(remat)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_causal():
  model, params, tokens = init(ModelConfig(**BASE))
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens.at[:, 7].set((tokens[:, 7] + 1) % 61))
  np.testing.assert_array_equal(a[:, :7], b[:, :7])


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params, tokens = init(ModelConfig(**BASE, dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  ref = build(ModelConfig(**BASE)).apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, ref, atol=0.1, rtol=0.1)


def test_build_accepts_recipe_sections():
  from fulcrum import recipes

  model = build(recipes.get("demo").model)
  assert isinstance(model, LM) and model.config.d_model == 192


def test_logical_axes_on_every_parameter():
  model = build(ModelConfig(**BASE))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
