"""Token-mixing maps: attention weights, the hidden attention of Mamba and the RG-LRU, rollout.

Hidden attention (Ali et al. 2024, "The Hidden Attention of Mamba Models"): a selective scan is a
linear map of its inputs, y_t = Σ_{s<=t} α_{t,s} ⊙ x_s (+ D ⊙ x_t), with per channel f

  Mamba    α_{t,s} = Σ_n C_t[n] · exp(A[f, n] · Σ_{k=s+1..t} Δ_k[f]) · Δ_s[f] · B_s[n]
  RG-LRU   α_{t,s} = (Π_{k=s+1..t} a_k[f]) · input_scale_s[f]     (h_t = Σ_s α_{t,s} x_s)

materialised here from the activations the modules tap (Mamba: x, dt, B, C; RG-LRU: x, a,
input_scale) and the layer's parameters (A_log, D). The sums over k are masked cumulative sums
started at each s, so a decay is as exact as the sequential scan's (no differences of large
running sums); an RG-LRU reset (a_t = 0 at a document start) gives log a_t = −inf and so α = 0
across it.

Rollout (Abnar & Zuidema 2020): R = Π_l (0.5·Ā_l + 0.5·I), each factor row-normalised, Ā_l the
layer's map (attention: mean over heads; hidden attention: mean |α| over channels). The row of
the explained position scores the input tokens. Griffin's layers contribute attention or hidden
attention as they are. Layers are found through `fulcrum.modules.blocks.layer_paths` (the one
owner of the parameter layout) and handled by their `mixer` kind, never by block class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jaxtyping import Array, Float

from fulcrum.modules import blocks
from fulcrum.modules.blocks import LayerPath
from fulcrum.modules.forecasting import SequenceForecaster


def _segment_sums(x: Float[Array, "b t f"]) -> Float[Array, "b t s f"]:
  """L[b, t, s] = Σ_{k=s+1..t} x_k for s <= t (0 above the diagonal; mask with `_causal`)."""
  t = x.shape[1]
  k, s = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  terms = jnp.where((k > s)[None, :, :, None], x[:, :, None, :], 0.0)  # [b, k, s, f]
  return jnp.cumsum(terms, axis=1)  # [b, t, s, f]: Σ_{s<k<=t}


def _causal(t: int) -> Array:
  """[1, t, s, 1] s <= t."""
  return (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, :, :, None]


@jax.jit
def mamba_hidden_attention(
  dt: Float[Array, "b t f"],
  A: Float[Array, "f n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
) -> Float[Array, "b f t s"]:
  """Mamba's hidden attention α (float32); y_t = Σ_s α[:, :, t, s] x_s + D x_t."""
  dt, A = dt.astype(jnp.float32), A.astype(jnp.float32)
  B, C = B.astype(jnp.float32), C.astype(jnp.float32)
  L = _segment_sums(dt)  # [b, t, s, f]
  causal = _causal(dt.shape[1])

  def add_state(acc, n):  # One state dimension at a time: memory [b, t, s, f], not × N.
    decay = jnp.where(causal, jnp.exp(L * A[:, n]), 0.0)
    term = C[:, :, None, n, None] * decay * (dt * B[:, :, n, None])[:, None]
    return acc + term, None

  alpha, _ = jax.lax.scan(add_state, jnp.zeros(L.shape, jnp.float32), jnp.arange(A.shape[1]))
  return alpha.transpose(0, 3, 1, 2)


@jax.jit
def rglru_hidden_attention(
  a: Float[Array, "b t f"], input_scale: Float[Array, "b t f"]
) -> Float[Array, "b f t s"]:
  """The RG-LRU's hidden attention α (float32); h_t = Σ_s α[:, :, t, s] x_s."""
  a = a.astype(jnp.float32)
  log_a = jnp.where(a > 0, jnp.log(jnp.where(a > 0, a, 1.0)), -jnp.inf)
  decay = jnp.where(_causal(a.shape[1]), jnp.exp(_segment_sums(log_a)), 0.0)
  alpha = decay * input_scale.astype(jnp.float32)[:, None]
  return alpha.transpose(0, 3, 1, 2)


