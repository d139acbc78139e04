"""Import and export of Hugging Face checkpoints: a config.json plus safetensors weights.

`load_pretrained(folder)` turns a local Hugging Face checkpoint folder (Llama, Mistral, Mamba or
RecurrentGemma) into a Fulcrum model and plain float32 params; `save_pretrained(model, params,
folder)` writes a Fulcrum transformer back out in the Hugging Face Llama (or, with a sliding
window, Mistral) format. Mamba and RecurrentGemma (Griffin/Hawk) are import only.

Weights are read and written by `fulcrum.platform.hf.safetensors_io` (numpy only, memory-mapped).

Each supported Hugging Face `model_type` is one `Converter` in `CONVERTERS`: how its config.json
maps onto `ModelConfig`, and which checkpoint tensor becomes which Fulcrum parameter (with the
layout change between them). A new architecture is a new entry; the loader does not change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import traverse_util

from fulcrum.modules import LM, ModelConfig, build
from fulcrum.modules.griffin import ATTENTION, RECURRENT
from fulcrum.modules.lm import block_pattern
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.safetensors_io import (
  SAFETENSORS_DTYPES,
  SafetensorsFile,
  open_checkpoint,
  read_safetensors,
  write_safetensors,
)

__all__ = [
  "CONVERTERS",
  "SAFETENSORS_DTYPES",
  "SafetensorsFile",
  "load_pretrained",
  "open_checkpoint",
  "read_safetensors",
  "save_pretrained",
  "write_safetensors",
]

Params = dict[str, Any]

# --- Converters: one per Hugging Face model_type ---------------------------------------------


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


class Rule(NamedTuple):
  """One checkpoint tensor ↔ one Fulcrum parameter (a path into the params tree)."""

  hf_name: str
  path: tuple[str, ...]
  layout: Layout = SAME


@dataclasses.dataclass(frozen=True)
class Converter:
  """How one Hugging Face `model_type` maps onto Fulcrum.

  Attributes:
    architectures: the `architectures` entries of config.json this converter reads.
    to_config: config.json (a dict) → `ModelConfig` keyword arguments; raises `UserError` for
      features Fulcrum does not implement.
    rules: the tensor ↔ parameter rules for a `ModelConfig`.
    to_hf_config: `ModelConfig` → the config.json dict (None: import only).
    ignored: substrings of checkpoint tensor names that carry no weights (e.g. cached buffers).
  """

  architectures: tuple[str, ...]
  to_config: Callable[[Mapping[str, Any]], dict[str, Any]]
  rules: Callable[[ModelConfig], list[Rule]]
  to_hf_config: Callable[[ModelConfig], dict[str, Any]] | None = None
  ignored: tuple[str, ...] = ()


def _get(hf: Mapping[str, Any], key: str) -> Any:
  if hf.get(key) is None:
    raise UserError(f"config.json lacks required key {key!r}; re-download or re-save the config")
  return hf[key]


def _unsupported(key: str, value: Any, fix: str) -> UserError:
  return UserError(f"config.json sets {key}={json.dumps(value)}, not supported by Fulcrum; {fix}")


def _rope(hf: Mapping[str, Any], partial_default: float | None = None) -> tuple[float, float]:
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
        raise _unsupported(f"{key}.{field}".lstrip("."), params[field], why)
    theta = params.get("rope_theta", theta)
    if params.get("partial_rotary_factor") is not None:
      fraction = params["partial_rotary_factor"]
  theta = float(theta if theta is not None else 10000.0)
  return theta, float(fraction if fraction is not None else 1.0)


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_theta of a full-width RoPE (see `_rope`)."""
  return _rope(hf)[0]


def _check_implements(hf: Mapping[str, Any], implements: Mapping[str, Any]) -> None:
  """Refuses config.json values other than those Fulcrum implements (absent keys are fine)."""
  for key, implemented in implements.items():
    if hf.get(key, implemented) != implemented:
      raise _unsupported(key, hf[key], f"only {key}={json.dumps(implemented)} is implemented")


