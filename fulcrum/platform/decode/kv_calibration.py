"""KV-cache quantization for a trained model: calibration, cache conversion, files, perplexity.

`calibrate` runs a model over calibration batches, collects every attention layer's cached
keys (pre-RoPE) and values together with the squared gradients of the loss with respect to
them (the diagonal Fisher information KVQuant weighs its k-means with), and fits one
`kvquant.KVQuantSpec` per layer. The specs form a pytree shaped like the model's cache
(attention layers → spec, recurrent layers → None; stacked for `scan_layers`), which
`cache.quantized_cache` uses to replace each `KVCache` with a `QuantizedKVCache`. Where each
layer's parameters, activations and cache live comes from `modules.blocks.layer_paths`.

Methods (`method`): "kvquant" (NUQ codebooks, per-channel pre-RoPE keys, 1% dense-and-sparse
outliers), "int-token" (uniform, keys and values per token, post-RoPE: the usual integer
baseline), "int-channel" (uniform, keys per channel pre-RoPE, values per token).
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fulcrum.modules import kv_codebooks, kvquant
from fulcrum.modules.attention import KVCache
from fulcrum.modules.blocks import LayerPath, layer_groups, layer_paths
from fulcrum.platform import files
from fulcrum.platform.decode.cache import is_layer_cache, quantized_cache
from fulcrum.platform.errors import UserError

METHODS = ("kvquant", "int-token", "int-channel")
BITS = (2, 3, 4)  # Bits per cached key/value entry the methods are calibrated for.


class _Group(NamedTuple):
  """One attention entry of a model's cache: a layer, or with `scan_layers` a stacked group."""

  cache: tuple[int, ...]  # Its index path in the cache (`LayerPath.cache`).
  layers: list[LayerPath]  # Its layers, in stacked order (one when unstacked).
  kv: KVCache  # Its cache's shapes (`jax.ShapeDtypeStruct` leaves).

  @property
  def stacked(self) -> bool:
    """Its cache and specs carry a leading layer axis."""
    return self.layers[0].stacked is not None


def _attention_groups(model) -> list[_Group]:
  """Every attention entry of `model`'s cache, in cache order (the order of its tree leaves)."""
  cache = jax.eval_shape(lambda: model.init_cache(1, 1))
  attention = [layer for layer in layer_paths(model.config) if layer.mixer == "attention"]
  groups = []
  for first in layer_groups(model.config):
    if first.mixer != "attention":
      continue
    node = cache
    for i in first.cache:
      node = node[i]
    groups.append(_Group(first.cache, [x for x in attention if x.path == first.path], node))
  return groups


@functools.partial(jax.jit, static_argnames=("model",))
def _loss_grads(model, params, tokens):
  """Gradients of the summed next-token NLL with respect to every attention layer's cached keys
  and values (zero perturbations added to them), and the sown keys and values themselves."""
  inputs = tokens[:, :-1]
  shapes = jax.eval_shape(
    lambda: model.apply({"params": params}, inputs, mutable=["perturbations"])[1]
  )["perturbations"]
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def loss(perturbations):
    logits, state = model.apply(
      {"params": params, "perturbations": perturbations}, inputs, mutable=["intermediates"]
    )
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()
    return nll, state["intermediates"]

  return jax.grad(loss, has_aux=True)(zeros)


def collect(model, params, batches: Iterable[np.ndarray]) -> dict[str, list[np.ndarray]]:
  """Pre-RoPE keys, values and their squared loss gradients of every attention layer.

  Returns:
    {"keys", "values", "key_fisher", "value_fisher"}: per attention layer (in cache order; a
    stacked layer group contributes one entry per layer) an [n, k, e] array over all tokens
    but each sequence's first (the attention sink, kept in full precision).
  """
  layers = [layer for group in _attention_groups(model) for layer in group.layers]
  step = functools.partial(_loss_grads, model, params)
  names = ("keys", "values", "key_fisher", "value_fisher")
  per_layer = [{k: [] for k in names} for _ in layers]
  flat = lambda a: a.reshape(-1, *a.shape[-2:])
  for tokens in batches:
    grads, inter = jax.device_get(step(jnp.asarray(tokens, jnp.int32)))
    for layer, entry in zip(layers, per_layer, strict=True):
      mixer = layer.block.mixer_path
      k_act, v_act = (layer.subtree(inter, *mixer, name)[0] for name in ("keys", "values"))
      k_grad, v_grad = (layer.subtree(grads, *mixer, name) for name in ("keys", "values"))
      # [b, t, k, e], the first token (the attention sink) dropped.
      entry["keys"].append(flat(k_act[:, 1:]))
      entry["values"].append(flat(v_act[:, 1:]))
      entry["key_fisher"].append(flat(k_grad[:, 1:]) ** 2)
      entry["value_fisher"].append(flat(v_grad[:, 1:]) ** 2)
  return {k: [np.concatenate(e[k]) for e in per_layer] for k in names}


