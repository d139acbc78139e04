"""Selective copying (Mamba paper §4.1.1): recall scattered tokens in order; `eval/accuracy`.

16 tokens from a vocabulary of 8 sit at random places among 64 noise tokens; at 16 copy
markers the model must output them in order. Selective Mamba solves it (paper: 99.8%); its
LTI ablation (`--set model.selective=false`, S4-like) cannot locate randomly spaced tokens.
Measured: Mamba (2 layers, d_model 128) reaches 96% at step 2000 and 99.5% at 2250, ~15 min
on 2 busy CPU cores.

  fulcrum train --recipe synthetic_selective_copying --workdir runs/selcopy \
    --set model.arch=mamba
"""

from fulcrum.platform.config import base_config


def get_config():
  c = base_config()
  c.task = "synthetic"
  c.data.generator = "selective_copying"
  c.data.length = 64  # Noise + data tokens before the copy markers.
  c.data.vocab = 8  # Data token types (ids 1..8; 0 = noise, 9 = copy marker).
  c.data.num_tokens = 16  # Tokens to copy.
  c.data.eval_length_multiples = (1,)
  c.train.seq_len = 80  # length + num_tokens.
  c.train.steps = 2500
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.train.eval_batches = 8
  c.model.arch = "transformer"
  c.model.vocab_size = 10
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  return c
