"""The attribution engine (`fulcrum.platform.attribution`): integrated gradients' completeness on
every architecture and forecaster, hidden attention against the scans it unrolls, rollout, the
gradients against finite differences and closed forms, deletion / insertion and the
model-randomisation check on a fitted model, layer attribution, and the errors.

Models are tiny with random weights (`random_params`). Compiling dominates the runtime (each
model's forward and forward + backward programs take seconds), so every attribution runs with
batch_size 1 (one compiled shape a model for every method), and each language model's
attributions are tested by one test function: under `pytest -n 2`, two tests of one model may
run in different workers, and both would compile it (the error tests only run a forward pass).
The CLI is tested in test_attribute_cli.py, the HTML / PNG rendering in
test_attribution_report.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import linen as nn

from fulcrum.modules import build, scan
from fulcrum.modules.blocks import layer_paths
from fulcrum.platform.attribution import (
  METHODS,
  Subject,
  Target,
  attribute,
  faithfulness,
  hidden_attention,
  layer_maps,
  mamba_hidden_attention,
  randomisation_check,
  rglru_hidden_attention,
  rollout,
)
from fulcrum.platform.attribution.faithfulness import curves, spearman
from tests.conftest import random_params

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

VOCAB, T = 50, 12
# No token 0: the default (pad) baseline replaces every token by 0, so x' differs from x
# everywhere.
TOKENS = np.random.default_rng(0).integers(1, VOCAB, T).astype(np.int32)
LMS = {
  "transformer": dict(arch="transformer", d_model=16, num_layers=2, num_heads=2),
  # The reference scan compiles in half the time of CPU's default (chunked); same function.
  "mamba": dict(arch="mamba", d_model=16, num_layers=2, scan_impl="reference"),
  "hawk": dict(arch="hawk", d_model=16, num_layers=1, num_heads=2),
  # Recurrent, recurrent, local attention over 4 of the 12 tokens.
  "griffin": dict(arch="griffin", d_model=16, num_layers=3, num_heads=2, window=4),
  "transformer_scanned": dict(
    arch="transformer", d_model=16, num_layers=2, num_heads=2, scan_layers=True
  ),
  "griffin_scanned": dict(
    arch="griffin", d_model=16, num_layers=3, num_heads=2, window=4, scan_layers=True
  ),
}
# Every kind of LM target somewhere; None: the default (log p of the top token, last position).
LM_TARGETS = {
  "transformer": Target(position=8),
  "hawk": Target(kind="logit", position=-2, token=7),
  "transformer_scanned": Target(kind="span", start=4),
}

L, H, C = 12, 3, 2  # Forecasters: input steps, horizon, channels.
FORECASTERS = {
  "dlinear": dict(arch="dlinear", moving_avg=3),
  "nlinear": dict(arch="nlinear"),
  "mamba_forecaster": dict(
    arch="mamba", head="forecast", d_model=16, num_layers=1, scan_impl="reference"
  ),
}
_rng = np.random.default_rng(1)
# A trend in opposite directions plus noise: far from its window mean (the default baseline).
SERIES = (np.linspace(-1.0, 1.0, L)[:, None] * [1.0, -2.0] + _rng.normal(0, 0.5, (L, C))).astype(
  np.float32
)
FORECAST_TARGET = Target(kind="forecast", step=1, channel=1)
BATCH = 1  # One compiled shape a model for every method (see the module docstring).


def series_params(model, seed: int, input_len: int = L, channels: int = C):
  """Gaussian parameters of a forecaster (as `random_params` for LMs): the block-stack
  forecaster's head is zero-initialised, which would make its forecast the last value."""
  x = jnp.zeros((1, input_len, channels), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1].key == "A_log":
      return jnp.asarray(rng.normal(-3.0, 0.25, s.shape), s.dtype)
    scale = s.shape[-2] ** -0.5 if len(s.shape) >= 2 else 0.2
    return jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def case(name: str):
  """(model, params, inputs, target) of a named test model, built once a module."""
  if name in LMS:
    model = build(dict(vocab_size=VOCAB, **LMS[name]))
    return model, random_params(model, seed=1), TOKENS, LM_TARGETS.get(name)
  model = build(dict(input_len=L, horizon=H, **FORECASTERS[name]))
  return model, series_params(model, seed=2), SERIES, FORECAST_TARGET


