"""Llama and Mistral (LlamaForCausalLM, MistralForCausalLM) ↔ Fulcrum's transformer.

Both import and export: Mistral is Llama plus a sliding window, with the same tensor names.
`export_model_type` decides which of the two a Fulcrum model is saved as.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from fulcrum.modules import ModelConfig
from fulcrum.modules.blocks import layer_paths
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.convert import (
  LM_HEAD,
  Converter,
  Rule,
  attention_heads,
  check_implements,
  linear,
  required,
  rope,
)

__all__ = ["LLAMA", "MISTRAL", "export_model_type"]

# config.json values Fulcrum's transformer implements; any other value is refused.
_IMPLEMENTS = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}

# ModelConfig options Llama/Mistral lack, with the value they must have to be exported.
_LACKS = {
  "rope_fraction": 1.0,
  "attn_out_bias": False,
  "scale_embeddings": False,
  "embed_scale_bf16": False,
  "logits_soft_cap": 0.0,
}


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """LlamaConfig → ModelConfig keyword arguments."""
  check_implements(hf, _IMPLEMENTS)
  heads, kv_heads = attention_heads(hf)
  d_model = required(hf, "hidden_size")
  return dict(
    arch="transformer",
    vocab_size=required(hf, "vocab_size"),
    d_model=d_model,
    num_layers=required(hf, "num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=hf.get("head_dim") or d_model // heads,
    mlp_dim=required(hf, "intermediate_size"),
    window=0,
    rope_theta=rope(hf)[0],
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def _mistral_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """MistralConfig → ModelConfig: Llama plus a sliding window (None = full attention)."""
  window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent.
  return {**_llama_config(hf), "window": int(window or 0)}


def _rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of LlamaForCausalLM (and MistralForCausalLM, which has the same layout)."""
  rules = [Rule("model.embed_tokens.weight", ("embedder", "embedding"))]
  for layer in layer_paths(c, scanned=False):
    hf, ours = f"model.layers.{layer.index}.", layer.path
    rules += [
      Rule(hf + "input_layernorm.weight", (*ours, "attn_norm", "scale")),
      Rule(hf + "self_attn.q_proj.weight", (*ours, "attn", "q", "kernel"), linear()),
      Rule(hf + "self_attn.k_proj.weight", (*ours, "attn", "k", "kernel"), linear()),
      Rule(hf + "self_attn.v_proj.weight", (*ours, "attn", "v", "kernel"), linear()),
      Rule(hf + "self_attn.o_proj.weight", (*ours, "attn", "o", "kernel"), linear(in_axes=2)),
      Rule(hf + "post_attention_layernorm.weight", (*ours, "mlp_norm", "scale")),
      Rule(hf + "mlp.gate_proj.weight", (*ours, "mlp", "gate", "kernel"), linear()),
      Rule(hf + "mlp.up_proj.weight", (*ours, "mlp", "up", "kernel"), linear()),
      Rule(hf + "mlp.down_proj.weight", (*ours, "mlp", "down", "kernel"), linear()),
    ]
  rules.append(Rule("model.norm.weight", ("final_norm", "scale")))
  return rules if c.tie_embeddings else [*rules, LM_HEAD]


def _hf_config(c: ModelConfig, model_type: str = "llama") -> dict[str, Any]:
  """ModelConfig → config.json, readable by transformers 4.x and 5.x."""
  hf = {
    "architectures": ["MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"],
    "model_type": model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.d_model,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.kv_heads,
    "head_dim": c.per_head_dim,
    "intermediate_size": c.hidden_dim,
    "hidden_act": "silu",
    "rms_norm_eps": c.norm_eps,
    "rope_theta": c.rope_theta,  # transformers 4.x reads these two ...
    "rope_scaling": None,
    "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # ... 5.x this.
    "tie_word_embeddings": c.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
  }
  if model_type == "mistral":
    hf["sliding_window"] = c.window or None
  return hf


LLAMA = Converter(
  architectures=("LlamaForCausalLM",),
  to_config=_llama_config,
  rules=_rules,
  to_hf_config=_hf_config,
  ignored=("rotary_emb.inv_freq",),
)
MISTRAL = Converter(
  architectures=("MistralForCausalLM",),
  to_config=_mistral_config,
  rules=_rules,
  to_hf_config=functools.partial(_hf_config, model_type="mistral"),
  ignored=("rotary_emb.inv_freq",),
)


def export_model_type(config: ModelConfig) -> str:
  """The Hugging Face model_type a Fulcrum model is saved as."""
  if config.arch != "transformer":
    raise UserError(
      f"save_pretrained cannot export model.arch {config.arch!r}: Fulcrum exports transformers "
      "only (as Llama or Mistral); Mamba and RecurrentGemma checkpoints are import only"
    )
  for key, plain in _LACKS.items():
    if getattr(config, key) != plain:
      raise UserError(
        f"save_pretrained cannot export model.{key}={getattr(config, key)!r}: Llama and "
        f"Mistral have no such option; only model.{key}={plain!r} can be exported"
      )
  return "mistral" if config.window else "llama"  # HF Llama has no sliding window.
