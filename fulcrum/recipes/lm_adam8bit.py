"""Byte-level transformer LM trained with 8-bit AdamW (blockwise dynamic quantized moments).

The `lm_transformer` model and data with `optimizer.name = adam8bit`: both Adam moments are
stored as 8-bit codes into a dynamic (tree) quantization map with one float32 absmax per block
of 256 values, about a quarter of AdamW's state (`fulcrum bench optim`). Expected: validation
bits/byte within about 1% of `lm_transformer` at 3000 steps (about an hour on 2 CPU cores).

  fulcrum train --recipe lm_adam8bit --workdir /tmp/lm_adam8bit
"""

from fulcrum.recipes.lm_transformer import get_config as transformer_config


def get_config():
  c = transformer_config()
  c.optimizer.name = "adam8bit"
  c.optimizer.quant.block_size = 256
  return c
