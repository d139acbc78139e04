"""The language-model shell shared by every architecture: embed → blocks → norm → logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

from fulcrum.modules.blocks import block_name, block_pattern, validate
from fulcrum.modules.layers import EMBED, VOCAB, Embedder, RMSNorm, dense, tap
from fulcrum.modules.model_config import ModelConfig


class _ScanStep(nn.Module):
  """Adapts one period of the block pattern to `nn.scan`'s (carry, x) -> (carry, y) signature;
  the cache is the y. A one-block pattern (homogeneous stack) names its block "block"; a longer
  one names them "block_0", "block_1", ... and carries a tuple of their caches."""

  config: ModelConfig
  block: tuple[type[nn.Module], ...]

  @nn.compact
  def __call__(self, x, positions, cache):
    blocks = self.block
    if self.config.remat:
      blocks = tuple(nn.remat(b, prevent_cse=False) for b in blocks)
    if len(blocks) == 1:
      return blocks[0](self.config, name="block")(x, positions, cache)
    new = []
    for j, block in enumerate(blocks):
      x, layer_cache = block(self.config, name=f"block_{j}")(
        x, positions, None if cache is None else cache[j]
      )
      new.append(layer_cache)
    return x, None if cache is None else tuple(new)


class LM(nn.Module):
  """Decoder-only language model over a stack of `config.num_layers` blocks.

  `apply(variables, tokens)` returns float32 logits [b, t, v]; `apply(..., method="decode")`
  runs tokens through a cache made by `init_cache` and returns (logits, cache).

  Layer i is `block_pattern(arch)[i % period]`. With `scan_layers`, `nn.scan` runs over groups of
  one period (Griffin: 3 layers, so num_layers must be a multiple of 3); parameters and caches
  are stacked per group under blocks/block (period 1) or blocks/block_j and a tuple of caches.
  """

  config: ModelConfig

  def setup(self):
    c = self.config
    validate(c)
    kw = dict(dtype=c.compute_dtype, param_dtype=jnp.float32)
    self.embedder = Embedder(
      c.vocab_size,
      c.d_model,
      scale_by_sqrt_dim=c.scale_embeddings,
      scale_in_bf16=c.embed_scale_bf16,
      stddev=c.d_model**-0.5 if c.tie_embeddings else 1.0,
      **kw,
    )
    pattern = block_pattern(c.arch)
    if c.scan_layers:
      self.blocks = nn.scan(
        _ScanStep,
        variable_axes={"params": 0, "intermediates": 0, "perturbations": 0, "attention": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0),
        length=c.num_layers // len(pattern),
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, pattern)
    else:
      classes = [nn.remat(b) if c.remat else b for b in pattern]
      self.blocks = [classes[i % len(classes)](c, name=block_name(i)) for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.norm_eps, **kw)
    if not c.tie_embeddings:
      self.lm_head = dense(c.d_model, c.vocab_size, (EMBED, VOCAB), "lm_head", **kw)

  def _run(self, tokens, positions, cache):
    # Attribution of token inputs happens here, at the embeddings (`layers.tap`).
    x = tap(self, "embeddings", self.embedder(tokens))
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
    logits = logits.astype(jnp.float32)
    if cap := self.config.logits_soft_cap:
      logits = cap * jnp.tanh(logits / cap)
    return logits, cache

  def __call__(
    self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"] | None = None
  ) -> Float[Array, "b t v"]:
    return self._run(tokens, positions, None)[0]

  def decode(
    self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], cache: Any
  ) -> tuple[Float[Array, "b t v"], Any]:
    """Runs t new tokens at `positions` through the cache; returns their logits and the cache."""
    return self._run(tokens, positions, cache)

  def init_cache(self, batch: int, max_len: int, extra: int = 0) -> Any:
    """An empty cache for `batch` sequences of up to `max_len` tokens (a pytree of arrays).

    `extra`: slots a local-attention ring buffer keeps beyond its window, so a verified chunk
    of up to `extra` tokens can be rolled back (speculative and lookahead decoding).
    """
    c = self.config
    pattern = block_pattern(c.arch)
    caches = [block(c, parent=None).init_cache(batch, max_len, extra) for block in pattern]
    if c.scan_layers:
      groups = c.num_layers // len(pattern)
      stacked = [jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)), x) for x in caches]
      return stacked[0] if len(pattern) == 1 else tuple(stacked)
    return tuple(caches[i % len(pattern)] for i in range(c.num_layers))