def calibrate(
  model,
  params,
  batches: Iterable[np.ndarray],
  bits: int = 3,
  method: str = "kvquant",
  outlier_fraction: float = 0.01,
) -> Any:
  """Per-layer KV-cache quantization specs shaped like the model's cache.

  Args:
    model: an `LM` with attention layers.
    params: its parameters.
    batches: [b, t] token batches to calibrate on.
    bits: bits per cached entry.
    method: kvquant | int-token | int-channel (see the module docstring).
    outlier_fraction: KVQuant's dense-and-sparse outlier fraction per vector.
  """
  if method not in METHODS:
    raise ValueError(f"unknown KV-cache method {method!r}; choose one of {', '.join(METHODS)}")
  groups = _attention_groups(model)
  if not groups:
    raise ValueError(
      f"model.arch={model.config.arch} has no attention layers: there is no KV cache"
    )
  stats = collect(model, params, batches) if method != "int-token" else None
  group_specs, layer = [], 0
  for group in groups:
    specs = []
    for _ in group.layers:
      if method == "kvquant":
        fields = ("keys", "key_fisher", "values", "value_fisher")
        specs.append(
          kv_codebooks.calibrate(*(stats[f][layer] for f in fields), bits, outlier_fraction)
        )
      else:
        k, e = group.kv.k.shape[-2:]
        keys = stats["keys"][layer] if method == "int-channel" else None
        specs.append(kv_codebooks.uniform(bits, k, e, key_mode=method.split("-")[1], keys=keys))
      layer += 1
    group_specs.append(
      jax.tree.map(lambda *xs: jnp.stack(xs), *specs) if group.stacked else specs[0]
    )
  return _arrange(model, group_specs)


def _arrange(model, group_specs: list[Any]) -> Any:
  """Specs shaped like `model`'s cache: each attention group's at its cache entry, None at the
  recurrent layers'."""
  where = {g.cache: spec for g, spec in zip(_attention_groups(model), group_specs, strict=True)}
  cache = jax.eval_shape(lambda: model.init_cache(1, 1))
  return jax.tree_util.tree_map_with_path(
    lambda path, _: where.get(tuple(key.idx for key in path)), cache, is_leaf=is_layer_cache
  )


def bytes_per_token(model, specs: Any | None = None) -> int:
  """KV-cache bytes one token occupies over all attention layers: as quantized by `specs`, or
  in bfloat16 when None (the 16-bit cache quantization is compared with)."""
  groups = _attention_groups(model)
  spec_list = [None] * len(groups) if specs is None else _spec_leaves(specs)
  total = 0
  for group, spec in zip(groups, spec_list, strict=True):
    k, e = group.kv.k.shape[-2:]
    if spec is None:
      total += len(group.layers) * 2 * k * e * 2
      continue
    if group.stacked:  # Every layer of the group stores the same layout.
      spec = jax.tree.map(lambda a: a[0], spec)
    total += len(group.layers) * kvquant.bytes_per_token(spec, k, e)
  return total


def _spec_leaves(specs: Any) -> list[kvquant.KVQuantSpec]:
  return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, kvquant.KVQuantSpec))


@functools.partial(jax.jit, static_argnames=("model",))
def _cache_nll(model, params, tokens, specs):
  """Summed next-token NLL of [b, t] tokens with every key/value read through the cache."""
  b, t = tokens.shape
  cache = model.init_cache(b, t)
  if specs is not None:
    cache = quantized_cache(cache, specs)
  positions = jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))
  logits, _ = model.apply({"params": params}, tokens[:, :-1], positions, cache, method="decode")
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()


def perplexity(model, params, sequences: np.ndarray, specs: Any | None) -> float:
  """Perplexity of [n, t] sequences when every key and value goes through the KV cache
  (quantized by `specs`, or full precision when None), one prefill pass per batch of 8.

  Attention reads the chunk being decoded through the quantizer too, so this is what decoding
  token by token gives (up to float rounding deciding an entry right at a calibrated outlier
  threshold)."""
  sequences = np.asarray(sequences, np.int32)
  n, t = sequences.shape
  total = sum(
    float(_cache_nll(model, params, jnp.asarray(sequences[i : i + 8]), specs))
    for i in range(0, n, 8)
  )
  return math.exp(total / (n * (t - 1)))


