"""Byte-level transformer LM with int8 quantization-aware training (qwix, W8A8).

The `lm_transformer` model and data with `model.quant = int8`: every weight matmul (attention
q/k/v/o, the MLP) runs fake-quantized in the forward pass — int8 weights per output channel,
int8 activations per token — with straight-through gradients, so the trained weights are
ready for int8 inference. `model.quant=fp8` uses float8 (e4m3 forward, e5m2 gradients);
`int8_weight` quantizes weights only. Works for every `model.arch`. Expected, from
`fulcrum bench optim`'s QAT row (the same setup at 4 layers × 256, 600 steps): eval loss
0.99× the float run's. This full recipe (3000 steps, about an hour on 2 CPU cores) was not run
to the end here.

  fulcrum train --recipe lm_qat --workdir /tmp/lm_qat
"""

from fulcrum.recipes.lm_transformer import get_config as transformer_config


def get_config():
  c = transformer_config()
  c.model.quant = "int8"
  return c
