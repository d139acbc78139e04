"""Gradient attribution for every model here: saliency, gradient × input, integrated gradients,
SmoothGrad and layer attribution, through one differentiable view of the model.

A `Subject` is one input to explain: a model (any LM architecture, or a forecaster), its params,
the input (tokens or a series) and a `Target` (a next-token logit or log-probability, a span's
log-likelihood, a forecast value). Token inputs are attributed at the embeddings, series at
their values. Both, and every activation a module taps by name (`fulcrum.modules.layers.tap`:
block outputs, Mamba's x/dt/B/C/gate, the RG-LRU's x/a/input_scale, attention keys/values), are
reached the same way: the model runs with a "perturbations" collection that adds δ to the
activation, so replacing activation a by z is δ = z − a and ∂F/∂z = ∂F/∂δ. Many points (the
integrated-gradients path, SmoothGrad samples) run as one batch through a jitted function.

Per-position scores for token inputs: signed methods (gradient × input, integrated gradients,
layer attribution) sum over the embedding dimension — so integrated gradients' scores add up to
F(x) − F(x') (completeness) — and the unsigned ones (saliency, SmoothGrad) take the L2 norm of
the gradient. For series every value keeps its own score (signed gradient for saliency).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

GRADIENT_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "layer")
TARGET_KINDS = ("logprob", "logit", "span", "forecast")


@dataclasses.dataclass(frozen=True)
class Target:
  """The scalar F(x) an attribution explains.

  Attributes:
    kind: logprob | logit (of `token` predicted at `position`), span (the log-likelihood of
      tokens[start:end] given what precedes them), forecast (the forecast at `step`, `channel`).
    position: LM: the position whose next-token prediction is explained (-1 = last).
    token: LM: the predicted token; None = the model's argmax there.
    start, end: span: the tokens scored (end None = to the end); start >= 1.
    step, channel: forecast: the horizon step and channel.
  """

  kind: str = "logprob"
  position: int = -1
  token: int | None = None
  start: int = 1
  end: int | None = None
  step: int = 0
  channel: int = 0

  def __post_init__(self):
    if self.kind not in TARGET_KINDS:
      raise ValueError(f"unknown target {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")

  def indices(self) -> jax.Array:
    """The numeric fields, resolved (`Subject` fills token and end), as one int32 array: they
    enter compiled functions as data, so a new token or position does not recompile."""
    fields = (self.position, self.token, self.start, self.end, self.step, self.channel)
    return jnp.asarray([-1 if f is None else f for f in fields], jnp.int32)

  def value(self, out: jax.Array, tokens: jax.Array | None) -> jax.Array:
    """[m] target values from model outputs (logits [m, t, v] or forecasts [m, o, c])."""
    return target_value(self.kind, self.indices(), out, tokens)

  def describe(self, token_text=str) -> str:
    if self.kind == "forecast":
      return f"forecast at step {self.step}, channel {self.channel}"
    if self.kind == "span":
      return f"log-likelihood of tokens {self.start}:{'' if self.end is None else self.end}"
    kind = "log p" if self.kind == "logprob" else "logit"
    return f"{kind}({token_text(self.token)!r}) at position {self.position}"


def target_value(kind: str, idx: jax.Array, out: jax.Array, tokens: jax.Array | None) -> jax.Array:
  """[m] values of a target of `kind` with resolved `Target.indices()` (traced: no recompiles)."""
  position, token, start, end, step, channel = (idx[i] for i in range(6))
  if kind == "forecast":
    return jnp.take(jnp.take(out, step, axis=1), channel, axis=1)
  if kind == "span":
    logp = jax.nn.log_softmax(out[:, :-1], -1)  # Predictions of tokens 1..t-1.
    scored = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    t = jnp.arange(1, out.shape[1])
    return jnp.where((t >= start) & (t < end), scored, 0.0).sum(-1)
  logits = jnp.take(out, position, axis=1)
  scores = jax.nn.log_softmax(logits, -1) if kind == "logprob" else logits
  return jnp.take(scores, token, axis=1)


@dataclasses.dataclass
class Attribution:
  """What `attribute` returns.

  Attributes:
    method: the method's name.
    scores: per position [t] (token inputs, or a layer's positions) or per value [l, c] (series).
    target: F(x), the explained value.
    raw: the attribution before the per-position reduction ([t, d] at the embeddings; None for
      map-based methods).
    baseline_target: F(x') of integrated gradients' baseline.
    completeness_gap: |Σ IG − (F(x) − F(x'))| / |F(x) − F(x')| (integrated gradients).
    maps: per-layer [t, t] token-mixing maps and their rollout (map-based methods).
    layer: the tapped activation attributed (layer attribution).
    steps: gradient evaluations spent (integrated gradients' adaptive quadrature).
  """

  method: str
  scores: np.ndarray
  target: float
  raw: np.ndarray | None = None
  baseline_target: float | None = None
  completeness_gap: float | None = None
  maps: dict[str, np.ndarray] | None = None
  layer: str | None = None
  steps: int | None = None


Address = tuple[tuple[str, ...], int | None]  # (path in the perturbations tree, stacked index)


def _is_tokens(x: np.ndarray) -> bool:
  return np.issubdtype(np.asarray(x).dtype, np.integer)


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
  flat = traverse_util.flatten_dict(tree)
  flat[path] = value
  return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnames=("model",))
def _probe(model, params, inputs):
  """Outputs, tapped activations and the (zero) perturbations tree of one forward pass."""
  out, state = model.apply({"params": params}, inputs, mutable=["intermediates", "perturbations"])
  return out, state.get("intermediates", {}), state.get("perturbations", {})


def _forward(model, params, inputs, z, base, kind: str, idx, address: Address | None):
  """[m] target values with the activation at `address` replaced by z [m, ...] (base [1, ...]
  is its clean value); address None: z is the model input itself (series)."""
  if address is None:
    return target_value(kind, idx, model.apply({"params": params}, z), None)
  shapes = jax.eval_shape(
    lambda: model.apply({"params": params}, inputs, mutable=["perturbations"])[1]
  )["perturbations"]
  deltas = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  path, index = address
  leaf = traverse_util.flatten_dict(deltas)[path]
  delta = (z - base).astype(leaf.dtype)
  deltas = _set_leaf(deltas, path, delta if index is None else leaf.at[index].set(delta))
  out = model.apply({"params": params, "perturbations": deltas}, inputs)
  return target_value(kind, idx, out, inputs)


@functools.partial(jax.jit, static_argnames=("model", "kind", "address", "grad"))
def evaluate_batch(model, params, inputs, z, base, kind, idx, address, grad):
  """F at a batch z [m, ...] of replacement activations, and ∂F/∂z with `grad` (jitted)."""
  f = lambda z: _forward(model, params, inputs, z, base, kind, idx, address)
  if not grad:
    return f(z), None
  values, vjp = jax.vjp(f, z)
  return values, vjp(jnp.ones_like(values))[0]


class Subject:
  """One input to explain and a differentiable view of the model at an activation.

  Args:
    model: an LM (token inputs) or a forecaster (series inputs).
    params: its parameters.
    inputs: tokens [t] (int) or a series [l, c] / [l] (float).
    target: what to explain; default: the log-probability of the model's top next token at
      the last position (LMs), the first forecast step of channel 0 (forecasters).
    layer: attribute at this tapped activation (`activation_names`), not at the input.
  """

  def __init__(self, model, params, inputs, target: Target | None = None, layer: str | None = None):
    self.model, self.params = model, nn.meta.unbox(params)
    x = np.asarray(inputs)
    self.tokens = _is_tokens(x)
    if self.tokens:
      if x.ndim != 1 or x.size == 0:
        raise ValueError(f"token inputs must be a non-empty 1-D sequence, got shape {x.shape}")
      self.inputs = jnp.asarray(x[None], jnp.int32)
    else:
      x = x[:, None] if x.ndim == 1 else x
      if x.ndim != 2:
        raise ValueError(f"series inputs must be [l] or [l, c], got shape {x.shape}")
      self.inputs = jnp.asarray(x[None], jnp.float32)
    out, inter, perturbations = _probe(model, params, self.inputs)
    self.intermediates = inter
    self._paths = {
      path: leaf.shape for path, leaf in traverse_util.flatten_dict(perturbations).items()
    }
    target = target or Target(kind="logprob" if self.tokens else "forecast")
    if self.tokens and target.kind == "forecast":
      raise ValueError("a forecast target needs a forecaster; this model takes tokens")
    if not self.tokens and target.kind != "forecast":
      raise ValueError(f"target {target.kind!r} needs a language model; use kind='forecast'")
    self.vocab_size = out.shape[-1] if self.tokens else 0
    self.target = self._resolve(target, out)
    self.layer = layer
    if layer is not None:
      self.address = self._address(layer)
    elif self.tokens:
      self.address = (("embeddings",), None)
    else:
      self.address = None
    self.z = self.activation(self.address)

  def _resolve(self, target: Target, out) -> Target:
    if self.tokens:
      t = self.inputs.shape[1]
      if target.kind in ("logprob", "logit"):
        pos = target.position % t if -t <= target.position < t else None
        if pos is None:
          raise ValueError(f"target position {target.position} is outside the {t} input tokens")
        token = int(jnp.argmax(out[0, pos])) if target.token is None else target.token
        if not 0 <= token < out.shape[-1]:
          raise ValueError(f"target token {token} is outside the vocabulary ({out.shape[-1]})")
        return dataclasses.replace(target, position=pos, token=token)
      end = t if target.end is None else target.end
      if not 1 <= target.start < end <= t:
        raise ValueError(
          f"span {target.start}:{end} must satisfy 1 <= start < end <= {t} (the first token "
          "has no prediction to score)"
        )
      return dataclasses.replace(target, end=end)
    o, c = out.shape[1:]
    if not (-o <= target.step < o and -c <= target.channel < c):
      raise ValueError(f"forecast target step/channel outside the [{o}, {c}] forecast")
    return dataclasses.replace(target, step=target.step % o, channel=target.channel % c)

  # Tapped activations ------------------------------------------------------------------

  def activation_names(self) -> list[str]:
    """Every tapped activation, by name (stacked layer groups: one name per layer, `[i]`)."""
    names = []
    stacked = self._stacked_paths()
    for path, shape in self._paths.items():
      name = "/".join(path)
      if path in stacked:
        names += [f"{name}[{i}]" for i in range(shape[0])]
      else:
        names.append(name)
    return names

  def _stacked_paths(self) -> set[tuple[str, ...]]:
    # Under nn.scan (`model.scan_layers`, params under "blocks", not "blocks_i") a tap gains a
    # leading layer axis before the batch.
    return {p for p in self._paths if p[0] == "blocks"}

  def _address(self, name: str) -> Address:
    base, _, index = name.partition("[")
    path = tuple(base.split("/"))
    if path not in self._paths:
      some = ", ".join(self.activation_names()[:8])
      raise ValueError(f"no tapped activation {name!r}; some of this model's: {some}, ...")
    if path in self._stacked_paths():
      if not index.endswith("]") or not index[:-1].isdigit():
        raise ValueError(f"{base} is stacked over layers; name one, e.g. {base}[0]")
      i = int(index[:-1])
      if i >= self._paths[path][0]:
        raise ValueError(f"{base} has {self._paths[path][0]} layers; got index {i}")
      return path, i
    if index:
      raise ValueError(f"{base} is not stacked over layers; drop the [{index}")
    return path, None

  def activation(self, address: Address | None, intermediates=None) -> jax.Array:
    """The activation at `address` for the one example: [t, ...] (or the series itself)."""
    if address is None:
      return self.inputs[0]
    path, index = address
    flat = traverse_util.flatten_dict(
      self.intermediates if intermediates is None else intermediates, keep_empty_nodes=False
    )
    value = flat[path][0]
    return value[0] if index is None else value[index][0]

  # Evaluation ----------------------------------------------------------------------------

  def _batched_inputs(self, m: int):
    return jnp.broadcast_to(self.inputs, (m, *self.inputs.shape[1:]))

  def evaluate(self, z: jax.Array, grad: bool = False, batch_size: int = 32):
    """F at a batch of replacement activations z [m, ...] (and ∂F/∂z with `grad`), in chunks
    of `batch_size`, each padded to a power of two (so a few compiled shapes serve every
    call)."""
    values, grads = [], []
    base = self.z[None]
    for i in range(0, z.shape[0], batch_size):
      chunk = z[i : i + batch_size]
      n = chunk.shape[0]
      size = min(batch_size, 1 << (n - 1).bit_length())  # Pad to a power of two: few shapes.
      if size > n:
        pad = jnp.broadcast_to(chunk[-1:], (size - n, *chunk.shape[1:]))
        chunk = jnp.concatenate([chunk, pad])
      v, g = evaluate_batch(
        self.model,
        self.params,
        self._batched_inputs(chunk.shape[0]),
        chunk,
        base,
        self.target.kind,
        self.target.indices(),
        self.address,
        grad,
      )
      values.append(v[:n])
      if grad:
        grads.append(g[:n])
    values = jnp.concatenate(values)
    return (values, jnp.concatenate(grads)) if grad else values

  def value(self) -> float:
    return float(self.evaluate(self.z[None])[0])

  # Baselines -----------------------------------------------------------------------------

  def baseline(self, kind: str | int | np.ndarray | None = None) -> jax.Array:
    """The reference x' (same shape as the attributed activation).

    pad (default for tokens: every token replaced by token 0, the byte tokenizer's NUL) | an
    int token id (the same with that token) | mean (default for series: each channel's window
    mean) | zero | an array. A layer's baseline is its activation on the baseline input (as
    Captum's layer integrated gradients). The zero embedding — integrated gradients' classic
    text baseline — is degenerate for pre-norm models: RMSNorm(αx) = RMSNorm(x) for all α > 0,
    so F jumps in the first ~1e-5 of the path and any quadrature misses it (the completeness
    gap shows it); hence the default.
    """
    if kind is None:
      kind = "pad" if self.tokens else "mean"
    if isinstance(kind, np.ndarray | jax.Array):
      return jnp.broadcast_to(jnp.asarray(kind, self.z.dtype), self.z.shape)
    if kind == "zero":
      return jnp.zeros_like(self.z)
    if self.tokens:
      if kind == "pad":
        kind = 0
      if not (isinstance(kind, int | np.integer) or str(kind).isdigit()):
        raise ValueError(f"unknown baseline {kind!r} for token inputs; use pad, zero or a token id")
      if not 0 <= int(kind) < self.vocab_size:
        raise ValueError(
          f"baseline token {kind} is outside the vocabulary (0..{self.vocab_size - 1})"
        )
      base_input = jnp.full_like(self.inputs, int(kind))
    else:
      if kind != "mean":
        raise ValueError(f"unknown baseline {kind!r} for series inputs; use mean, zero or an array")
      base_input = jnp.broadcast_to(self.inputs.mean(1, keepdims=True), self.inputs.shape)
    if self.address is None:
      return base_input[0]
    _, inter, _ = _probe(self.model, self.params, base_input)
    return self.activation(self.address, inter)

  # Per-position reductions -------------------------------------------------------------

  def reduce(self, raw: jax.Array, signed: bool) -> np.ndarray:
    """Per-position scores: sum (signed) or L2 norm over feature axes; series keep values."""
    raw = np.asarray(raw, np.float64)
    if self.address is None:
      return raw if signed else np.abs(raw)
    axes = tuple(range(1, raw.ndim))
    return raw.sum(axes) if signed else np.sqrt((raw**2).sum(axes))


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Nodes and weights of `steps`-point Gauss–Legendre quadrature on [0, 1]."""
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  return (nodes + 1) / 2, weights / 2


def saliency(subject: Subject, batch_size: int = 32) -> Attribution:
  """∂F/∂x (Simonyan et al. 2014): per token its L2 norm over the embedding; per series value
  the signed gradient."""
  value, grad = subject.evaluate(subject.z[None], grad=True, batch_size=batch_size)
  raw = grad[0]
  signed = subject.address is None  # Series values; embeddings and layers: the norm.
  return Attribution("saliency", subject.reduce(raw, signed), float(value[0]), raw=np.asarray(raw))


def grad_x_input(subject: Subject, batch_size: int = 32) -> Attribution:
  """x ⊙ ∂F/∂x, summed over the embedding per token."""
  value, grad = subject.evaluate(subject.z[None], grad=True, batch_size=batch_size)
  raw = grad[0] * subject.z
  return Attribution(
    "grad_x_input", subject.reduce(raw, True), float(value[0]), raw=np.asarray(raw)
  )


PANEL_NODES = 8  # Gauss–Legendre points per panel of the integrated-gradients path.


def integrated_gradients(
  subject: Subject,
  baseline: Any = None,
  steps: int = 64,
  batch_size: int = 32,
  method: str = "integrated_gradients",
  tolerance: float = 0.002,
  max_steps: int = 1024,
) -> Attribution:
  """(x − x') ⊙ ∫₀¹ ∂F/∂x (x' + α(x − x')) dα (Sundararajan et al. 2017), adaptively.

  The path [0, 1] is cut into panels of `PANEL_NODES` Gauss–Legendre points (`steps` points to
  start). Because Σ_i (x − x')_i ∂F/∂x_i = dF/dα along the path, each panel [a, b] has an
  exact reference, F(b) − F(a) (two forward passes): panels whose quadrature misses it by more
  than their share of `tolerance` · |F(x) − F(x')| are halved, worst first, until the
  completeness gap |Σ IG − (F(x) − F(x'))| / |F(x) − F(x')| is within `tolerance` or
  `max_steps` gradient evaluations are spent. Trained models have sharp transitions along the
  path (softmax saturation), where a fixed rule of 64 points can be off by 10%; this spends
  points there. All points of a round run as one batch.

  Returns:
    An Attribution with `completeness_gap` and `steps` (gradient evaluations used).
  """
  if steps < 1 or max_steps < steps:
    raise ValueError(
      f"integrated gradients needs 1 <= steps <= max_steps, got {steps}, {max_steps}"
    )
  x, x0 = subject.z, subject.baseline(baseline)
  delta = x - x0
  shape = (-1,) + (1,) * x.ndim
  nodes, weights = gauss_legendre(PANEL_NODES)

  def points(alphas):
    return x0[None] + jnp.asarray(alphas, x.dtype).reshape(shape) * delta[None]

  def integrate(panels):
    """Each panel's contribution [*z.shape] (float64) and its exact F(b) − F(a)."""
    alphas = np.concatenate([a + (b - a) * nodes for a, b in panels])
    edges = np.array([e for panel in panels for e in panel])
    f_edges = np.asarray(subject.evaluate(points(edges), batch_size=batch_size), np.float64)
    _, grads = subject.evaluate(points(alphas), grad=True, batch_size=batch_size)
    grads = np.asarray(grads, np.float64).reshape(len(panels), PANEL_NODES, *x.shape)
    w = np.asarray([(b - a) * weights for a, b in panels])  # [p, nodes]
    parts = np.einsum("pn,pn...->p...", w, grads) * np.asarray(delta, np.float64)
    return list(parts), list(f_edges[1::2] - f_edges[0::2])

  count = max(1, -(-steps // PANEL_NODES))
  panels = [(k / count, (k + 1) / count) for k in range(count)]
  parts, exact = integrate(panels)
  used = count * PANEL_NODES
  f_x, f_0 = (float(v) for v in subject.evaluate(jnp.stack([x, x0]), batch_size=batch_size))
  scale = max(abs(f_x - f_0), 1e-12)
  while True:
    errors = np.array([abs(p.sum() - e) for p, e in zip(parts, exact, strict=True)])
    gap = abs(sum(p.sum() for p in parts) - (f_x - f_0)) / scale
    budget = (max_steps - used) // (2 * PANEL_NODES)
    if gap <= tolerance or budget < 1:
      break
    worst = [i for i in np.argsort(-errors)[:budget] if errors[i] > tolerance * scale / 4]
    if not worst:
      break
    halves = [
      h
      for i in worst
      for h in ((panels[i][0], sum(panels[i]) / 2), (sum(panels[i]) / 2, panels[i][1]))
    ]
    new_parts, new_exact = integrate(halves)
    used += len(halves) * PANEL_NODES
    keep = [i for i in range(len(panels)) if i not in set(worst)]
    panels = [panels[i] for i in keep] + halves
    parts = [parts[i] for i in keep] + new_parts
    exact = [exact[i] for i in keep] + new_exact
  raw = np.sum(parts, axis=0)
  return Attribution(
    method,
    subject.reduce(raw, True),
    f_x,
    raw=raw,
    baseline_target=f_0,
    completeness_gap=float(gap),
    layer=subject.layer,
    steps=used,
  )


def smoothgrad(
  subject: Subject, samples: int = 32, noise: float = 0.1, seed: int = 0, batch_size: int = 32
) -> Attribution:
  """Mean gradient under Gaussian noise N(0, σ²), σ = noise · (max x − min x) (Smilkov et al.
  2017); per token the L2 norm of the mean gradient, per series value the signed mean."""
  if samples < 1 or not 0 <= noise < float("inf"):  # `not`: a NaN noise fails too.
    raise ValueError(f"smoothgrad needs samples >= 1 and noise >= 0, got {samples}, {noise}")
  x = subject.z
  sigma = noise * float(x.max() - x.min())
  eps = jax.random.normal(jax.random.PRNGKey(seed), (samples, *x.shape), x.dtype) * sigma
  _, grads = subject.evaluate(x[None] + eps, grad=True, batch_size=batch_size)
  raw = grads.mean(0)
  signed = subject.address is None
  return Attribution(
    "smoothgrad", subject.reduce(raw, signed), subject.value(), raw=np.asarray(raw)
  )