def _channel_map(alpha: Float[Array, "b f t s"]) -> Float[Array, "b t s"]:
  return jnp.abs(alpha).mean(1)


def model_layers(model) -> list[LayerPath]:
  """Every layer of `model`'s block stack, in order (`fulcrum.modules.blocks.layer_paths`).

  Raises:
    ValueError: the model has no block stack (DLinear, NLinear).
  """
  c = getattr(model, "config", None)
  if c is None or getattr(c, "arch", None) not in blocks.BLOCK_ARCHS:
    raise ValueError(
      f"{type(model).__name__} has no token-mixing layers to roll out; use a gradient method "
      "(saliency, grad_x_input, integrated_gradients, smoothgrad)"
    )
  # A forecaster unrolls its stack whatever `scan_layers` says.
  return blocks.layer_paths(c, scanned=False if isinstance(model, SequenceForecaster) else None)


@functools.partial(jax.jit, static_argnames=("model",))
def collect(model, params, inputs):
  """(intermediates, attention weights) of one forward pass: the taps and maps read here."""
  _, state = model.apply({"params": params}, inputs, mutable=["intermediates", "attention"])
  return state.get("intermediates", {}), state.get("attention", {})


def layer_maps(model, params, inputs) -> list[tuple[str, str, np.ndarray]]:
  """Per layer (name, kind, [t, t] map) for one example (`inputs` [1, ...]).

  kind: attention (mean over heads), mamba or rg_lru (mean |α| over channels). Layers without
  token mixing are absent. For the full α per channel use `hidden_attention`.
  """
  layers = model_layers(model)
  params = nn.meta.unbox(params)
  inter, attn = collect(model, params, inputs)
  out = []
  for layer in layers:
    if layer.mixer == "attention":
      weights = layer.subtree(attn, *layer.block.mixer_path)["weights"][0]  # [1, h, t, s]
      out.append((layer.name, "attention", np.asarray(weights[0].mean(0))))
    else:
      alpha, kind = hidden_attention_of_layer(params, inter, layer)
      out.append((layer.name, kind, np.asarray(_channel_map(alpha)[0])))
  return out


def hidden_attention_of_layer(params, inter, layer: LayerPath):
  """(α [b, f, t, s], kind) of one recurrent layer from its tapped activations.

  Args:
    params: the model's (unboxed) parameters.
    inter: its "intermediates" collection (`collect`).
    layer: the layer (`model_layers`); its `mixer` is mamba or rg_lru.
  """
  acts = layer.subtree(inter, *layer.block.mixer_path)
  if layer.mixer == "mamba":
    A = -jnp.exp(layer.subtree(params, *layer.block.mixer_path)["A_log"])
    return mamba_hidden_attention(acts["dt"][0], A, acts["B"][0], acts["C"][0]), "mamba"
  if layer.mixer == "rg_lru":
    return rglru_hidden_attention(acts["a"][0], acts["input_scale"][0]), "rg_lru"
  raise ValueError(f"{layer.name} ({layer.mixer}) has no hidden attention")


def hidden_attention(model, params, inputs) -> dict[str, np.ndarray]:
  """The full hidden attention α [f, t, s] of every recurrent layer of one example, by layer."""
  params = nn.meta.unbox(params)
  layers = [layer for layer in model_layers(model) if layer.mixer != "attention"]
  inter, _ = collect(model, params, inputs)
  return {
    layer.name: np.asarray(hidden_attention_of_layer(params, inter, layer)[0][0])
    for layer in layers
  }


def _row_normalise(m: np.ndarray) -> np.ndarray:
  sums = m.sum(-1, keepdims=True)
  return np.where(sums > 0, m / np.where(sums > 0, sums, 1.0), np.eye(m.shape[-1]))


def rollout(maps: list[np.ndarray]) -> np.ndarray:
  """R = Π_l row_normalise(0.5·Ā_l + 0.5·I), first layer rightmost; every row sums to 1."""
  t = maps[0].shape[0] if maps else 0
  r = np.eye(t)
  for m in maps:
    factor = _row_normalise(0.5 * _row_normalise(np.asarray(m, np.float64)) + 0.5 * np.eye(t))
    r = factor @ r
  return r
