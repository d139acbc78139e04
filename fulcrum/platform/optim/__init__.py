"""Optimizers as optax transforms, built from the recipe's `optimizer.*` section.

- `make_optimizer`: `optimizer.name` = adamw | galore | adam8bit | galore8bit.
- `galore_adamw`, `scale_by_galore`: GaLore low-rank projected Adam (`galore.py`).
- `quantize_state`, `adamw_8bit`: blockwise dynamic 8-bit optimizer state (`quantized.py`).
- `lora`: LoRA's trainable mask (`make_optimizer(..., trainable=lora.trainable_mask)`), merging
  adapters into the weights, adapter counts (`lora.py`).
"""

from fulcrum.platform.optim.factory import OPTIMIZERS, learning_rate_schedule, make_optimizer
from fulcrum.platform.optim.galore import (
  GaLoreState,
  MatrixSpec,
  default_matrices,
  galore_adamw,
  matrices_from_axes,
  scale_by_galore,
)
from fulcrum.platform.optim.quantized import (
  QuantizedArray,
  adamw_8bit,
  dequantize,
  quantize,
  quantize_state,
  state_bytes,
)

__all__ = [
  "OPTIMIZERS",
  "GaLoreState",
  "MatrixSpec",
  "QuantizedArray",
  "adamw_8bit",
  "default_matrices",
  "dequantize",
  "galore_adamw",
  "learning_rate_schedule",
  "make_optimizer",
  "matrices_from_axes",
  "quantize",
  "quantize_state",
  "scale_by_galore",
  "state_bytes",
]
