"""Byte-level transformer LM trained with GaLore (rank d_model/4 on attention and MLP matrices).

The `lm_transformer` model and data with `optimizer.name = galore`: Adam runs on rank-96
projections of the attention and MLP weight gradients (projector refreshed from the gradient's
SVD every 200 steps, updates scaled by α = 0.25); embeddings and norms get plain AdamW.
Expected, from `fulcrum bench optim` (the same setup at 4 layers × 256, 600 steps): a third of
AdamW's optimizer state at equal or lower eval loss (0.34× state, 0.94× loss, 0.99× step time
on CPU). This full recipe (3000 steps, about an hour on 2 CPU cores) was not run to the end
here. `--set optimizer.name=galore8bit` also stores the moments in 8 bits (0.14× state).

  fulcrum train --recipe lm_galore --workdir /tmp/lm_galore
"""

from fulcrum.recipes.lm_transformer import get_config as transformer_config


def get_config():
  c = transformer_config()
  c.optimizer.name = "galore"
  c.optimizer.galore.rank = c.model.d_model // 4
  c.optimizer.galore.update_proj_gap = 200
  c.optimizer.galore.scale = 0.25
  c.optimizer.learning_rate = 4e-3  # α = 0.25 scales the projected updates down.
  return c
