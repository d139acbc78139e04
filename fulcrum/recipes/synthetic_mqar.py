"""Multi-query associative recall (Zoology): 16 key-value pairs, then every key is queried.

`eval/accuracy` is the fraction of queried values recalled exactly. Attention solves it
easily; fixed-state recurrences need state size proportional to the number of pairs.

  fulcrum train --recipe synthetic_mqar --workdir runs/mqar --set model.arch=mamba
"""

from fulcrum.recipes._bases import synthetic_config


def get_config():
  # 16 pairs (32 tokens), 16 noise tokens, 16 queries; keys 1..32, values 33..64.
  c = synthetic_config("mqar", length=64, vocab=64, seq_len=64, model_vocab=66)
  c.data.num_pairs = 16
  return c