# config.json values Fulcrum's transformer implements; any other value is refused.
_LLAMA_IMPLEMENTS = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """LlamaConfig → ModelConfig keyword arguments."""
  _check_implements(hf, _LLAMA_IMPLEMENTS)
  heads, d_model = _get(hf, "num_attention_heads"), _get(hf, "hidden_size")
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise UserError(
      f"num_attention_heads={heads} is not a multiple of num_key_value_heads="
      f"{kv_heads} in config.json; fix config.json"
    )
  return dict(
    arch="transformer",
    vocab_size=_get(hf, "vocab_size"),
    d_model=d_model,
    num_layers=_get(hf, "num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=hf.get("head_dim") or d_model // heads,
    mlp_dim=_get(hf, "intermediate_size"),
    window=0,
    rope_theta=_rope_theta(hf),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def _mistral_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """MistralConfig → ModelConfig: Llama plus a sliding window (None = full attention)."""
  window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent.
  return {**_llama_config(hf), "window": int(window or 0)}


def _llama_rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of LlamaForCausalLM (and MistralForCausalLM, which has the same layout)."""
  rules = [Rule("model.embed_tokens.weight", ("embedder", "embedding"))]
  for i in range(c.num_layers):
    hf, ours = f"model.layers.{i}.", (f"blocks_{i}",)
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
  if not c.tie_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), linear()))
  return rules


def _llama_hf_config(c: ModelConfig, model_type: str = "llama") -> dict[str, Any]:
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


# MambaConfig values Fulcrum's Mamba implements (residual_in_fp32, rescale_prenorm_residual and
# the time_step_* init settings change nothing in a float32 forward pass).
_MAMBA_IMPLEMENTS = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu"}


def _mamba_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """MambaConfig → ModelConfig keyword arguments."""
  _check_implements(hf, _MAMBA_IMPLEMENTS)
  d_model = _get(hf, "hidden_size")
  # transformers sets intermediate_size = int(expand * hidden_size) unless config.json has one.
  features = hf.get("intermediate_size") or int(hf.get("expand", 2) * d_model)
  if features % d_model:
    why = f"Fulcrum's Mamba expands hidden_size={d_model} by a whole factor"
    raise _unsupported("intermediate_size", features, why)
  rank = hf.get("time_step_rank", "auto")
  if rank == "auto":
    rank = math.ceil(d_model / 16)  # transformers' (and mamba_ssm's) "auto".
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise _unsupported("time_step_rank", rank, 'use "auto" or a positive integer')
  return dict(
    arch="mamba",
    vocab_size=_get(hf, "vocab_size"),
    d_model=d_model,
    num_layers=_get(hf, "num_hidden_layers"),
    ssm_state=hf.get("state_size", 16),
    ssm_expand=features // d_model,
    conv_width=hf.get("conv_kernel", 4),
    dt_rank=rank,
    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
  )


def _mamba_rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of MambaForCausalLM."""
  rules = [Rule("backbone.embeddings.weight", ("embedder", "embedding"))]
  for i in range(c.num_layers):
    hf, ours = f"backbone.layers.{i}.", (f"blocks_{i}",)
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
  if not c.tie_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), linear()))
  return rules


