"""Induction heads (Mamba paper §4.1.2): recall the token after a trigger; accuracy at 1×/4×/16×.

Trained on sequences of 64 tokens (vocabulary 16 + trigger); evaluated at 64, 256 and 1024
tokens (`eval/accuracy`, `eval/accuracy_4x`, `eval/accuracy_16x`). The paper finds Mamba
extrapolates far beyond its training length while attention fails past ~2×. Measured (2 layers,
d_model 64, 2000 steps, 4-20 min on 2 CPU cores): all reach 100% at 1×; at 16× Mamba 100%,
Griffin (3 layers) 89%, Hawk 68%, the transformer 7%.

  fulcrum train --recipe synthetic_induction_heads --workdir runs/induction \
    --set model.arch=mamba
"""

from fulcrum.recipes._bases import synthetic_config


def get_config():
  c = synthetic_config("induction_heads", length=64, vocab=16, seq_len=64, model_vocab=18)
  c.data.eval_length_multiples = (1, 4, 16)
  c.train.eval_every = 500
  c.train.eval_batches = 4
  return c
