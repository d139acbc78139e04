"""RecurrentGemma (RecurrentGemmaForCausalLM) → Fulcrum's Griffin, or Hawk without attention.

Import only. transformers' conventions that differ from DeepMind's: a query sees
`attention_window_size` keys, itself included; every norm scales by 1 + w; the MLP is
`intermediate_size // 2` wide; the embedding is scaled by a bfloat16 sqrt(hidden_size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fulcrum.modules import ModelConfig
from fulcrum.modules.blocks import block_pattern, layer_paths
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.convert import (
  CONV,
  LM_HEAD,
  PLUS_ONE,
  Converter,
  Rule,
  attention_heads,
  check_implements,
  linear,
  required,
  rope,
  unsupported,
)

__all__ = ["RECURRENT_GEMMA"]

_IMPLEMENTS = {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"}

# config.json's block_types entry of a layer, by the kind of its Fulcrum token mixer.
_BLOCK_TYPES = {"rg_lru": "recurrent", "attention": "attention"}
_DEFAULT_BLOCK_TYPES = ["recurrent", "recurrent", "attention"]  # RecurrentGemmaConfig's.


def _block_types(arch: str, num_layers: int) -> list[str]:
  """The block_types entry of each of `arch`'s first `num_layers` layers."""
  layers = layer_paths(ModelConfig(arch=arch, num_layers=num_layers), scanned=False)
  return [_BLOCK_TYPES[layer.mixer] for layer in layers]


def _arch(hf: Mapping[str, Any], num_layers: int) -> str:
  """griffin or hawk, by the layer types block_types gives (cycled from layer 0)."""
  types = hf.get("block_types") or _DEFAULT_BLOCK_TYPES
  if not isinstance(types, list) or not set(types) <= set(_BLOCK_TYPES.values()):
    kinds = " and ".join(f'"{kind}"' for kind in _BLOCK_TYPES.values())
    raise unsupported("block_types", types, f"layer types are {kinds}")
  layers = [types[i % len(types)] for i in range(num_layers)]
  for arch in ("hawk", "griffin"):
    if layers == _block_types(arch, num_layers):
      return arch
  cycle = ", ".join(_block_types("griffin", len(block_pattern("griffin"))))
  why = (
    f"Fulcrum's Griffin layers cycle ({cycle}) from layer 0, and Hawk's are all recurrent; "
    f"these {num_layers} layers would be {', '.join(layers)}"
  )
  raise unsupported("block_types", types, why)


def _config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """RecurrentGemmaConfig → ModelConfig keyword arguments (Griffin, or Hawk if no attention)."""
  check_implements(hf, _IMPLEMENTS)
  heads, kv_heads = attention_heads(hf)
  d_model, num_layers = required(hf, "hidden_size"), required(hf, "num_hidden_layers")
  # transformers derives head_dim = hidden_size // heads, unless config.json has one.
  head_dim = hf.get("head_dim") or d_model // heads
  lru_width = hf.get("lru_width") or d_model
  if lru_width % heads:
    raise UserError(
      f"lru_width={lru_width} is not a multiple of num_attention_heads={heads} (the RG-LRU "
      "gates have one block per head) in config.json; fix config.json"
    )
  theta, fraction = rope(hf, partial_default=0.5)  # RecurrentGemma rotates half by default.
  rotary = int(head_dim * fraction)
  if not 0 < fraction <= 1 or rotary <= 0 or rotary % 2:
    why = f"RoPE needs a positive even number of rotated dims (of head_dim={head_dim})"
    raise unsupported("partial_rotary_factor", fraction, why)
  window = hf.get("attention_window_size", 2048)
  if not isinstance(window, int) or window <= 0:
    raise unsupported("attention_window_size", window, "use a positive window size")
  cap = hf.get("logits_soft_cap", 30.0)
  if not isinstance(cap, (int, float)) or cap <= 0:
    raise unsupported("logits_soft_cap", cap, "use a positive cap (transformers always caps)")
  return dict(
    arch=_arch(hf, num_layers),
    vocab_size=required(hf, "vocab_size"),
    d_model=d_model,
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    mlp_dim=required(hf, "intermediate_size") // 2,  # transformers' MLP: intermediate_size // 2.
    window=window,  # A query sees `window` keys, itself included (as Fulcrum's window).
    rope_theta=theta,
    rope_fraction=fraction,
    attn_out_bias=True,
    lru_width=lru_width,
    conv_width=hf.get("conv1d_width", 4),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    scale_embeddings=True,
    embed_scale_bf16=True,  # transformers multiplies by a bfloat16 sqrt(hidden_size).
    logits_soft_cap=float(cap),
  )