_RECURRENT_GEMMA_IMPLEMENTS = {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"}
_GRIFFIN = "(recurrent, recurrent, attention)"


def _recurrent_gemma_arch(hf: Mapping[str, Any], num_layers: int) -> str:
  """griffin or hawk, by the layer types block_types gives (cycled from layer 0)."""
  types = hf.get("block_types") or [RECURRENT, RECURRENT, ATTENTION]  # RecurrentGemma's default.
  if not isinstance(types, list) or not set(types) <= {RECURRENT, ATTENTION}:
    raise _unsupported("block_types", types, f'layer types are "{RECURRENT}" and "{ATTENTION}"')
  layers = [types[i % len(types)] for i in range(num_layers)]
  for arch in ("hawk", "griffin"):
    pattern = block_pattern(arch)
    if layers == [pattern[i % len(pattern)].temporal for i in range(num_layers)]:
      return arch
  why = (
    f"Fulcrum's Griffin layers cycle {_GRIFFIN} from layer 0, and Hawk's are all recurrent; "
    f"these {num_layers} layers would be {', '.join(layers)}"
  )
  raise _unsupported("block_types", types, why)


def _recurrent_gemma_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """RecurrentGemmaConfig → ModelConfig keyword arguments (Griffin, or Hawk if no attention)."""
  _check_implements(hf, _RECURRENT_GEMMA_IMPLEMENTS)
  heads, d_model = _get(hf, "num_attention_heads"), _get(hf, "hidden_size")
  num_layers = _get(hf, "num_hidden_layers")
  kv_heads = hf.get("num_key_value_heads") or heads  # transformers' default: heads, not MQA.
  if heads % kv_heads:
    raise UserError(
      f"num_attention_heads={heads} is not a multiple of num_key_value_heads="
      f"{kv_heads} in config.json; fix config.json"
    )
  # transformers derives head_dim = hidden_size // heads, unless config.json has one.
  head_dim = hf.get("head_dim") or d_model // heads
  lru_width = hf.get("lru_width") or d_model
  if lru_width % heads:
    raise UserError(
      f"lru_width={lru_width} is not a multiple of num_attention_heads={heads} (the RG-LRU "
      "gates have one block per head) in config.json; fix config.json"
    )
  theta, fraction = _rope(hf, partial_default=0.5)  # RecurrentGemma rotates half by default.
  rotary = int(head_dim * fraction)
  if not 0 < fraction <= 1 or rotary <= 0 or rotary % 2:
    why = f"RoPE needs a positive even number of rotated dims (of head_dim={head_dim})"
    raise _unsupported("partial_rotary_factor", fraction, why)
  window = hf.get("attention_window_size", 2048)
  if not isinstance(window, int) or window <= 0:
    raise _unsupported("attention_window_size", window, "use a positive window size")
  cap = hf.get("logits_soft_cap", 30.0)
  if not isinstance(cap, (int, float)) or cap <= 0:
    raise _unsupported("logits_soft_cap", cap, "use a positive cap (transformers always caps)")
  return dict(
    arch=_recurrent_gemma_arch(hf, num_layers),
    vocab_size=_get(hf, "vocab_size"),
    d_model=d_model,
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    mlp_dim=_get(hf, "intermediate_size") // 2,  # transformers' MLP is intermediate_size // 2.
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


def _recurrent_gemma_rules(c: ModelConfig) -> list[Rule]:
  """Tensor names of RecurrentGemmaForCausalLM."""
  rules = [Rule("model.embed_tokens.weight", ("embedder", "embedding"))]
  pattern = block_pattern(c.arch)
  for i in range(c.num_layers):
    hf, ours = f"model.layers.{i}.", (f"blocks_{i}",)
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
    if pattern[i % len(pattern)].temporal == ATTENTION:
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
  if not c.tie_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), linear()))
  return rules


CONVERTERS: dict[str, Converter] = {
  "llama": Converter(
    architectures=("LlamaForCausalLM",),
    to_config=_llama_config,
    rules=_llama_rules,
    to_hf_config=_llama_hf_config,
    ignored=("rotary_emb.inv_freq",),
  ),
  "mistral": Converter(
    architectures=("MistralForCausalLM",),
    to_config=_mistral_config,
    rules=_llama_rules,
    to_hf_config=lambda c: _llama_hf_config(c, "mistral"),
    ignored=("rotary_emb.inv_freq",),
  ),
  "mamba": Converter(
    architectures=("MambaForCausalLM",),
    to_config=_mamba_config,
    rules=_mamba_rules,
  ),
  "recurrent_gemma": Converter(
    architectures=("RecurrentGemmaForCausalLM",),
    to_config=_recurrent_gemma_config,
    rules=_recurrent_gemma_rules,
    ignored=("rotary_emb.", "model.normalizer"),  # Buffers, derived from the config.
  ),
}


# ModelConfig options Llama/Mistral lack, with the value they must have to be exported.
_LLAMA_LACKS = {
  "rope_fraction": 1.0,
  "attn_out_bias": False,
  "scale_embeddings": False,
  "embed_scale_bf16": False,
  "logits_soft_cap": 0.0,
}


def export_model_type(config: ModelConfig) -> str:
  """The Hugging Face model_type a Fulcrum model is saved as."""
  if config.arch != "transformer":
    raise UserError(
      f"save_pretrained cannot export model.arch {config.arch!r}: Fulcrum exports transformers "
      "only (as Llama or Mistral); Mamba and RecurrentGemma checkpoints are import only"
    )
  for key, plain in _LLAMA_LACKS.items():
    if getattr(config, key) != plain:
      raise UserError(
        f"save_pretrained cannot export model.{key}={getattr(config, key)!r}: Llama and "
        f"Mistral have no such option; only model.{key}={plain!r} can be exported"
      )
  return "mistral" if config.window else "llama"  # HF Llama has no sliding window.