# Shared checks ---------------------------------------------------------------------------------


def assert_complete(result):
  """|F(x) − F(x')| is not tiny, and the scores add up to it within 1%."""
  change = result.target - result.baseline_target
  assert abs(change) > 1e-3, (result.target, result.baseline_target)
  assert result.completeness_gap < 0.01, result.completeness_gap
  assert abs(result.scores.sum() - change) <= 0.01 * abs(change), (result.scores.sum(), change)


def check_integrated_gradients(name: str):
  """Integrated gradients of a test model at its inputs: complete, one score a token / value."""
  model, params, x, target = case(name)
  result = attribute(model, params, x, "integrated_gradients", target=target, batch_size=BATCH)
  assert result.method == "integrated_gradients"
  assert result.scores.shape == ((T,) if name in LMS else (L, C))
  assert result.raw.shape == ((T, 16) if name in LMS else (L, C))
  assert result.steps >= 64 and result.steps % 8 == 0  # Panels of 8 Gauss–Legendre points.
  assert_complete(result)
  return result


def check_layer_attribution(name: str, layer: str, inputs_result):
  """Integrated gradients at a block's output: complete, and F(x') is the model's value on the
  all-pad input as at the embeddings (the baseline is the layer's activation on that input, and
  everything after the layer reads only it)."""
  model, params, x, target = case(name)
  result = attribute(model, params, x, "layer", target=target, layer=layer, batch_size=BATCH)
  assert result.method == "layer" and result.layer == layer
  assert result.scores.shape == (T,) and result.raw.shape == (T, 16)
  assert_complete(result)
  np.testing.assert_allclose(result.target, inputs_result.target, rtol=1e-6)
  np.testing.assert_allclose(result.baseline_target, inputs_result.baseline_target, rtol=1e-5)
  assert not np.allclose(result.scores, inputs_result.scores, rtol=0.05)  # Another split.


def check_rollout(name: str, kinds: list[str]):
  """Rollout (rows sum to 1, causal, the target's row), and the per-layer maps it multiplies:
  attention rows sum to 1 within the window, hidden attention maps are causal."""
  model, params, x, target = case(name)
  result = attribute(model, params, x, "rollout", target=target)
  roll = result.maps["rollout"]
  assert result.method == "rollout" and roll.shape == (T, T)
  np.testing.assert_allclose(roll.sum(-1), 1, rtol=1e-6)
  assert np.all(roll >= 0) and np.all(np.triu(roll, 1) == 0)
  position = Subject(model, params, x, target).target.position
  np.testing.assert_allclose(result.scores, roll[position])
  assert roll[position, :position].sum() > 0.05  # Not the identity: earlier tokens count.
  maps = layer_maps(model, params, x[None])
  assert [kind for _, kind, _ in maps] == kinds
  for layer, kind, m in maps:
    np.testing.assert_array_equal(result.maps[f"{layer} ({kind})"], m)
    assert m.shape == (T, T) and np.all(m >= 0) and np.all(np.triu(m, 1) == 0)
    if kind == "attention":
      np.testing.assert_allclose(m.sum(-1), 1, rtol=1e-5)
      if window := LMS[name].get("window"):  # A query sees `window` keys, itself included.
        assert np.all(np.tril(m, -window) == 0) and np.all(np.diagonal(m, -window + 1) > 0)


