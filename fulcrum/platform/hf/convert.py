"""The vocabulary every model family's Hugging Face conversion is written in.

A family module (`convert_llama`, `convert_mamba`, `convert_recurrent_gemma`) describes one
Hugging Face `model_type` as a `Converter`: how its config.json maps onto `ModelConfig`, and a
list of `Rule`s saying which checkpoint tensor becomes which Fulcrum parameter, with the `Layout`
change between them. The config helpers here give every family the same one-line `UserError`s.
This module knows no family; `pretrained` runs the converters that `registry` collects.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fulcrum.modules import ModelConfig
from fulcrum.platform.errors import UserError

__all__ = [
  "CONV",
  "LM_HEAD",
  "PLUS_ONE",
  "SAME",
  "Converter",
  "Layout",
  "Rule",
  "attention_heads",
  "check_implements",
  "linear",
  "required",
  "rope",
  "unsupported",
]

# --- tensor layouts ---------------------------------------------------------------------------


class Layout(NamedTuple):
  """How a checkpoint tensor's layout maps to a Fulcrum parameter of shape `shape`."""

  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  to_fulcrum: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda shape: shape, lambda a, shape: a, lambda a: a)


def linear(in_axes: int = 1) -> Layout:
  """A torch `Linear` weight [out, in] as a DenseGeneral kernel [*in_dims, *out_dims].

  `in_axes` counts the kernel's input axes: 1 for q/k/v/MLP ([d, h, e], [d, f]), 2 for the
  attention output ([h, e, d]).
  """

  def split(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(shape[:in_axes]), math.prod(shape[in_axes:])

  def to_hf(kernel: np.ndarray) -> np.ndarray:
    n_in, n_out = split(kernel.shape)
    return kernel.reshape(n_in, n_out).T

  return Layout(lambda shape: split(shape)[::-1], lambda a, shape: a.T.reshape(shape), to_hf)


# A torch depthwise Conv1d weight [f, 1, w] as a CausalConv1D kernel [w, f]. Both put the weight of
# the current input last: torch pads w - 1 inputs on the left and keeps the first t outputs.
CONV = Layout(
  lambda shape: (shape[1], 1, shape[0]),
  lambda a, shape: a[:, 0, :].T,
  lambda kernel: kernel.T[:, None, :],
)

# A Gemma-style norm weight w (the norm scales by 1 + w) as a plain RMSNorm scale (1 + w).
PLUS_ONE = Layout(lambda shape: shape, lambda a, shape: a + 1, lambda scale: scale - 1)


# --- rules and converters ---------------------------------------------------------------------


class Rule(NamedTuple):
  """One checkpoint tensor ↔ one Fulcrum parameter (a path into the params tree)."""

  hf_name: str
  path: tuple[str, ...]
  layout: Layout = SAME


# The output projection of every supported causal LM; absent when it is tied to the embedding.
LM_HEAD = Rule("lm_head.weight", ("lm_head", "kernel"), linear())


@dataclasses.dataclass(frozen=True)
class Converter:
  """How one Hugging Face `model_type` maps onto Fulcrum.

  Attributes:
    architectures: the `architectures` entries of config.json this converter reads.
    to_config: config.json (a dict) → `ModelConfig` keyword arguments; raises `UserError` for
      features Fulcrum does not implement.
    rules: the tensor ↔ parameter rules for a `ModelConfig`, one parameter subtree per layer
      (`layer_paths(config, scanned=False)`); `save_pretrained` unstacks a scanned model first.
    to_hf_config: `ModelConfig` → the config.json dict (None: import only).
    ignored: substrings of checkpoint tensor names that carry no weights (e.g. cached buffers).
  """

  architectures: tuple[str, ...]
  to_config: Callable[[Mapping[str, Any]], dict[str, Any]]
  rules: Callable[[ModelConfig], list[Rule]]
  to_hf_config: Callable[[ModelConfig], dict[str, Any]] | None = None
  ignored: tuple[str, ...] = ()


# --- config.json helpers ----------------------------------------------------------------------


def required(hf: Mapping[str, Any], key: str) -> Any:
  """config.json's value for `key`, which must be present and not null."""
  if hf.get(key) is None:
    raise UserError(f"config.json lacks required key {key!r}; re-download or re-save the config")
  return hf[key]


def unsupported(key: str, value: Any, fix: str) -> UserError:
  """The error for a config.json value Fulcrum does not implement; `fix` says what would do."""
  return UserError(f"config.json sets {key}={json.dumps(value)}, not supported by Fulcrum; {fix}")


def check_implements(hf: Mapping[str, Any], implements: Mapping[str, Any]) -> None:
  """Refuses config.json values other than those Fulcrum implements (absent keys are fine)."""
  for key, implemented in implements.items():
    if hf.get(key, implemented) != implemented:
      raise unsupported(key, hf[key], f"only {key}={json.dumps(implemented)} is implemented")


def attention_heads(hf: Mapping[str, Any]) -> tuple[int, int]:
  """(num_attention_heads, num_key_value_heads); transformers' default for the latter is the
  former (multi-head, not multi-query attention)."""
  heads = required(hf, "num_attention_heads")
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise UserError(
      f"num_attention_heads={heads} is not a multiple of num_key_value_heads="
      f"{kv_heads} in config.json; fix config.json"
    )
  return heads, kv_heads


def rope(hf: Mapping[str, Any], partial_default: float | None = None) -> tuple[float, float]:
  """(rope_theta, partial_rotary_factor) from transformers 4.x keys (rope_theta, rope_scaling,
  partial_rotary_factor) or 5.x (rope_parameters).

  Only plain RoPE is implemented: scaling (linear, dynamic, yarn, llama3...) is refused, and so is
  a partial rotary factor unless `partial_default` (the model's default factor) is given.
  """
  theta, fraction = None, partial_default
  for key in ("", "rope_scaling", "rope_parameters"):
    params = hf if not key else hf.get(key) or {}
    params = params if isinstance(params, dict) else {"rope_type": params}
    name = "rope_type" if "rope_type" in params or "type" not in params else "type"
    checks = [(name, "default")]
    if partial_default is None:
      checks.append(("partial_rotary_factor", 1.0))
    for field, implemented in checks:
      if params.get(field, implemented) != implemented:
        why = f"only plain RoPE ({field}={json.dumps(implemented)}) is implemented"
        raise unsupported(f"{key}.{field}".lstrip("."), params[field], why)
    theta = params.get("rope_theta", theta)
    if params.get("partial_rotary_factor") is not None:
      fraction = params["partial_rotary_factor"]
  theta = float(theta if theta is not None else 10000.0)
  return theta, float(fraction if fraction is not None else 1.0)