# --- load / save -----------------------------------------------------------------------------


def _checked_rules(converter: Converter, model: LM) -> list[tuple[Rule, tuple[int, ...]]]:
  """Each rule with its parameter's shape; the rules must cover the params tree exactly."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(tree["params"])).items()}
  rules = converter.rules(model.config)
  if sorted(r.path for r in rules) != sorted(shapes):
    raise AssertionError(f"converter rules {[r.path for r in rules]} != params {sorted(shapes)}")
  return [(r, shapes[r.path]) for r in rules]


_FOLDER_HINT = "pass a local Hugging Face checkpoint folder (config.json + *.safetensors)"


def _open_folder(path: str | Path) -> tuple[Path, dict[str, Any]]:
  """Checks the folder and reads its config.json."""
  folder = Path(path).expanduser()
  if not folder.exists():
    raise UserError(f"checkpoint folder {folder} does not exist; {_FOLDER_HINT}")
  if not folder.is_dir():
    raise UserError(f"{folder} is a file, not a folder; {_FOLDER_HINT}")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise UserError(f"no config.json in {folder}; {_FOLDER_HINT}")
  try:
    hf = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{config_file} is not valid JSON ({e}); re-download or fix it") from None
  if not isinstance(hf, dict):
    raise UserError(f"{config_file} is not a JSON object; re-download or fix it")
  return folder, hf


def _converter(hf: Mapping[str, Any], folder: Path) -> tuple[str, Converter]:
  model_type = hf.get("model_type")
  supported = ", ".join(sorted(CONVERTERS))
  if model_type not in CONVERTERS:
    what = f"model_type {model_type!r}" if model_type else "no model_type"
    raise UserError(f"{folder}/config.json has {what}; Fulcrum can load model_type: {supported}")
  converter = CONVERTERS[model_type]
  archs = hf.get("architectures") or []
  if archs and not set(archs) & set(converter.architectures):
    raise UserError(
      f"{folder}/config.json has architectures {archs}; Fulcrum loads "
      f"{', '.join(converter.architectures)} (a causal LM with its lm_head)"
    )
  return model_type, converter


def _no_weights_error(folder: Path) -> UserError:
  pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
  if not pickles:
    return UserError(f"no *.safetensors weights in {folder}; download the model's safetensors")
  return UserError(
    f"{folder} has PyTorch pickle weights ({pickles[0]}) but no *.safetensors; convert them to "
    "safetensors (transformers: save_pretrained(dir, safe_serialization=True)) — Fulcrum reads "
    "safetensors only"
  )


def load_pretrained(path: str | Path, *, dtype: str = "float32") -> tuple[LM, Params]:
  """Loads a local Hugging Face checkpoint folder as a Fulcrum model and its params.

  Args:
    path: a folder with config.json and the safetensors weights (one `*.safetensors` file, or
      shards listed by `model.safetensors.index.json`), as written by `save_pretrained` in
      transformers or here. Supported `model_type`s are the keys of `CONVERTERS`.
    dtype: the dtype the model computes in (`ModelConfig.dtype`); params are float32 whatever
      the checkpoint stores.

  Returns:
    `(model, params)`: `model.apply({"params": params}, tokens)` gives float32 logits
    [b, t, v]. `params` holds float32 numpy arrays in the tree of `model.init(...)["params"]`
    (unboxed).

  Raises:
    UserError: the folder, its config or its weights cannot be loaded; the message says why.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
  folder, hf = _open_folder(path)
  model_type, converter = _converter(hf, folder)
  config = ModelConfig(**converter.to_config(hf), dtype=dtype)
  model = build(config)

  if not any(folder.glob("*.safetensors")):
    raise _no_weights_error(folder)
  weights, rules = open_checkpoint(folder), _checked_rules(converter, model)
  missing = [r.hf_name for r, _ in rules if r.hf_name not in weights]
  if missing:
    raise UserError(
      f"tensor {_some(missing)} is missing from {folder}; the checkpoint is "
      f"incomplete or not a {converter.architectures[0]} — re-download it"
    )
  known = {r.hf_name for r, _ in rules} | ({"lm_head.weight"} if config.tie_embeddings else set())
  unexpected = [n for n in weights if n not in known and not any(s in n for s in converter.ignored)]
  if unexpected:
    raise UserError(
      f"{folder} holds tensor {_some(sorted(unexpected))}, which a {model_type} "
      "model with this config.json lacks; make config.json (e.g. its bias or "
      "tie_word_embeddings settings) match the weights"
    )
  flat = {}
  for rule, shape in rules:
    want, got = rule.layout.hf_shape(shape), weights[rule.hf_name].shape(rule.hf_name)
    if tuple(got) != tuple(want):
      raise UserError(
        f"tensor {rule.hf_name!r} has shape {tuple(got)} but config.json implies "
        f"{tuple(want)}; the config and weights of {folder} do not match"
      )
    array = weights[rule.hf_name][rule.hf_name]
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise UserError(f"tensor {rule.hf_name!r} is {array.dtype}, not float; re-save it as float")
    flat[rule.path] = np.asarray(rule.layout.to_fulcrum(array.astype(np.float32), shape), order="C")
  return model, traverse_util.unflatten_dict(flat)