def check_hidden_attention(name: str, layers: list[str], width: int):
  """One causal α [f, t, s] per recurrent layer; as a map method, the rollout of all maps."""
  model, params, x, target = case(name)
  alphas = hidden_attention(model, params, x[None])
  assert list(alphas) == layers
  for alpha in alphas.values():
    assert alpha.shape == (width, T, T)
    assert np.all(np.triu(alpha, 1) == 0)
    assert np.all(np.abs(np.diagonal(alpha, axis1=1, axis2=2)) > 0)
  result = attribute(model, params, x, "hidden_attention", target=target)
  kind = "mamba" if LMS[name]["arch"] == "mamba" else "rg_lru"
  assert {f"{layer} ({kind})" for layer in layers} | {"rollout"} <= set(result.maps)
  position = Subject(model, params, x, target).target.position
  np.testing.assert_allclose(result.scores, result.maps["rollout"][position])
  return alphas


def intermediates(name: str, positions: np.ndarray) -> dict:
  """The model's sown activations (`model.apply(..., mutable=["intermediates"])`) at positions."""
  model, params, x, _ = case(name)
  apply = jax.jit(lambda p, x, pos: model.apply({"params": p}, x, pos, mutable=["intermediates"]))
  return apply(params, x[None], positions[None].astype(np.int32))[1]["intermediates"]


def assert_reproduces(got, want):
  want = np.asarray(want)
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# Language models, one test each ----------------------------------------------------------------


