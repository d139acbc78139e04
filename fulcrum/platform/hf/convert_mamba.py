"""Mamba (MambaForCausalLM) → Fulcrum's Mamba; import only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fulcrum.modules import ModelConfig
from fulcrum.modules.blocks import layer_paths
from fulcrum.platform.hf.convert import (
  CONV,
  LM_HEAD,
  Converter,
  Rule,
  check_implements,
  linear,
  required,
  unsupported,
)

__all__ = ["MAMBA"]

# MambaConfig values Fulcrum's Mamba implements (residual_in_fp32, rescale_prenorm_residual and
# the time_step_* init settings change nothing in a float32 forward pass).
_IMPLEMENTS = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu"}


def _config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """MambaConfig → ModelConfig keyword arguments."""
  check_implements(hf, _IMPLEMENTS)
  d_model = required(hf, "hidden_size")
  # transformers sets intermediate_size = int(expand * hidden_size) unless config.json has one.
  features = hf.get("intermediate_size") or int(hf.get("expand", 2) * d_model)
  if features % d_model:
    why = f"Fulcrum's Mamba expands hidden_size={d_model} by a whole factor"
    raise unsupported("intermediate_size", features, why)
  rank = hf.get("time_step_rank", "auto")
  if rank == "auto":
    rank = math.ceil(d_model / 16)  # transformers' (and mamba_ssm's) "auto".
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise unsupported("time_step_rank", rank, 'use "auto" or a positive integer')
  return dict(
    arch="mamba",
    vocab_size=required(hf, "vocab_size"),
    d_model=d_model,
    num_layers=required(hf, "num_hidden_layers"),
    ssm_state=hf.get("state_size", 16),
    ssm_expand=features // d_model,
    conv_width=hf.get("conv_kernel", 4),
    dt_rank=rank,
    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
  )


def _rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of MambaForCausalLM."""
  rules = [Rule("backbone.embeddings.weight", ("embedder", "embedding"))]
  for layer in layer_paths(c, scanned=False):
    hf, ours = f"backbone.layers.{layer.index}.", layer.path
    mixer = (*ours, "mixer")
    rules += [
      Rule(hf + "norm.weight", (*ours, "norm", "scale")),
      Rule(hf + "mixer.in_proj.weight", (*mixer, "in_proj", "kernel"), linear()),  # [x; z].
      Rule(hf + "mixer.conv1d.weight", (*mixer, "conv1d", "kernel"), CONV),
      Rule(hf + "mixer.conv1d.bias", (*mixer, "conv1d", "bias")),
      Rule(hf + "mixer.x_proj.weight", (*mixer, "x_proj", "kernel"), linear()),  # [dt; B; C].
      Rule(hf + "mixer.dt_proj.weight", (*mixer, "dt_proj", "kernel"), linear()),
      Rule(hf + "mixer.dt_proj.bias", (*mixer, "dt_proj", "bias")),
      Rule(hf + "mixer.A_log", (*mixer, "A_log")),
      Rule(hf + "mixer.D", (*mixer, "D")),
      Rule(hf + "mixer.out_proj.weight", (*mixer, "out_proj", "kernel"), linear()),
    ]
  rules.append(Rule("backbone.norm_f.weight", ("final_norm", "scale")))
  return rules if c.tie_embeddings else [*rules, LM_HEAD]


MAMBA = Converter(architectures=("MambaForCausalLM",), to_config=_config, rules=_rules)
