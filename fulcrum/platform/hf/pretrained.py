"""The loader and exporter: run the converter of a checkpoint's `model_type` (`registry`).

Neither knows a model family: a converter's rules say which tensor becomes which parameter, and
the checks here (missing, unexpected, misshapen tensors; params that are not the model's) hold
for every family alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import traverse_util

from fulcrum.modules import LM, ModelConfig, build
from fulcrum.modules.blocks import layer_paths
from fulcrum.modules.models import DTYPES
from fulcrum.platform.data import hf_tokenizer
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.convert import LM_HEAD, Converter, Rule
from fulcrum.platform.hf.registry import CONVERTERS, export_model_type
from fulcrum.platform.hf.safetensors_io import open_checkpoint, write_safetensors
from fulcrum.platform.optim import lora

__all__ = ["load_pretrained", "place_pretrained", "pretrained_config", "save_pretrained"]

Params = dict[str, Any]

# The dtypes a model loads to compute in, and that a checkpoint is saved in.
_DTYPE_CHOICES = f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}"
_FOLDER_HINT = "pass a local Hugging Face checkpoint folder (config.json + *.safetensors)"


def _checked_rules(converter: Converter, model: LM) -> list[tuple[Rule, tuple[int, ...]]]:
  """Each rule with its parameter's shape; the rules must cover the params tree exactly."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(tree["params"])).items()}
  rules = converter.rules(model.config)
  if sorted(r.path for r in rules) != sorted(shapes):
    raise AssertionError(f"converter rules {[r.path for r in rules]} != params {sorted(shapes)}")
  return [(r, shapes[r.path]) for r in rules]


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
  """The model_type of config.json and its converter, which must read its architecture."""
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


def _some(names: list[str]) -> str:
  """'a' or "'a' (and 3 more)": the first of a list of names for an error message."""
  return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _checked_weights(
  folder: Path, model_type: str, converter: Converter, model: LM
) -> tuple[dict[str, Any], list[tuple[Rule, tuple[int, ...]]]]:
  """The checkpoint's tensors (memory-mapped) and the rules with their params' shapes, once
  every tensor the model needs is there with its shape and none is left over."""
  config = model.config
  if not any(folder.glob("*.safetensors")):
    raise _no_weights_error(folder)
  weights, rules = open_checkpoint(folder), _checked_rules(converter, model)
  missing = [r.hf_name for r, _ in rules if r.hf_name not in weights]
  if missing:
    raise UserError(
      f"tensor {_some(missing)} is missing from {folder}; the checkpoint is "
      f"incomplete or not a {converter.architectures[0]} — re-download it"
    )
  # A tied model's checkpoint may still hold its (tied) lm_head.
  known = {r.hf_name for r, _ in rules} | ({LM_HEAD.hf_name} if config.tie_embeddings else set())
  unexpected = [n for n in weights if n not in known and not any(s in n for s in converter.ignored)]
  if unexpected:
    raise UserError(
      f"{folder} holds tensor {_some(sorted(unexpected))}, which a {model_type} "
      "model with this config.json lacks; make config.json (e.g. its bias or "
      "tie_word_embeddings settings) match the weights"
    )
  for rule, shape in rules:
    want, got = rule.layout.hf_shape(shape), weights[rule.hf_name].shape(rule.hf_name)
    if tuple(got) != tuple(want):
      raise UserError(
        f"tensor {rule.hf_name!r} has shape {tuple(got)} but config.json implies "
        f"{tuple(want)}; the config and weights of {folder} do not match"
      )
  return weights, rules


