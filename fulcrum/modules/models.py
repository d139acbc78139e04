"""`build(model_config)`: the model a `model.*` config describes, and the checks on that config.

`ARCHS` is the one list of architectures: the block stacks of `blocks.BLOCKS` and the linear
forecasters of `forecasting.LINEAR_ARCHS`. `validate` raises `ValueError` naming the fix for
values a type alone cannot rule out; the platform's config validation calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from fulcrum.modules import blocks, quant, scan
from fulcrum.modules.attention import AttentionImpl
from fulcrum.modules.forecasting import LINEAR_ARCHS, build_forecaster
from fulcrum.modules.layers import check_lora
from fulcrum.modules.lm import LM
from fulcrum.modules.model_config import ModelConfig, require, require_sizes

ARCHS = (*blocks.BLOCK_ARCHS, *LINEAR_ARCHS)
HEADS = ("lm", "forecast")  # What a block stack outputs: next-token logits or forecasts.
# Compute dtypes (parameters stay float32). float16 has no loss scaling here: for inference of
# imported checkpoints (`hf.load_pretrained(dtype=...)`); train in bfloat16.
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = tuple(impl.value for impl in AttentionImpl)
SCAN_IMPLS = tuple(impl.value for impl in scan.ScanImpl)


def validate(c: ModelConfig) -> None:
  """Checks a model config; raises ValueError naming the problem and the fix.

  Option lists are checked whatever the architecture (a misspelt value is a mistake anywhere);
  sizes and numbers only where the architecture reads them: the linear forecasters their
  window keys, a block stack its shell's keys and each block's own (`blocks.validate`), so
  Mamba is not refused for attention heads it does not have.
  """
  choices = [
    ("arch", ARCHS), ("head", HEADS), ("dtype", DTYPES), ("attention_impl", ATTENTION_IMPLS),
    ("scan_impl", SCAN_IMPLS), ("quant", quant.MODES),
  ]  # fmt: skip
  for key, options in choices:
    value = getattr(c, key)
    require(
      value in options, f"model.{key}={value!r} is unknown; choose one of {', '.join(options)}"
    )
  require(c.input_len >= 0 and c.horizon >= 0, "model.input_len and model.horizon must be >= 0")
  require_sizes(c, channels=0)
  if c.arch in LINEAR_ARCHS:
    if c.arch == "dlinear":
      require(c.moving_avg >= 1, f"model.moving_avg must be >= 1, got {c.moving_avg}")
    check_lora(c, ())  # Their time maps are not `Dense` layers.
    return
  require_sizes(c, d_model=1, num_layers=1)
  require(
    math.isfinite(c.norm_eps) and c.norm_eps >= 0,
    f"model.norm_eps must be a number >= 0 (RMSNorm's epsilon, e.g. 1e-6), got {c.norm_eps}",
  )
  if not is_forecaster(c):  # The LM shell: embedding and logits.
    require_sizes(c, vocab_size=1)
    require(
      math.isfinite(c.logits_soft_cap) and c.logits_soft_cap >= 0,
      f"model.logits_soft_cap must be >= 0 (0: off), got {c.logits_soft_cap}",
    )
  blocks.validate(c)


def is_forecaster(c: ModelConfig) -> bool:
  """Whether `c` builds a forecaster (a linear one, or a block stack with the forecast head)."""
  return c.arch in LINEAR_ARCHS or c.head == "forecast"


def build(model_config: Mapping[str, Any] | ModelConfig) -> nn.Module:
  """The model a config describes (`model.*` section of a recipe, a dict or a ModelConfig).

  A language model (`LM`), or a forecaster (`forecasting.build_forecaster`) when `model.arch`
  is dlinear/nlinear or `model.head` is "forecast". Quantized training (`model.quant`) wraps
  either.

  Raises:
    ValueError: an unknown key or a value `validate` rejects.
  """
  config = ModelConfig.from_mapping(model_config)
  validate(config)
  if is_forecaster(config):
    return quant.quantize(build_forecaster(config), config.quant)
  return quant.quantize(LM(config), config.quant, methods=("__call__", "decode"))
