"""The language-model shell shared by every architecture: embed → blocks → norm → logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float, Int

from fulcrum.modules import quant
from fulcrum.modules.config import ModelConfig
from fulcrum.modules.griffin import GRIFFIN_PATTERN, RecurrentResidualBlock
from fulcrum.modules.layers import EMBED, VOCAB, Embedder, RMSNorm, dense, tap
from fulcrum.modules.mamba import MambaBlock
from fulcrum.modules.transformer import TransformerBlock

# model.arch → its block class, or a tuple of classes that the layers cycle through
# (layer i is pattern[i % len(pattern)]).
BLOCKS: dict[str, type[nn.Module] | tuple[type[nn.Module], ...]] = {
  "transformer": TransformerBlock,
  "mamba": MambaBlock,
  "hawk": RecurrentResidualBlock,
  "griffin": GRIFFIN_PATTERN,  # (recurrent, recurrent, local attention)
}


def block_pattern(arch: str) -> tuple[type[nn.Module], ...]:
  """The block classes of `arch`'s layers, cycled: layer i is pattern[i % len(pattern)]."""
  blocks = BLOCKS[arch]
  return blocks if isinstance(blocks, tuple) else (blocks,)


def validate(config: ModelConfig) -> None:
  """Raises ValueError for an unknown arch, or a layer stack `nn.scan` cannot stack."""
  if config.arch not in BLOCKS:
    raise ValueError(f"unknown model.arch {config.arch!r}; known: {', '.join(BLOCKS)}")
  period = len(block_pattern(config.arch))
  if config.scan_layers and config.num_layers % period:
    raise ValueError(
      f"model.scan_layers scans {config.arch} in groups of {period} layers (its block pattern), "
      f"but model.num_layers={config.num_layers} is not a multiple of {period}; change "
      "model.num_layers or set model.scan_layers=False"
    )


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
      self.blocks = [classes[i % len(classes)](c, name=f"blocks_{i}") for i in range(c.num_layers)]
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


def build(model_config: Mapping[str, Any] | ModelConfig) -> nn.Module:
  """The model a config describes (`model.*` section of a recipe, a dict or a ModelConfig).

  A language model, or a forecaster (`fulcrum.modules.forecasting.build_forecaster`) when
  `model.arch` is dlinear/nlinear or `model.head` is "forecast".
  """
  if not isinstance(model_config, ModelConfig):
    from fulcrum.modules import forecasting  # Here, not at the top: it imports this module.

    arch, head = model_config.get("arch"), model_config.get("head")
    if arch in forecasting.LINEAR_ARCHS or head == "forecast":
      model = forecasting.build_forecaster(model_config)
      return quant.quantize(model, model_config.get("quant", "none"))
  config = ModelConfig.from_mapping(model_config)
  validate(config)
  return quant.quantize(LM(config), config.quant, methods=("__call__", "decode"))
