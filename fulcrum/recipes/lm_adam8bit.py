"""Byte-level transformer LM trained with 8-bit AdamW (blockwise dynamic quantized moments).

The `lm_transformer` model and data with `optimizer.name = adam8bit`: both Adam moments are
stored as 8-bit codes into a dynamic (tree) quantization map with one float32 absmax per block
of 256 values. Expected, from `fulcrum bench optim` (the same setup at 4 layers × 256, 600
steps): 0.25× AdamW's optimizer state at the same eval loss (0.997×). This full recipe (3000
steps, about an hour on 2 CPU cores) was not run to the end here.

  fulcrum train --recipe lm_adam8bit --workdir /tmp/lm_adam8bit
"""

from fulcrum.recipes.lm_transformer import get_config as transformer_config


def get_config():
  c = transformer_config()
  c.optimizer.name = "adam8bit"
  c.optimizer.quant.block_size = 256
  return c
