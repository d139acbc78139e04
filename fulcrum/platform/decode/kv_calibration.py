"""KV-cache quantization for a trained model: calibration, cache conversion, files, perplexity.

`calibrate` runs a model over calibration batches, collects every attention layer's cached
keys (pre-RoPE) and values together with the squared gradients of the loss with respect to
them (the diagonal Fisher information KVQuant weighs its k-means with), and fits one
`kvquant.KVQuantSpec` per layer. The specs form a pytree shaped like the model's cache
(attention layers → spec, recurrent layers → None; stacked for `scan_layers`), which
`quantized_cache` uses to replace each `KVCache` with a `QuantizedKVCache`.

Methods (`method`): "kvquant" (NUQ codebooks, per-channel pre-RoPE keys, 1% dense-and-sparse
outliers), "int-token" (uniform, keys and values per token, post-RoPE: the usual integer
baseline), "int-channel" (uniform, keys per channel pre-RoPE, values per token).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.modules import kv_codebooks, kvquant
from fulcrum.modules.attention import KVCache, QuantizedKVCache
from fulcrum.platform.decode import cache as cache_lib
from fulcrum.platform.errors import UserError

METHODS = ("kvquant", "int-token", "int-channel")
BITS = (2, 3, 4)  # Bits per cached key/value entry the methods are calibrated for.


def quantized_cache(cache: Any, specs: Any) -> Any:
  """`cache` with every attention layer's `KVCache` replaced by an empty `QuantizedKVCache`."""

  def convert(node, spec):
    if not isinstance(node, KVCache):
      return node
    b, s, k, e = node.k.shape[-4:]
    init = lambda sp: QuantizedKVCache.init(b, s, k, e, sp)
    for _ in range(node.k.ndim - 4):  # Stacked layers: one cache per stacked spec.
      init = jax.vmap(init)
    return init(spec)

  return jax.tree.map(convert, cache, specs, is_leaf=cache_lib._is_layer_cache)


def _attention_paths(model) -> list[tuple[tuple[str, ...], int | None]]:
  """(module path of each attention layer's block, stacked-layer count or None), in cache order."""
  from fulcrum.modules.lm import block_pattern

  c = model.config
  pattern = block_pattern(c.arch)
  is_attention = lambda cls: "Attention" in cls.__name__ or cls.__name__ == "TransformerBlock"
  if c.scan_layers:
    groups = c.num_layers // len(pattern)
    if len(pattern) == 1:
      return [(("blocks", "block"), groups)] if is_attention(pattern[0]) else []
    return [(("blocks", f"block_{j}"), groups) for j, b in enumerate(pattern) if is_attention(b)]
  return [
    ((f"blocks_{i}",), None) for i in range(c.num_layers) if is_attention(pattern[i % len(pattern)])
  ]


def _find(tree: Any, name: str) -> Any:
  """The value under the first key `name` in a nested dict (depth first)."""
  if isinstance(tree, dict):
    if name in tree:
      return tree[name]
    for v in tree.values():
      found = _find(v, name)
      if found is not None:
        return found
  return None


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


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
  paths = _attention_paths(model)
  step = functools.partial(_loss_grads, model, params)

  names = ("keys", "values", "key_fisher", "value_fisher")
  per_layer: list[dict[str, list[np.ndarray]]] = []
  for tokens in batches:
    grads, inter = step(jnp.asarray(tokens, jnp.int32))
    layer = 0
    for path, groups in paths:
      g_sub, i_sub = _get(grads, path), _get(inter, path)
      k_act, v_act = _find(i_sub, "keys")[0], _find(i_sub, "values")[0]
      k_grad, v_grad = _find(g_sub, "keys"), _find(g_sub, "values")
      arrays = [np.asarray(a) for a in (k_act, v_act, k_grad, v_grad)]
      for j in range(groups or 1):
        pick = (lambda a, j=j: a[j]) if groups else (lambda a: a)
        k_a, v_a, k_g, v_g = (pick(a)[:, 1:] for a in arrays)  # Drop the sink token.
        if len(per_layer) <= layer:
          per_layer.append({k: [] for k in names})
        entry = per_layer[layer]
        flat = lambda a: a.reshape(-1, *a.shape[-2:])
        entry["keys"].append(flat(k_a))
        entry["values"].append(flat(v_a))
        entry["key_fisher"].append(flat(k_g) ** 2)
        entry["value_fisher"].append(flat(v_g) ** 2)
        layer += 1
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
  c = model.config
  paths = _attention_paths(model)
  if not paths:
    raise ValueError(f"model.arch={c.arch} has no attention layers: there is no KV cache")
  need_data = method != "int-token"
  stats = collect(model, params, batches) if need_data else None
  kv = _attention_nodes(model)[0]
  layer_specs = []
  layer = 0
  for _, groups in paths:
    group = []
    for _ in range(groups or 1):
      if method == "kvquant":
        spec = kv_codebooks.calibrate(
          stats["keys"][layer],
          stats["key_fisher"][layer],
          stats["values"][layer],
          stats["value_fisher"][layer],
          bits,
          outlier_fraction,
        )
      else:
        k, e = kv.k.shape[-2:]
        keys = stats["keys"][layer] if method == "int-channel" else None
        spec = kv_codebooks.uniform(bits, k, e, key_mode=method.split("-")[1], keys=keys)
      group.append(spec)
      layer += 1
    layer_specs.append(jax.tree.map(lambda *xs: jnp.stack(xs), *group) if groups else group[0])
  return _arrange(model, layer_specs)


