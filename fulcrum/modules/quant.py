"""Quantization-aware training of the weight matmuls, with qwix (`model.quant`).

`quantize(model, mode)` returns the same linen model with every `jax.lax.dot_general` that
multiplies by a parameter — all `layers.Dense` projections (attention q/k/v/o, MLPs, Mamba's
in/x/dt/out projections, the recurrent block's linear maps, forecasting heads) and the
linear forecasters' time maps — fake-quantized in the forward pass, with straight-through
gradients, by qwix's quantized-training provider. Parameters stay float32 and their tree is
unchanged, so checkpoints, optimizers and sharding are untouched.

Not quantized: the attention score and value matmuls, the SSM / RG-LRU scans and gates, and
the embedding / tied output projection (einsums), which quantized training usually keeps in
higher precision.

Modes:
  none         float matmuls.
  int8         int8 weights (per output channel) and int8 activations (per token), W8A8.
  int8_weight  int8 weights only (W8A16-style).
  fp8          float8_e4m3fn weights and activations, float8_e5m2 gradients in the backward
               pass (where XLA has no native fp8 matmul it is emulated, with the same rounding).
"""

from __future__ import annotations

import jax.numpy as jnp
import qwix
from flax import linen as nn

MODES = ("none", "int8", "int8_weight", "fp8")


def rules(mode: str) -> list[qwix.QtRule]:
  """The qwix rules of a `model.quant` mode (empty for "none")."""
  if mode not in MODES:
    raise ValueError(f"unknown model.quant {mode!r}; choose one of {', '.join(MODES)}")
  common = dict(module_path=".*", op_names=("dot_general",))
  if mode == "none":
    return []
  if mode == "int8":
    return [qwix.QtRule(**common, weight_qtype=jnp.int8, act_qtype=jnp.int8)]
  if mode == "int8_weight":
    return [qwix.QtRule(**common, weight_qtype=jnp.int8)]
  return [
    qwix.QtRule(
      **common,
      weight_qtype=jnp.float8_e4m3fn,
      act_qtype=jnp.float8_e4m3fn,
      bwd_qtype=jnp.float8_e5m2,
    )
  ]


def quantize(model: nn.Module, mode: str, methods: tuple[str, ...] = ("__call__",)) -> nn.Module:
  """`model` with its weight matmuls quantized for training (a no-op for mode "none").

  `methods` names every entry point to intercept (e.g. `("__call__", "decode")` for the LM);
  call them by name (`apply(..., method="decode")`) so the quantized class's version runs.
  """
  rule_list = rules(mode)
  if not rule_list:
    return model
  return qwix.quantize_model(model, qwix.QtProvider(rule_list), methods=methods)