def _some(names: list[str]) -> str:
  """'a' or "'a' (and 3 more)": the first of a list of names for an error message."""
  return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _unscanned(params: Params, config: ModelConfig) -> Params:
  """Params of a `scan_layers` model (blocks/block stacked on axis 0) as blocks_0, blocks_1..."""
  if not config.scan_layers:
    return params
  params = dict(params)
  stacked = params.pop("blocks", {}).get("block", {})  # Absent: reported as missing params.
  for i in range(config.num_layers):
    params[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def save_pretrained(
  model: LM,
  params: Params,
  path: str | Path,
  *,
  dtype: str = "float32",
  max_position_embeddings: int = 4096,
) -> Path:
  """Writes a Fulcrum transformer as a Hugging Face checkpoint folder that transformers opens.

  The folder gets config.json (LlamaForCausalLM, or MistralForCausalLM when the model uses a
  sliding window) and model.safetensors. With the default float32 weights,
  `load_pretrained(path)` gives back exactly these params.

  Args:
    model: the `LM` (its `config` decides the architecture written).
    params: its params, boxed or unboxed, with or without the outer {"params": ...}.
    path: the folder to write (created if needed; existing files of the same name replaced).
    dtype: the dtype stored in the safetensors file: float32, bfloat16 or float16.
    max_position_embeddings: the context length written to config.json (Fulcrum's RoPE has
      no limit; transformers uses it as a default generation limit).

  Returns:
    The folder written.

  Raises:
    UserError: the architecture cannot be exported, or the params do not fit the model.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"dtype {dtype!r} cannot be saved; use float32, bfloat16 or float16")
  config = model.config
  model_type = export_model_type(config)
  converter = CONVERTERS[model_type]
  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(_unscanned(params, config))
  config = dataclasses.replace(config, scan_layers=False, remat=False)
  rules = _checked_rules(converter, build(config))
  tensors = {}
  storage = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  for rule, shape in rules:
    value = flat.pop(rule.path, None)
    if value is None or tuple(value.shape) != tuple(shape):
      got = "missing" if value is None else f"of shape {tuple(value.shape)}"
      raise UserError(
        f"param {'/'.join(rule.path)} is {got} but the model needs {shape}; "
        "pass the params that belong to this model"
      )
    tensors[rule.hf_name] = rule.layout.to_hf(np.asarray(value, np.float32)).astype(storage)
  if flat:
    raise UserError(
      f"params {_some(['/'.join(k) for k in flat])} are not the model's; pass its own"
    )

  folder = Path(path).expanduser()
  folder.mkdir(parents=True, exist_ok=True)
  for stale in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors.index.json"]:
    stale.unlink(missing_ok=True)  # A sharded checkpoint saved here before would shadow ours.
  hf = {
    **converter.to_hf_config(config),
    "max_position_embeddings": max_position_embeddings,
    "torch_dtype": dtype,  # transformers 4.x name ...
    "dtype": dtype,  # ... and 5.x.
  }
  (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
  return folder
