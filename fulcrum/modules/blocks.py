"""The block registry and the layer layout: which block each layer is, and where it lives.

`BLOCKS` maps each block-stack `model.arch` to its block class or the pattern of classes the
layers cycle through (layer i is pattern[i % len(pattern)]). `layer_paths(config)` is the one
place that knows where a layer's parameters, activations and cache sit in the model's trees:

  unscanned               params["blocks_3"]             cache[3]
  scan_layers, period 1   params["blocks"]["block"][3]   cache[..., 3 on the leading axis]
  scan_layers, period p   params["blocks"]["block_j"][g] cache[j][g]   (layer i = g·p + j)

KV-cache calibration, attribution maps and the Hugging Face converters read layers through it
and never spell those names themselves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import linen as nn

from fulcrum.modules.griffin import GRIFFIN_PATTERN, RecurrentResidualBlock
from fulcrum.modules.layers import check_lora
from fulcrum.modules.mamba import MambaBlock
from fulcrum.modules.model_config import ModelConfig
from fulcrum.modules.transformer import TransformerBlock

# model.arch → its block class, or the tuple of classes that the layers cycle through.
BLOCKS: dict[str, type[nn.Module] | tuple[type[nn.Module], ...]] = {
  "transformer": TransformerBlock,
  "mamba": MambaBlock,
  "hawk": RecurrentResidualBlock,
  "griffin": GRIFFIN_PATTERN,  # (recurrent, recurrent, local attention)
}
BLOCK_ARCHS = tuple(BLOCKS)

# Token-mixer kinds a block class declares in its `mixer` class attribute.
MIXERS = ("attention", "mamba", "rg_lru")


def block_pattern(arch: str) -> tuple[type[nn.Module], ...]:
  """The block classes of `arch`'s layers, cycled: layer i is pattern[i % len(pattern)]."""
  if arch not in BLOCKS:
    raise ValueError(f"unknown model.arch {arch!r} for a block stack; known: {', '.join(BLOCKS)}")
  blocks = BLOCKS[arch]
  return blocks if isinstance(blocks, tuple) else (blocks,)


def dense_names(arch: str) -> tuple[str, ...]:
  """The weight matmuls (`Dense` names) of `arch`'s blocks: what `model.lora_targets` names."""
  return tuple(dict.fromkeys(n for block in block_pattern(arch) for n in block.dense_names))


def validate(config: ModelConfig) -> None:
  """Raises ValueError for an unknown arch, a layer stack `nn.scan` cannot stack, or a value
  one of the arch's blocks refuses (each block class checks the keys it reads in its
  `check_config`; LoRA targets must be among the blocks' `dense_names`)."""
  pattern = block_pattern(config.arch)
  for block in dict.fromkeys(pattern):
    block.check_config(config)
  check_lora(config, dense_names(config.arch))
  period = len(pattern)
  if config.scan_layers and config.num_layers % period:
    raise ValueError(
      f"model.scan_layers scans {config.arch} in groups of {period} layers (its block pattern), "
      f"but model.num_layers={config.num_layers} is not a multiple of {period}; change "
      "model.num_layers or set model.scan_layers=False"
    )


def block_name(index: int) -> str:
  """The submodule name of unscanned layer `index` (also what a forecaster's stack uses)."""
  return f"blocks_{index}"


class LayerPath(NamedTuple):
  """Where one layer lives.

  Attributes:
    index: the layer's number, 0 .. num_layers - 1.
    block: its block class (its `mixer` and `mixer_path` name the token mixer).
    path: the key path of its subtree in params / intermediates / other collections.
    stacked: with `scan_layers`, its index on the leading (stacked) axis of that subtree.
    cache: the index path of its cache in the model's cache pytree; with `scan_layers` the
      cache there is stacked too, `stacked` on its leading axis.
  """

  index: int
  block: type[nn.Module]
  path: tuple[str, ...]
  stacked: int | None
  cache: tuple[int, ...]

  @property
  def name(self) -> str:
    """ "blocks_3", or "blocks/block_1[2]" for a stacked layer."""
    return "/".join(self.path) + ("" if self.stacked is None else f"[{self.stacked}]")

  @property
  def mixer(self) -> str:
    return self.block.mixer

  def subtree(self, tree: Any, *sub: str) -> Any:
    """This layer's entry of a params-shaped tree (unstacked), then the keys `sub` below it."""
    for key in (*self.path, *sub):
      tree = tree[key]
    return tree if self.stacked is None else jax.tree.map(lambda a: a[self.stacked], tree)


def layer_paths(config: ModelConfig, *, scanned: bool | None = None) -> list[LayerPath]:
  """Every layer of a block stack, in order.

  Args:
    config: the model config (`arch`, `num_layers`, `scan_layers`).
    scanned: override `config.scan_layers` (forecasters always unroll their stack).
  """
  pattern = block_pattern(config.arch)
  period = len(pattern)
  scanned = config.scan_layers if scanned is None else scanned
  layers = []
  for i in range(config.num_layers):
    block, j, group = pattern[i % period], i % period, i // period
    if not scanned:
      layers.append(LayerPath(i, block, (block_name(i),), None, (i,)))
    elif period == 1:
      layers.append(LayerPath(i, block, ("blocks", "block"), group, ()))
    else:
      layers.append(LayerPath(i, block, ("blocks", f"block_{j}"), group, (j,)))
  return layers


def layer_groups(config: ModelConfig) -> list[LayerPath]:
  """One `LayerPath` per distinct subtree: every layer unscanned, the first of each stacked
  group with `scan_layers` (its `stacked` is then 0 and stands for the whole group)."""
  seen, out = set(), []
  for layer in layer_paths(config):
    if layer.path not in seen:
      seen.add(layer.path)
      out.append(layer)
  return out