def _rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of RecurrentGemmaForCausalLM."""
  rules = [Rule("model.embed_tokens.weight", ("embedder", "embedding"))]
  for layer in layer_paths(c, scanned=False):
    hf, ours = f"model.layers.{layer.index}.", layer.path
    rules += [
      Rule(hf + "temporal_pre_norm.weight", (*ours, "temporal_pre_norm", "scale")),
      Rule(hf + "channel_pre_norm.weight", (*ours, "channel_pre_norm", "scale")),
    ]
    for name in ("gate", "up", "down"):
      rules += [
        Rule(f"{hf}mlp_block.{name}_proj.weight", (*ours, "mlp_block", name, "kernel"), linear()),
        Rule(f"{hf}mlp_block.{name}_proj.bias", (*ours, "mlp_block", name, "bias")),
      ]
    hf += "temporal_block."
    if layer.mixer == "attention":
      attn = (*ours, "attention_block")
      rules += [
        Rule(hf + "q_proj.weight", (*attn, "q", "kernel"), linear()),
        Rule(hf + "k_proj.weight", (*attn, "k", "kernel"), linear()),
        Rule(hf + "v_proj.weight", (*attn, "v", "kernel"), linear()),
        Rule(hf + "o_proj.weight", (*attn, "o", "kernel"), linear(in_axes=2)),
        Rule(hf + "o_proj.bias", (*attn, "o", "bias")),
      ]
      continue
    block = (*ours, "recurrent_block")
    for name in ("linear_x", "linear_y", "linear_out"):
      rules += [
        Rule(f"{hf}{name}.weight", (*block, name, "kernel"), linear()),
        Rule(f"{hf}{name}.bias", (*block, name, "bias")),
      ]
    # The RG-LRU gates are block-diagonal [heads, i, i], applied as x @ W in both.
    lru = (*block, "rg_lru")
    rules += [
      Rule(hf + "conv_1d.weight", (*block, "conv_1d", "kernel"), CONV),
      Rule(hf + "conv_1d.bias", (*block, "conv_1d", "bias")),
      Rule(hf + "rg_lru.recurrent_param", (*lru, "a_param")),
      Rule(hf + "rg_lru.input_gate_weight", (*lru, "input_gate", "kernel")),
      Rule(hf + "rg_lru.input_gate_bias", (*lru, "input_gate", "bias")),
      Rule(hf + "rg_lru.recurrent_gate_weight", (*lru, "a_gate", "kernel")),
      Rule(hf + "rg_lru.recurrent_gate_bias", (*lru, "a_gate", "bias")),
    ]
  # Every RecurrentGemma norm scales by 1 + w; Fulcrum's final norm is a plain RMSNorm.
  rules.append(Rule("model.final_norm.weight", ("final_norm", "scale"), PLUS_ONE))
  return rules if c.tie_embeddings else [*rules, LM_HEAD]


RECURRENT_GEMMA = Converter(
  architectures=("RecurrentGemmaForCausalLM",),
  to_config=_config,
  rules=_rules,
  ignored=("rotary_emb.", "model.normalizer"),  # Buffers, derived from the config.
)
