"""A small draft model for the demo LM: speculative decoding and Speculative Cascades.

A 3-layer, 64-wide byte-level transformer (164K parameters, 10x fewer than `demo`'s 1.67M)
trained on the same standard-library corpus and byte tokenizer as `demo`, so it can propose
tokens for it. Expected: validation ~3.5 bits/byte after 600 steps (about a minute on 2 CPU
cores).

  fulcrum train --recipe demo --workdir runs/demo
  fulcrum train --recipe lm_draft --workdir runs/lm_draft
  fulcrum decode --workdir runs/demo --draft-workdir runs/lm_draft --strategy speculative \\
    --prompt 'def __init__(self'

It drafts for the 9.5M `lm_transformer` too (58x smaller): `fulcrum bench decode` measures
1.76x greedy's tokens/s with it on 2 CPU cores. Widened to 128 × 4 layers (0.82M) it gets no
more tokens accepted there and its call costs 4x as much, so it is slower (1.14x).
"""

from fulcrum.recipes._bases import byte_lm_config


def get_config():
  c = byte_lm_config(d_model=64, num_layers=3, num_heads=2, num_kv_heads=1, learning_rate=5e-3)
  return c