def test_transformer():
  """Integrated gradients, F(x) and F(x') against the model; saliency and gradient × input
  against ∂F/∂embedding, which agrees with central differences; causality; SmoothGrad without
  noise is saliency; layer attribution; every method explains the same value; rollout."""
  model, params, x, target = case("transformer")
  ig = check_integrated_gradients("transformer")
  pad = np.zeros_like(TOKENS)
  logits = jax.jit(model.apply)({"params": params}, np.stack([TOKENS, pad]))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  token = int(np.argmax(logp[0, 8]))
  np.testing.assert_allclose(ig.target, logp[0, 8, token], rtol=1e-5)
  np.testing.assert_allclose(ig.baseline_target, logp[1, 8, token], rtol=1e-5)

  subject = Subject(model, params, x, target)
  assert subject.target == Target(position=8, token=token)
  taps = ["attn/keys", "attn/values", "output"]
  want = ["embeddings"] + [f"blocks_{i}/{tap}" for i in range(2) for tap in taps]
  assert sorted(subject.activation_names()) == sorted(want)
  assert subject.address == (("embeddings",), None)
  z = np.asarray(subject.z, np.float64)
  np.testing.assert_array_equal(z, params["embedder"]["embedding"][x])  # Unscaled lookups.
  value, grad = subject.evaluate(subject.z[None], grad=True, batch_size=BATCH)
  g = np.asarray(grad[0], np.float64)
  assert g.shape == (T, 16) and value[0] == pytest.approx(ig.target, rel=1e-6)

  saliency = attribute(model, params, x, "saliency", target=target, batch_size=BATCH)
  np.testing.assert_allclose(saliency.scores, np.linalg.norm(g, axis=-1), rtol=1e-6)
  assert np.all(saliency.scores[9:] == 0) and np.all(saliency.scores[:9] > 0)  # Causal.
  gxi = attribute(model, params, x, "grad_x_input", target=target, batch_size=BATCH)
  np.testing.assert_allclose(gxi.raw, g * z, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(gxi.scores, (g * z).sum(-1), rtol=1e-5, atol=1e-9)

  # Directional derivatives: a random unit direction over every position, and unit vectors
  # along one position's gradient (that derivative is the saliency score there).
  rng = np.random.default_rng(3)
  directions = [rng.normal(0, 1, z.shape)]
  directions[0] /= np.linalg.norm(directions[0])
  for position in (8, 2):
    d = np.zeros_like(z)
    d[position] = g[position] / np.linalg.norm(g[position])
    directions.append(d)
  eps = 1e-2
  points = np.concatenate([[z + eps * d, z - eps * d] for d in directions]).astype(np.float32)
  values = np.asarray(subject.evaluate(jnp.asarray(points), batch_size=BATCH), np.float64)
  finite = (values[0::2] - values[1::2]) / (2 * eps)
  np.testing.assert_allclose(finite, [float((g * d).sum()) for d in directions], rtol=1e-3)
  np.testing.assert_allclose(finite[1:], saliency.scores[[8, 2]], rtol=1e-3)

  kw = dict(target=target, batch_size=BATCH)
  smooth = attribute(model, params, x, "smoothgrad", samples=3, noise=0.0, **kw)
  np.testing.assert_allclose(smooth.scores, saliency.scores, rtol=1e-6)
  noisy = attribute(model, params, x, "smoothgrad", samples=3, noise=0.5, **kw)
  assert not np.allclose(noisy.scores, saliency.scores, rtol=1e-2)

  check_layer_attribution("transformer", "blocks_0/output", ig)

  for method in METHODS:
    if method == "hidden_attention":  # Needs recurrent layers.
      with pytest.raises(ValueError, match="use rollout"):
        attribute(model, params, x, method, target=target)
      continue
    layer = "blocks_0/output" if method == "layer" else None
    result = attribute(model, params, x, method, layer=layer, samples=2, **kw)
    assert result.method == method and result.scores.shape == (T,)
    assert np.all(np.isfinite(result.scores)) and np.any(result.scores != 0)
    assert result.target == pytest.approx(ig.target, rel=1e-6), method
    assert (result.maps is not None) == (method == "rollout")

  check_rollout("transformer", ["attention", "attention"])


def test_scanned_transformer():
  """A span target through stacked layers; layer attribution at a stacked layer's output; one
  activation name per layer of a stacked tap, each attributable."""
  model, params, x, target = case("transformer_scanned")
  ig = check_integrated_gradients("transformer_scanned")
  assert ig.scores[-1] == 0  # The last token predicts nothing in the span.
  check_layer_attribution("transformer_scanned", "blocks/block/output[1]", ig)
  names = Subject(model, params, x, target).activation_names()
  taps = ["attn/keys", "attn/values", "output"]
  want = ["embeddings"] + [f"blocks/block/{tap}[{i}]" for tap in taps for i in range(2)]
  assert sorted(names) == sorted(want)
  for name in names:
    assert Subject(model, params, x, target, layer=name).z.shape[0] == T
  with pytest.raises(ValueError, match="stacked over layers"):
    Subject(model, params, x, target, layer="blocks/block/output")
  with pytest.raises(ValueError, match="has 2 layers"):
    Subject(model, params, x, target, layer="blocks/block/output[2]")
  # The maps find stacked layers where `layer_paths` says they live.
  maps = layer_maps(model, params, x[None])
  assert [name for name, _, _ in maps] == ["blocks/block[0]", "blocks/block[1]"]
  assert [name for name, _, _ in maps] == [layer.name for layer in layer_paths(model.config)]
  assert [kind for _, kind, _ in maps] == ["attention", "attention"]


def test_mamba():
  """Hidden attention reproduces the selective scan: y_t = Σ_s α[f, t, s] x_s[f] + D x_t on each
  layer's tapped x, dt, B, C; rollout."""
  model, params, x, target = case("mamba")
  check_integrated_gradients("mamba")
  names = Subject(model, params, x, target).activation_names()
  taps = ["mixer/x", "mixer/dt", "mixer/B", "mixer/C", "mixer/gate", "output"]
  assert sorted(names) == sorted(
    ["embeddings"] + [f"blocks_{i}/{t}" for i in range(2) for t in taps]
  )

  alphas = check_hidden_attention("mamba", ["blocks_0", "blocks_1"], width=32)  # Expand 2 × 16.
  acts = Subject(model, params, x, target).intermediates  # Sown x, dt, B, C (one compile less).
  for name, alpha in alphas.items():
    tapped = {k: v[0] for k, v in acts[name]["mixer"].items()}  # Sown as 1-tuples.
    xs, dt, B, C_ = tapped["x"], tapped["dt"], tapped["B"], tapped["C"]
    p = params[name]["mixer"]
    A = -jnp.exp(p["A_log"])
    want, _ = scan.selective_scan(xs, dt, A, B, C_, p["D"], None, impl="reference")
    direct = np.asarray(mamba_hidden_attention(dt, A, B, C_)[0])
    np.testing.assert_allclose(alpha, direct, rtol=1e-6, atol=1e-9)
    assert_reproduces(np.einsum("fts,sf->tf", direct, xs[0]) + p["D"] * xs[0], want[0])
  check_rollout("mamba", ["mamba", "mamba"])


def test_hawk():
  """The RG-LRU's hidden attention reproduces its scan, h_t = Σ_s α[f, t, s] x_s[f], with a second
  document from position 6: α is exactly 0 from one document to the other, positive within each
  (and across the boundary without the reset)."""
  check_integrated_gradients("hawk")
  without_reset = check_hidden_attention("hawk", ["blocks_0"], width=16)
  acts = intermediates("hawk", np.concatenate([np.arange(6), np.arange(6)]))
  tapped = {k: v[0] for k, v in acts["blocks_0"]["recurrent_block"]["rg_lru"].items()}
  xs, a, scale = tapped["x"], tapped["a"], tapped["input_scale"]
  assert np.all(np.asarray(a)[0, 6] == 0)  # The reset.
  want, _ = scan.linear_scan(a, scale * xs, None, impl="reference")
  alpha = np.asarray(rglru_hidden_attention(a, scale)[0])
  assert alpha.shape == (16, T, T)
  assert_reproduces(np.einsum("fts,sf->tf", alpha, xs[0]), want[0])
  assert np.all(alpha[:, 6:, :6] == 0)
  within = np.tril(np.ones((6, 6), bool))
  assert np.all(alpha[:, :6, :6][:, within] > 0) and np.all(alpha[:, 6:, 6:][:, within] > 0)
  assert np.all(np.abs(without_reset["blocks_0"][:, 6:, :6]) > 0)


def test_griffin():
  """Local attention over a window shorter than the input between recurrent layers."""
  check_integrated_gradients("griffin")
  check_hidden_attention("griffin", ["blocks_0", "blocks_1"], width=16)  # blocks_2: attention.
  check_rollout("griffin", ["rg_lru", "rg_lru", "attention"])


def test_scanned_griffin():
  check_integrated_gradients("griffin_scanned")
  check_hidden_attention("griffin_scanned", ["blocks/block_0[0]", "blocks/block_1[0]"], width=16)


# Forecasters ----------------------------------------------------------------------------------


def test_forecaster_maps_unroll_whatever_scan_layers_says():
  """A block-stack forecaster unrolls its layers (blocks_i) even with `scan_layers`: the maps
  read them there, and pick the hidden attention by the layer's mixer (mamba)."""
  _, params, x, _ = case("mamba_forecaster")
  model = build(dict(input_len=L, horizon=H, scan_layers=True, **FORECASTERS["mamba_forecaster"]))
  alphas = hidden_attention(model, params, x[None])
  assert list(alphas) == ["blocks_0"] and alphas["blocks_0"].shape == (32, L, L)  # Expand 2.
  assert np.all(np.triu(alphas["blocks_0"], 1) == 0)
  maps = layer_maps(model, params, x[None])
  assert [(name, kind) for name, kind, _ in maps] == [("blocks_0", "mamba")]


@pytest.mark.parametrize("name", FORECASTERS)
def test_forecaster_integrated_gradients_are_complete(name):
  result = check_integrated_gradients(name)
  if name == "mamba_forecaster":  # F(x) against the model: the linear ones suffice (compiles).
    return
  model, params, x, _ = case(name)
  mean = np.broadcast_to(x.mean(0), x.shape)  # The default baseline.
  forecast = np.asarray(jax.jit(model.apply)({"params": params}, np.stack([x, mean])))
  np.testing.assert_allclose(result.target, forecast[0, 1, 1], rtol=1e-5)
  np.testing.assert_allclose(result.baseline_target, forecast[1, 1, 1], rtol=1e-5)


@pytest.mark.parametrize("individual", [False, True])
def test_saliency_of_dlinear_is_its_trend_weights(individual):
  """moving_avg=1: the trend is x and the seasonal part 0, so forecast[o, c] = Σ_l W_t[l, o]
  x[l, c] + b_t[o] + b_s[o] and ∂forecast[o, c]/∂x[l, c'] = W_t[l, o] [c = c']."""
  model = build(dict(arch="dlinear", input_len=L, horizon=H, moving_avg=1, individual=individual))
  params = series_params(model, seed=4)
  trend, seasonal = params["trend"], params["seasonal"]
  for step, channel in [(0, 0), (2, 1)]:
    target = Target(kind="forecast", step=step, channel=channel)
    result = attribute(model, params, SERIES, "saliency", target=target, batch_size=BATCH)
    kernel, bias = trend["kernel"], trend["bias"] + seasonal["bias"]  # [(c,) l, o], [(c,) o]
    if individual:
      kernel, bias = kernel[channel], bias[channel]
    want = np.zeros((L, C))
    want[:, channel] = kernel[:, step]
    np.testing.assert_allclose(result.scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
      result.target, SERIES[:, channel] @ kernel[:, step] + bias[step], rtol=1e-5
    )
    # Linear: SmoothGrad's noisy gradients are all the same (signed, per value).
    smooth = attribute(model, params, SERIES, "smoothgrad", target=target, batch_size=BATCH)
    np.testing.assert_allclose(smooth.scores, want, rtol=1e-5, atol=1e-6)


def test_evaluate_in_padded_chunks():
  """Points in chunks of `batch_size`, the last one padded to the compiled shape: the same values
  and gradients as one at a time."""
  model, params, x, target = case("dlinear")
  subject = Subject(model, params, x, target)
  points = subject.z[None] + jnp.asarray(np.random.default_rng(5).normal(0, 1, (7, L, C)))
  one = subject.evaluate(points, grad=True, batch_size=1)
  chunked = subject.evaluate(points, grad=True, batch_size=3)  # 3 + 3 + 1 (padded to 3).
  for a, b in zip(one, chunked, strict=True):
    assert a.shape == b.shape and a.shape[0] == 7
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert len(set(np.asarray(one[0]).round(6))) == 7  # Different points, different values.


def test_saliency_of_nlinear_is_its_weights_and_the_level_shift():
  """NLinear: forecast[o] = Σ_l W[l, o] (x_l − x_L) + b[o] + x_L, so the gradient is W[l, o], and
  at the last step W[L, o] + 1 − Σ_l W[l, o]."""
  model, params, x, target = case("nlinear")
  result = attribute(model, params, x, "saliency", target=target, batch_size=BATCH)
  w = np.asarray(params["linear"]["kernel"][:, 1], np.float64)
  want = np.zeros((L, C))
  want[:, 1] = w
  want[-1, 1] += 1 - w.sum()
  np.testing.assert_allclose(result.scores, want, rtol=1e-5, atol=1e-6)


# Faithfulness and model randomisation on a fitted model -----------------------------------------

FIT_L = 16


@pytest.fixture(scope="module")
def fitted():
  """NLinear fitted by least squares to y = 1.5 x[-3] − 0.5 x[-8] + noise (level-equivariant, as
  NLinear is), and a window where those two lags are far from the window mean."""
  rng = np.random.default_rng(7)
  xs = rng.normal(0, 1, (512, FIT_L))
  y = 1.5 * xs[:, -3] - 0.5 * xs[:, -8] + 0.05 * rng.normal(0, 1, 512)
  design = np.concatenate([xs - xs[:, -1:], np.ones((512, 1))], 1)
  coef = np.linalg.lstsq(design, y - xs[:, -1], rcond=None)[0]
  model = build(dict(arch="nlinear", input_len=FIT_L, horizon=1))
  params = {
    "linear": {
      "kernel": jnp.asarray(coef[:FIT_L, None], jnp.float32),
      "bias": jnp.asarray(coef[FIT_L:], jnp.float32),
    }
  }
  x = rng.normal(0, 0.5, (FIT_L, 1)).astype(np.float32)
  x[-3], x[-8] = 2.0, -2.0
  return model, params, x


def test_integrated_gradients_beat_random_orderings_on_a_fitted_model(fitted):
  model, params, x = fitted
  result = attribute(model, params, x, "integrated_gradients", batch_size=BATCH)
  assert_complete(result)
  assert set(np.argsort(-np.abs(result.scores[:, 0]))[:2]) == {FIT_L - 3, FIT_L - 8}
  subject = Subject(model, params, x)
  metrics = faithfulness(subject, result.scores)
  assert metrics["deletion_auc"] < metrics["random_deletion_auc"], metrics
  assert metrics["insertion_auc"] > metrics["random_insertion_auc"], metrics
  np.testing.assert_allclose(metrics["f_x"], result.target, rtol=1e-6)
  np.testing.assert_allclose(metrics["f_baseline"], result.baseline_target, rtol=1e-6)
  # The model is linear, so deleting a set of values removes their IG exactly: the normalised
  # deletion curve after k values is 1 − (their IG) / (F(x) − F(x')).
  order = np.argsort(-result.scores[:, 0], kind="stable")
  deletion, insertion = curves(subject, order)
  removed = np.concatenate([[0.0], np.cumsum(result.scores[order, 0])])
  change = result.target - result.baseline_target
  np.testing.assert_allclose(deletion, 1 - removed / change, atol=1e-4)
  np.testing.assert_allclose(insertion, removed / change, atol=1e-4)
  trapezoid = lambda c: float(np.sum((c[1:] + c[:-1]) / 2) / (len(c) - 1))
  assert metrics["deletion_auc"] == pytest.approx(trapezoid(deletion), abs=1e-6)
  assert metrics["insertion_auc"] == pytest.approx(trapezoid(insertion), abs=1e-6)
  # The reverse ranking deletes worst.
  reverse = faithfulness(subject, -result.scores)
  assert reverse["deletion_auc"] > metrics["random_deletion_auc"] > metrics["deletion_auc"]


def test_model_randomisation_changes_integrated_gradients(fitted):
  model, params, x = fitted
  check = randomisation_check(model, params, x, "integrated_gradients", batch_size=BATCH)
  assert set(check) == {"spearman"} and -1 <= check["spearman"] <= 1
  assert check["spearman"] < 0.9
  # The same number from the freshly initialised weights (seed 1) directly.
  fresh = model.init(jax.random.PRNGKey(1), x[None])["params"]
  scores = [
    attribute(model, p, x, "integrated_gradients", batch_size=BATCH).scores for p in (params, fresh)
  ]
  want = scipy.stats.spearmanr(np.abs(scores[0]).ravel(), np.abs(scores[1]).ravel()).statistic
  assert check["spearman"] == pytest.approx(want, abs=1e-9)


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 4, 30).astype(float), rng.normal(0, 1, 30)  # a has many ties.
  assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
  assert spearman(b, b) == pytest.approx(1.0) and spearman(b, -b) == pytest.approx(-1.0)
  assert spearman(np.ones(5), b[:5]) == 0.0  # No variation: no correlation.


