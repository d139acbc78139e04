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
from fulcrum.platform.errors import UserError
from fulcrum.platform.hf.convert import LM_HEAD, Converter, Rule
from fulcrum.platform.hf.registry import CONVERTERS, export_model_type
from fulcrum.platform.hf.safetensors_io import open_checkpoint, write_safetensors

__all__ = ["load_pretrained", "save_pretrained"]

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
) -> Path:
  """Writes a Fulcrum transformer as a Hugging Face checkpoint folder that transformers opens.

  The folder gets config.json (LlamaForCausalLM, or MistralForCausalLM when the model uses a
  sliding window) and model.safetensors. With the default float32 weights,
  `load_pretrained(path)` gives back exactly these params.

  Args:
    model: the `LM` (its `config` decides the architecture written, `export_model_type`).
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
  if dtype not in DTYPES:
    raise UserError(f"dtype {dtype!r} cannot be saved; use {_DTYPE_CHOICES}")
  config = model.config
  converter = CONVERTERS[export_model_type(config)]
  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
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
