"""Attribution: one engine across transformer, SSM, hybrid and forecasting models.

  attribute(model, params, inputs, method, target=Target(...)) -> Attribution
  faithfulness(subject, scores) -> deletion / insertion AUC against random orderings
  randomisation_check(model, params, inputs, method) -> Spearman ρ trained vs random weights

Methods: saliency, grad_x_input, integrated_gradients, smoothgrad (gradients at the embeddings
or series values, `core.py`), rollout and hidden_attention (token-mixing maps, `maps.py`), and
layer (integrated gradients at any tapped activation, by name). `explain.py` is the
`fulcrum attribute` workflow on a workdir (`explain_workdir`, `render`); it is not imported
here, so the engine loads without the trainer's workdir machinery.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fulcrum.platform.attribution.core import (
  Attribution,
  Subject,
  Target,
  grad_x_input,
  integrated_gradients,
  saliency,
  smoothgrad,
)
from fulcrum.platform.attribution.faithfulness import faithfulness, spearman
from fulcrum.platform.attribution.maps import (
  hidden_attention,
  layer_maps,
  mamba_hidden_attention,
  rglru_hidden_attention,
  rollout,
)

METHODS = (
  "saliency",
  "grad_x_input",
  "integrated_gradients",
  "smoothgrad",
  "rollout",
  "hidden_attention",
  "layer",
)

__all__ = [
  "METHODS",
  "Attribution",
  "Subject",
  "Target",
  "attribute",
  "faithfulness",
  "hidden_attention",
  "layer_maps",
  "mamba_hidden_attention",
  "randomisation_check",
  "rglru_hidden_attention",
  "rollout",
]


def _map_attribution(subject: Subject, method: str) -> Attribution:
  maps = layer_maps(subject.model, subject.params, subject.inputs)
  kinds = {kind for _, kind, _ in maps}
  if method == "hidden_attention" and kinds <= {"attention"}:
    raise ValueError(
      "hidden_attention needs recurrent layers (mamba, hawk, griffin); this model has only "
      "attention — use rollout"
    )
  r = rollout([m for _, _, m in maps])
  target = subject.target
  if target.kind == "span":
    row = r[target.start - 1 : target.end - 1].mean(0)
  elif target.kind == "forecast":
    row = r[-1]  # The forecaster's head reads the last step.
  else:
    row = r[target.position]
  scores = row if subject.tokens else np.repeat(row[:, None], subject.z.shape[-1], 1)
  named = {f"{name} ({kind})": m for name, kind, m in maps}
  return Attribution(method, scores, subject.value(), maps={**named, "rollout": r})


def attribute(
  model,
  params,
  inputs,
  method: str = "integrated_gradients",
  *,
  target: Target | None = None,
  baseline: Any = None,
  steps: int = 64,
  tolerance: float = 0.002,
  max_steps: int = 1024,
  samples: int = 32,
  noise: float = 0.1,
  layer: str | None = None,
  seed: int = 0,
  batch_size: int = 32,
) -> Attribution:
  """Attributes `target` of one input to its tokens / series values (or to a layer).

  Args:
    model: an LM of any architecture or a forecaster.
    params: its parameters.
    inputs: tokens [t] (int) or a series [l, c] / [l].
    method: one of `METHODS`.
    target: what to explain (`Target`); default: log p of the top next token at the last
      position, or the first forecast step of channel 0.
    baseline: integrated gradients' x' and the deletion metrics' replacement
      (`Subject.baseline`): pad (tokens' default) | a token id | mean (series' default) | zero |
      an array.
    steps, tolerance, max_steps: integrated gradients' starting quadrature points, target
      completeness gap and budget of gradient evaluations (adaptive; see `core`).
    samples, noise: SmoothGrad's sample count and σ as a fraction of the input's range.
    layer: the tapped activation for method "layer" (`Subject.activation_names()`).
    seed: SmoothGrad's noise.
    batch_size: points per compiled forward/backward pass.

  Raises:
    ValueError: an unknown method, a bad target or layer, a map method on a model without
      token-mixing layers.
  """
  if method not in METHODS:
    raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
  if method == "layer" and not layer:
    raise ValueError("method 'layer' needs a layer name (e.g. blocks_0/output)")
  subject = Subject(model, params, inputs, target, layer if method == "layer" else None)
  if method == "saliency":
    return saliency(subject, batch_size)
  if method == "grad_x_input":
    return grad_x_input(subject, batch_size)
  if method in ("integrated_gradients", "layer"):
    return integrated_gradients(
      subject, baseline, steps, batch_size, method=method, tolerance=tolerance, max_steps=max_steps
    )
  if method == "smoothgrad":
    return smoothgrad(subject, samples, noise, seed, batch_size)
  return _map_attribution(subject, method)


def randomisation_check(
  model, params, inputs, method: str = "integrated_gradients", seed: int = 1, **kwargs
) -> dict[str, float]:
  """Spearman ρ of |scores| between the trained model and the same model with freshly
  initialised weights (Adebayo et al. 2018); a method that explains the model gives low ρ."""
  import jax

  x = np.asarray(inputs)
  batch = (
    x[None] if np.issubdtype(x.dtype, np.integer) else (x[:, None] if x.ndim == 1 else x)[None]
  )
  random_params = model.init(jax.random.PRNGKey(seed), batch)["params"]  # Boxed: Subject unboxes.
  # The same target for both (the trained model's top token, not the random model's).
  kwargs["target"] = Subject(model, params, inputs, kwargs.get("target")).target
  trained = attribute(model, params, inputs, method, **kwargs)
  shuffled = attribute(model, random_params, inputs, method, **kwargs)
  return {"spearman": spearman(np.abs(trained.scores), np.abs(shuffled.scores))}