def test_rollout_of_known_maps():
  eye = np.eye(5)
  np.testing.assert_array_equal(rollout([eye, eye, eye]), eye)
  np.testing.assert_array_equal(rollout([np.zeros((5, 5))]), eye)  # Empty rows stay put.
  rng = np.random.default_rng(0)
  m1, m2 = (np.tril(rng.uniform(0.1, 1.0, (5, 5))) for _ in range(2))

  def factor(m):
    return 0.5 * m / m.sum(-1, keepdims=True) + 0.5 * eye

  np.testing.assert_allclose(rollout([m1, m2]), factor(m2) @ factor(m1), rtol=1e-12)
  np.testing.assert_allclose(rollout([3 * m1]), factor(m1), rtol=1e-12)  # Scale-free.


# Errors ---------------------------------------------------------------------------------------


def test_language_model_errors():
  model, params, x, _ = case("transformer")
  with pytest.raises(ValueError, match="unknown attribution method 'nope'"):
    attribute(model, params, x, "nope")
  with pytest.raises(ValueError, match="needs a layer name"):
    attribute(model, params, x, "layer")
  with pytest.raises(ValueError, match="no tapped activation 'blocks_7/output'"):
    attribute(model, params, x, "layer", layer="blocks_7/output")
  with pytest.raises(ValueError, match="not stacked"):
    Subject(model, params, x, layer="blocks_0/output[0]")
  for position in (T, -T - 1):
    with pytest.raises(ValueError, match=f"position {position} is outside the {T} input tokens"):
      attribute(model, params, x, "saliency", target=Target(position=position))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    Subject(model, params, x, Target(token=VOCAB))
  for start, end in ((0, None), (5, 5), (1, T + 1)):
    with pytest.raises(ValueError, match="1 <= start < end"):
      attribute(model, params, x, target=Target(kind="span", start=start, end=end))
  with pytest.raises(ValueError, match="needs a forecaster"):
    attribute(model, params, x, target=Target(kind="forecast"))
  with pytest.raises(ValueError, match="unknown target"):
    Target(kind="bogus")
  with pytest.raises(ValueError, match="needs recurrent layers"):
    attribute(model, params, x, "hidden_attention")
  with pytest.raises(ValueError, match="non-empty 1-D"):
    Subject(model, params, np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="unknown baseline"):
    attribute(model, params, x, baseline="mean")
  with pytest.raises(ValueError, match="steps"):
    attribute(model, params, x, steps=0)
  with pytest.raises(ValueError, match="smoothgrad needs"):
    attribute(model, params, x, "smoothgrad", samples=0)
  with pytest.raises(ValueError, match="scores for"):
    faithfulness(Subject(model, params, x), np.zeros(T - 1))


