"""Induction heads (Mamba paper §4.1.2): recall the token after a trigger; accuracy at 1×/4×/16×.

Trained on sequences of 64 tokens (vocabulary 16 + trigger); evaluated at 64, 256 and 1024
tokens (`eval/accuracy`, `eval/accuracy_4x`, `eval/accuracy_16x`). The paper finds Mamba
extrapolates far beyond its training length while attention fails past ~2×.

  fulcrum train --recipe synthetic_induction_heads --workdir runs/induction \
    --set model.arch=mamba
"""

from fulcrum.platform.config import base_config


def get_config():
  c = base_config()
  c.task = "synthetic"
  c.data.generator = "induction_heads"
  c.data.length = 64
  c.data.vocab = 16
  c.data.eval_length_multiples = (1, 4, 16)
  c.train.seq_len = 64
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.eval_batches = 4
  c.model.arch = "transformer"
  c.model.vocab_size = 18
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  return c
