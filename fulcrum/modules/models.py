"""`build(model_config)`: the model a `model.*` config describes, and the checks on that config.

`ARCHS` is the one list of architectures: the block stacks of `blocks.BLOCKS` and the linear
forecasters of `forecasting.LINEAR_ARCHS`. `validate` raises `ValueError` naming the fix for
values a type alone cannot rule out; the platform's config validation calls it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from fulcrum.modules import blocks, quant, scan
from fulcrum.modules.attention import AttentionImpl, rotary_dims
from fulcrum.modules.forecasting import LINEAR_ARCHS, build_forecaster
from fulcrum.modules.lm import LM
from fulcrum.modules.model_config import ModelConfig

ARCHS = (*blocks.BLOCK_ARCHS, *LINEAR_ARCHS)
HEADS = ("lm", "forecast")  # What a block stack outputs: next-token logits or forecasts.
# Compute dtypes (parameters stay float32). float16 has no loss scaling here: for inference of
# imported checkpoints (`hf.load_pretrained(dtype=...)`); train in bfloat16.
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = tuple(impl.value for impl in AttentionImpl)
SCAN_IMPLS = tuple(impl.value for impl in scan.ScanImpl)


def validate(c: ModelConfig) -> None:
  """Checks a model config; raises ValueError naming the problem and the fix."""

  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ValueError(msg)

  choices = [
    ("arch", ARCHS), ("head", HEADS), ("dtype", DTYPES), ("attention_impl", ATTENTION_IMPLS),
    ("scan_impl", SCAN_IMPLS), ("quant", quant.MODES),
  ]  # fmt: skip
  for key, options in choices:
    value = getattr(c, key)
    need(value in options, f"model.{key}={value!r} is unknown; choose one of {', '.join(options)}")
  for key in ("d_model", "num_layers", "num_heads", "vocab_size"):
    need(getattr(c, key) > 0, f"model.{key} must be positive, got {getattr(c, key)}")
  need(
    c.num_heads % c.kv_heads == 0,
    f"model.num_heads={c.num_heads} must divide by model.num_kv_heads={c.kv_heads}",
  )
  need(
    c.head_dim > 0 or c.d_model % c.num_heads == 0,
    f"model.d_model={c.d_model} must divide by model.num_heads={c.num_heads} "
    "(or set model.head_dim)",
  )
  need(c.window >= 0, f"model.window must be >= 0, got {c.window}")
  need(0 < c.rope_fraction <= 1, f"model.rope_fraction must be in (0, 1], got {c.rope_fraction}")
  has_attention = c.arch in blocks.BLOCKS and any(
    b.mixer == "attention" for b in blocks.block_pattern(c.arch)
  )
  if has_attention and c.rope_fraction != 1:
    try:
      rotary_dims(c.per_head_dim, c.rope_fraction)
    except ValueError:
      raise ValueError(
        f"model.rope_fraction={c.rope_fraction} rotates {int(c.per_head_dim * c.rope_fraction)} "
        f"of each head's {c.per_head_dim} dims; RoPE needs a positive even number (change "
        "model.rope_fraction or model.head_dim)"
      ) from None
  if c.arch in blocks.BLOCKS:
    blocks.validate(c)
  need(c.input_len >= 0 and c.horizon >= 0, "model.input_len and model.horizon must be >= 0")
  need(c.moving_avg >= 1, f"model.moving_avg must be >= 1, got {c.moving_avg}")


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