def test_forecaster_errors():
  model, params, x, _ = case("dlinear")
  assert Subject(model, params, x).activation_names() == []  # Nothing tapped.
  for method in ("rollout", "hidden_attention"):
    with pytest.raises(ValueError, match="no token-mixing layers"):
      attribute(model, params, x, method)
  with pytest.raises(ValueError, match="no token-mixing layers"):
    hidden_attention(model, params, x[None])
  with pytest.raises(ValueError, match="needs a language model"):
    Subject(model, params, x, Target(kind="logprob"))
  with pytest.raises(ValueError, match="outside the"):
    Subject(model, params, x, Target(kind="forecast", step=H))
  with pytest.raises(ValueError, match="outside the"):
    Subject(model, params, x, Target(kind="forecast", channel=-C - 1))
  with pytest.raises(ValueError, match="unknown baseline"):
    attribute(model, params, x, baseline="pad")
  with pytest.raises(ValueError, match=r"\[l\] or \[l, c\]"):
    Subject(model, params, np.zeros((1, L, C), np.float32))


def test_token_baseline_outside_the_vocabulary_is_an_error():
  model, params, x, target = case("transformer")
  subject = Subject(model, params, x, target)
  for token in (VOCAB, -1):
    with pytest.raises(ValueError, match="vocabulary"):
      subject.baseline(token)