def _arrange(model, layer_specs: list[Any]) -> Any:
  """Places per-attention-layer specs where the cache has its attention layers."""
  cache = jax.eval_shape(lambda: model.init_cache(1, 1))
  it = iter(layer_specs)
  return jax.tree.map(
    lambda node: next(it) if isinstance(node, KVCache) else None,
    cache,
    is_leaf=cache_lib._is_layer_cache,
  )


def _attention_nodes(model) -> int:
  cache = jax.eval_shape(lambda: model.init_cache(1, 1))
  nodes = jax.tree.leaves(cache, is_leaf=cache_lib._is_layer_cache)
  return [n for n in nodes if isinstance(n, KVCache)]


def bytes_per_token(model, specs: Any | None = None) -> int:
  """KV-cache bytes one token occupies over all attention layers: as quantized by `specs`, or
  in bfloat16 when None (the 16-bit cache quantization is compared with)."""
  nodes = _attention_nodes(model)
  spec_list = [None] * len(nodes) if specs is None else _spec_leaves(specs)
  total = 0
  for node, spec in zip(nodes, spec_list, strict=True):
    layers = math.prod(node.k.shape[:-4])
    k, e = node.k.shape[-2:]
    if spec is None:
      total += layers * 2 * k * e * 2
      continue
    for _ in range(node.k.ndim - 4):  # Stacked: every layer stores the same layout.
      spec = jax.tree.map(lambda a: a[0], spec)
    total += layers * kvquant.bytes_per_token(spec, k, e)
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


def save(path: str | Path, specs: Any, info: dict[str, Any]) -> None:
  """Writes specs (with `info`: method, bits, step, ...) to a .npz file, atomically."""
  leaves = _spec_leaves(specs)
  arrays = {
    f"{i}/{f}": np.asarray(getattr(s, f)) for i, s in enumerate(leaves) for f in _ARRAY_FIELDS
  }
  layers = [{f: getattr(s, f) for f in _STATIC_FIELDS} for s in leaves]
  meta = json.dumps({"info": info, "layers": layers})
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, meta=np.asarray(meta), **arrays)
  tmp.replace(path)


def load(path: str | Path, model) -> tuple[Any, dict[str, Any]]:
  """Specs saved by `save`, placed for `model`'s cache; returns (specs, info).

  Raises:
    ValueError: the file does not hold one spec per attention layer group of `model`.
  """
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
    layers = [
      kvquant.KVQuantSpec(
        **{name: jnp.asarray(f[f"{i}/{name}"]) for name in _ARRAY_FIELDS},
        **{name: m[name] for name in _STATIC_FIELDS},
      )
      for i, m in enumerate(meta["layers"])
    ]
  nodes = _attention_nodes(model)
  if len(layers) != len(nodes):
    raise ValueError(
      f"{path} holds {len(layers)} attention layer(s), the model has {len(nodes)}; recalibrate"
    )
  return _arrange(model, layers), meta["info"]


def spec_path(workdir: str | Path, step: int, method: str, bits: int) -> Path:
  """Where `fulcrum calibrate` keeps a checkpoint's specs: DIR/kvquant/step_S/METHOD_BITS.npz."""
  return Path(workdir) / "kvquant" / f"step_{step}" / f"{method}_{bits}bit.npz"


def calibrate_experiment(
  exp,
  params,
  step: int,
  workdir: str | Path,
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
  if exp.config.task != "lm":
    raise UserError(f"{workdir} trains task {exp.config.task!r}; calibrate needs a language model")
  if not _attention_paths(exp.model):
    raise UserError(
      f"model.arch={exp.config.model.arch} has no attention layers, so no KV cache to quantize"
    )
  iterator = exp.task.train_iterator(0, 1)
  batches = [
    np.asarray(next(iterator)["inputs"]) for _ in range(num_batches or d.calibration_batches)
  ]
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
