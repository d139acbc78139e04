"""Multi-query associative recall (Zoology): 16 key-value pairs, then every key is queried.

`eval/accuracy` is the fraction of queried values recalled exactly. Attention solves it
easily; fixed-state recurrences need state size proportional to the number of pairs.

  fulcrum train --recipe synthetic_mqar --workdir runs/mqar --set model.arch=mamba
"""

from fulcrum.platform.config import base_config


def get_config():
  c = base_config()
  c.task = "synthetic"
  c.data.generator = "mqar"
  c.data.length = 64  # 16 pairs (32 tokens), 16 noise tokens, 16 queries.
  c.data.vocab = 64  # Keys 1..32, values 33..64.
  c.data.num_pairs = 16
  c.data.eval_length_multiples = (1,)
  c.train.seq_len = 64
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.train.eval_batches = 8
  c.model.arch = "transformer"
  c.model.vocab_size = 66
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  return c
