"""The language-model shell shared by every architecture: embed → blocks → norm → logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

from fulcrum.modules.config import ModelConfig
from fulcrum.modules.layers import EMBED, VOCAB, Embedder, RMSNorm, dense
from fulcrum.modules.transformer import TransformerBlock

BLOCKS: dict[str, type[nn.Module]] = {"transformer": TransformerBlock}


class _ScanStep(nn.Module):
  """Adapts a block to `nn.scan`'s (carry, x) -> (carry, y) signature; the cache is the y."""

  config: ModelConfig
  block: type[nn.Module]

  @nn.compact
  def __call__(self, x, positions, cache):
    block = self.block
    if self.config.remat:
      block = nn.remat(block, prevent_cse=False)
    return block(self.config, name="block")(x, positions, cache)


class LM(nn.Module):
  """Decoder-only language model over a stack of `config.num_layers` blocks.

  `apply(variables, tokens)` returns float32 logits [b, t, v]; `apply(..., method=LM.decode)`
  runs tokens through a cache made by `init_cache` and returns (logits, cache).
  """

  config: ModelConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=jnp.float32)
    self.embedder = Embedder(
      c.vocab_size, c.d_model, stddev=c.d_model**-0.5 if c.tie_embeddings else 1.0, **kw
    )
    block = BLOCKS[c.arch]
    if c.scan_layers:
      self.blocks = nn.scan(
        _ScanStep,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, block)
    else:
      cls = nn.remat(block) if c.remat else block
      self.blocks = [cls(c, name=f"blocks_{i}") for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.norm_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = dense(c.d_model, c.vocab_size, (EMBED, VOCAB), "lm_head", **kw)

  def _run(self, tokens, positions, cache):
    x = self.embedder(tokens)
    if self.config.scan_layers:
      x, cache = self.blocks(x, positions, cache)
    else:
      new = []
      for i, block in enumerate(self.blocks):
        x, layer_cache = block(x, positions, None if cache is None else cache[i])
        new.append(layer_cache)
      cache = None if cache is None else tuple(new)
    x = self.final_norm(x)
    logits = self.embedder.attend(x) if self.config.tie_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32), cache

  def __call__(
    self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"] | None = None
  ) -> Float[Array, "b t v"]:
    return self._run(tokens, positions, None)[0]

  def decode(
    self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], cache: Any
  ) -> tuple[Float[Array, "b t v"], Any]:
    """Runs t new tokens at `positions` through the cache; returns their logits and the cache."""
    return self._run(tokens, positions, cache)

  def init_cache(self, batch: int, max_len: int) -> Any:
    """An empty cache for `batch` sequences of up to `max_len` tokens (a pytree of arrays)."""
    c = self.config
    block = BLOCKS[c.arch](c, parent=None)
    if c.scan_layers:
      one = block.init_cache(batch, max_len)
      return type(one)(*(jnp.broadcast_to(a, (c.num_layers, *a.shape)) for a in one))
    return tuple(block.init_cache(batch, max_len) for _ in range(c.num_layers))


def build(model_config: Mapping[str, Any] | ModelConfig) -> LM:
  """The model a config describes (`model.*` section of a recipe, a dict or a ModelConfig)."""
  config = ModelConfig.from_mapping(model_config)
  if config.arch not in BLOCKS:
    raise ValueError(f"unknown model.arch {config.arch!r}; known: {', '.join(BLOCKS)}")
  return LM(config)