_ARRAY_FIELDS = ("key_codebook", "value_codebook", "key_center", "key_scale")
_STATIC_FIELDS = ("key_mode", "outliers", "outlier_dtype", "scale_dtype", "pre_rope")


def save(path: epath.PathLike, specs: Any, info: dict[str, Any]) -> None:
  """Writes specs (with `info`: method, bits, step, ...) to a .npz file (local or an object
  store URL such as gs://), whole or not at all."""
  leaves = _spec_leaves(specs)
  arrays = {
    f"{i}/{f}": np.asarray(getattr(s, f)) for i, s in enumerate(leaves) for f in _ARRAY_FIELDS
  }
  layers = [{f: getattr(s, f) for f in _STATIC_FIELDS} for s in leaves]
  meta = json.dumps({"info": info, "layers": layers})
  buffer = io.BytesIO()
  np.savez(buffer, meta=np.asarray(meta), **arrays)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, buffer.getvalue())


def load(path: epath.PathLike, model) -> tuple[Any, dict[str, Any]]:
  """Specs saved by `save`, placed for `model`'s cache; returns (specs, info).

  Raises:
    ValueError: the file does not hold one spec per attention layer group of `model`.
  """
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
    meta = json.loads(str(f["meta"]))
    layers = [
      kvquant.KVQuantSpec(
        **{name: jnp.asarray(f[f"{i}/{name}"]) for name in _ARRAY_FIELDS},
        **{name: m[name] for name in _STATIC_FIELDS},
      )
      for i, m in enumerate(meta["layers"])
    ]
  groups = _attention_groups(model)
  if len(layers) != len(groups):
    raise ValueError(
      f"{path} holds {len(layers)} attention layer(s), the model has {len(groups)}; recalibrate"
    )
  return _arrange(model, layers), meta["info"]


def spec_path(workdir: epath.PathLike, step: int, method: str, bits: int) -> epath.Path:
  """Where `fulcrum calibrate` keeps a checkpoint's specs: DIR/kvquant/step_S/METHOD_BITS.npz."""
  return epath.Path(workdir) / "kvquant" / f"step_{step}" / f"{method}_{bits}bit.npz"


def calibrate_experiment(
  exp,
  params,
  step: int,
  workdir: epath.PathLike,
  *,
  method: str | None = None,
  bits: int | None = None,
  num_batches: int | None = None,
) -> dict[str, Any]:
  """Fits KV-cache specs for a loaded checkpoint (`workdir.load`) and saves them beside it.

  Defaults come from the experiment's `decode.*` config (kvquant when `decode.kv_cache` is
  none). Returns a summary: path, bytes per token against bfloat16, validation perplexity of
  the full-precision and quantized caches.
  """
  d = exp.config.decode
  method = method or (d.kv_cache if d.kv_cache != "none" else "kvquant")
  bits = bits or d.kv_bits
  if method not in METHODS:
    raise UserError(f"unknown KV-cache method {method!r}; choose one of {', '.join(METHODS)}")
  if bits not in BITS:
    raise UserError(f"KV-cache bits must be one of {', '.join(map(str, BITS))}, got {bits}")
  num_batches = d.calibration_batches if num_batches is None else num_batches
  if num_batches < 1:
    raise UserError(f"calibration batches (--batches) must be >= 1, got {num_batches}")
  if exp.config.task != "lm":
    raise UserError(f"{workdir} trains task {exp.config.task!r}; calibrate needs a language model")
  if not _attention_groups(exp.model):
    raise UserError(
      f"model.arch={exp.config.model.arch} has no attention layers, so no KV cache to quantize"
    )
  iterator = exp.task.train_iterator(0, 1)
  batches = [np.asarray(next(iterator)["inputs"]) for _ in range(num_batches)]
  specs = calibrate(exp.model, params, batches, bits, method, d.kv_outlier_fraction)
  path = spec_path(workdir, step, method, bits)
  save(path, specs, {"method": method, "bits": bits, "step": step})
  eval_batches = exp.task.eval_sets(0, 1)[""]
  sequences = np.concatenate([np.asarray(b["inputs"]) for b in eval_batches])
  full = perplexity(exp.model, params, sequences, None)
  quantized = perplexity(exp.model, params, sequences, specs)
  return {
    "path": str(path),
    "method": method,
    "bits": bits,
    "step": step,
    "bytes_per_token": bytes_per_token(exp.model, specs),
    "bf16_bytes_per_token": bytes_per_token(exp.model, None),
    "perplexity": quantized,
    "full_precision_perplexity": full,
  }