def _converted(weights: dict[str, Any], rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
  """One checkpoint tensor as its float32 Fulcrum parameter (read from the file now)."""
  array = weights[rule.hf_name][rule.hf_name]
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise UserError(f"tensor {rule.hf_name!r} is {array.dtype}, not float; re-save it as float")
  return np.asarray(rule.layout.to_fulcrum(array.astype(np.float32), shape), order="C")


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
  if dtype not in DTYPES:
    raise UserError(f"dtype {dtype!r} is not supported; use {_DTYPE_CHOICES}")
  folder, hf = _open_folder(path)
  model_type, converter = _converter(hf, folder)
  config = ModelConfig(**converter.to_config(hf), dtype=dtype)
  model = build(config)

  weights, rules = _checked_weights(folder, model_type, converter, model)
  flat = {rule.path: _converted(weights, rule, shape) for rule, shape in rules}
  return model, traverse_util.unflatten_dict(flat)


def pretrained_config(path: str | Path) -> dict[str, Any]:
  """The `ModelConfig` keyword arguments a local Hugging Face checkpoint folder's config.json
  describes (its family's `Converter.to_config`); reads no weights. UserError as `load_pretrained`.
  """
  folder, hf = _open_folder(path)
  return _converter(hf, folder)[1].to_config(hf)


def place_pretrained(path: str | Path, config: ModelConfig, abstract: Params) -> Params:
  """Reads a Hugging Face checkpoint folder straight into sharded params, one tensor at a time.

  Each parameter is read from the memory-mapped safetensors, converted to float32 (`Rule`,
  `Layout`) and put on its devices before the next is read, so the host never holds more than
  one parameter (one stacked group of layers with `scan_layers`) in float32.

  Args:
    path: the checkpoint folder (as for `load_pretrained`).
    config: the model's config: the checkpoint's architecture, with any `scan_layers`, `dtype`
      or `remat`, and extra parameters the checkpoint lacks (e.g. LoRA adapters).
    abstract: the model's params tree of `jax.ShapeDtypeStruct`s with their shardings.

  Returns:
    The params of `abstract` that the checkpoint holds, as `jax.Array`s in `abstract`'s
    shardings and dtypes; leaves the checkpoint lacks are absent from the tree.

  Raises:
    UserError: the folder cannot be loaded, or a tensor has no parameter of its shape in
      `abstract` (the message names the first).
  """
  folder, hf = _open_folder(path)
  model_type, converter = _converter(hf, folder)
  source = build(ModelConfig(**converter.to_config(hf)))
  weights, rules = _checked_weights(folder, model_type, converter, source)
  wanted = traverse_util.flatten_dict(abstract)
  # Unscanned layer path -> (the target's path, index on its stacked axis or None).
  layers = {
    own.path: (layer.path, layer.stacked)
    for layer, own in zip(layer_paths(config), layer_paths(config, scanned=False), strict=True)
  }
  targets: dict[tuple[str, ...], list[tuple[int | None, Rule, tuple[int, ...]]]] = {}
  for rule, shape in rules:
    target, stacked = rule.path, None
    if rule.path[:1] in layers:
      prefix, stacked = layers[rule.path[:1]]
      target = prefix + rule.path[1:]
    targets.setdefault(target, []).append((stacked, rule, shape))
  for target, entries in targets.items():
    shape = entries[0][2] if entries[0][0] is None else (len(entries), *entries[0][2])
    want = wanted.get(target)
    if want is None or tuple(want.shape) != tuple(shape):
      has = "no such param" if want is None else f"shape {tuple(want.shape)}"
      raise UserError(
        f"tensor {entries[0][1].hf_name!r} of {folder} is param {'/'.join(target)} of shape "
        f"{tuple(shape)}, but the model has {has}; use the checkpoint's model.* settings"
      )
  placed = {}
  for target, entries in targets.items():
    want = wanted[target]
    if entries[0][0] is None:
      host = _converted(weights, entries[0][1], entries[0][2]).astype(want.dtype)
    else:
      host = np.empty(want.shape, want.dtype)
      for stacked, rule, shape in entries:
        host[stacked] = _converted(weights, rule, shape)
    placed[target] = jax.make_array_from_callback(want.shape, want.sharding, host.__getitem__)
    del host  # Before the next parameter is read.
  return traverse_util.unflatten_dict(placed)


def _flat_unscanned(params: Params, config: ModelConfig) -> dict[tuple[str, ...], Any]:
  """The flat params, each layer under its unscanned path (`layer_paths(config, scanned=False)`).

  A `scan_layers` model stacks its layers on axis 0 of shared subtrees; a subtree that is absent
  is left for `save_pretrained` to report as missing params.
  """
  flat = traverse_util.flatten_dict(params)
  if not config.scan_layers:
    return flat
  unscanned = dict(flat)
  for layer, own in zip(layer_paths(config), layer_paths(config, scanned=False), strict=True):
    n = len(layer.path)
    for key, value in flat.items():
      if key[:n] == layer.path:
        unscanned.pop(key, None)
        unscanned[own.path + key[n:]] = value[layer.stacked]
  return unscanned


def save_pretrained(
  model: LM,
  params: Params,
  path: str | Path,
  *,
  dtype: str = "float32",
  max_position_embeddings: int = 4096,
  tokenizer: tokenizer_lib.Tokenizer | None = None,
  generation_config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a Fulcrum transformer as a Hugging Face checkpoint folder that transformers opens.

  The folder gets config.json (LlamaForCausalLM, or MistralForCausalLM when the model uses a
  sliding window) and model.safetensors. With the default float32 weights,
  `load_pretrained(path)` gives back exactly these params. A LoRA model (`model.lora_rank > 0`)
  is written with its adapters merged into the weights (`optim.lora.merge`).

  Args:
    model: the `LM` (its `config` decides the architecture written, `export_model_type`).
    params: its params, boxed or unboxed, with or without the outer {"params": ...}.
    path: the folder to write (created if needed; existing files of the same name replaced).
    dtype: the dtype stored in the safetensors file: float32, bfloat16 or float16.
    max_position_embeddings: the context length written to config.json (Fulcrum's RoPE has
      no limit; transformers uses it as a default generation limit).
    tokenizer: the model's tokenizer (`data.tokenizer.get_tokenizer`), checked against the
      model's vocabulary. A Hugging Face one is written as tokenizer.json +
      tokenizer_config.json (its eos_token), read back by `get_tokenizer("hf:" + folder)`;
      bytes has no Hugging Face form: tokenizer files left in the folder are removed instead.
      None: no tokenizer files are written or removed.
    generation_config: Hugging Face generation defaults for generation_config.json, e.g.
      {"do_sample": True, "temperature": 0.7, "top_p": 0.9}; its eos_token_id defaults to
      the tokenizer's EOS id. The file is always written.

  Returns:
    The folder written.

  Raises:
    UserError: the architecture cannot be exported, the params do not fit the model, the
      tokenizer has more ids than the model, or generation_config is not JSON.
  """
  if dtype not in DTYPES:
    raise UserError(f"dtype {dtype!r} cannot be saved; use {_DTYPE_CHOICES}")
  config = model.config
  converter = CONVERTERS[export_model_type(config)]
  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  if config.lora_rank:  # Export the adapted model: its adapters folded into the weights.
    params, config = lora.merge(params, config)
  flat = _flat_unscanned(params, config)
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
  generation = dict(generation_config or {})
  if tokenizer is not None:
    tokenizer_lib.check_vocab(tokenizer, config.vocab_size, key="the model's vocab_size")
    generation = {"eos_token_id": tokenizer.EOS_ID, **generation}
  try:
    generation = json.dumps(generation, indent=2, sort_keys=True)
  except TypeError as e:
    raise UserError(f"generation_config is not JSON ({e}); pass numbers, strings, bools") from None

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
  if isinstance(tokenizer, hf_tokenizer.HFTokenizer):
    tokenizer.save(folder)
  elif tokenizer is not None:  # Bytes: a tokenizer saved here before would pass for this one's.
    for stale in (hf_tokenizer.FILE, hf_tokenizer.CONFIG_FILE):
      (folder / stale).unlink(missing_ok=True)
  (folder / "generation_config.json").write_text(generation + "\n")
  return folder
