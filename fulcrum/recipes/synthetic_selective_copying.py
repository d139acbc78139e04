"""Selective copying (Mamba paper §4.1.1): recall scattered tokens in order; `eval/accuracy`.

16 tokens from a vocabulary of 8 sit at random places among 64 noise tokens; at 16 copy
markers the model must output them in order. Selective Mamba solves it (paper: 99.8%); its
LTI ablation (`--set model.selective=false`, S4-like) cannot locate randomly spaced tokens.
Measured (2 layers, d_model 128, 2 CPU cores): Mamba reaches 96% at step 2000 and 99.9% at
2500 (~20-30 min); the LTI ablation stays at 60%. At step 1000 the transformer has 96%, Hawk 59%,
Griffin (3 layers) 94%; the README has the table.

  fulcrum train --recipe synthetic_selective_copying --workdir runs/selcopy \
    --set model.arch=mamba
"""

from fulcrum.recipes._bases import synthetic_config


def get_config():
  # 64 noise + data tokens, 8 data token types (ids 1..8; 0 = noise, 9 = copy marker).
  c = synthetic_config("selective_copying", length=64, vocab=8, seq_len=80, model_vocab=10)
  c.data.num_tokens = 16  # Tokens to copy; seq_len = length + num_tokens.
  c.train.steps = 2500
  c.model.d_model = 128
  return c
