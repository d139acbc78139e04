"""The `make demo` LM: a byte-level transformer that learns Python fastest on a CPU.

A 3-layer, 96-wide transformer (0.33M parameters) trained for 4,000 steps of 8 × 128 bytes on
the standard-library corpus. On 2 CPU cores a narrow model taking many small steps learns the
most per second: in the same ~4 minutes the 4-layer, 192-wide `demo` model reaches about 3.0
bits/byte, 128-wide ones 2.7–2.8 and a 6-layer one 2.6. Expected: validation bits/byte falls
from 8 (uniform over bytes) to about 2.4 in ~4 minutes on 2 cores
(measured: 2.42 after 4,000 steps, 3 min 51 s wall, corpus already prepared).

`fulcrum decode` samples by default (its `decode.*` section: nucleus sampling, temperature
0.7, top-p 0.9; the CLI's seed 0 makes it reproducible): greedy decoding of a model this small
repeats one line. `make demo` samples 110 bytes: trained on 128-byte windows, the model has
never seen a position past 128 and turns to noise there.

  fulcrum train --recipe lm_quick --workdir runs/lm_quick
  fulcrum decode --workdir runs/lm_quick --prompt 'def __init__(self' --max-new-tokens 110
"""

from fulcrum.recipes._bases import byte_lm_config


def get_config():
  c = byte_lm_config(d_model=96, num_layers=3, num_heads=2, num_kv_heads=1, learning_rate=1e-3)
  c.train.steps = 4000
  c.train.batch_size = 8
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.decode.strategy = "sample"  # Greedy decoding of a model this small repeats one line.
  c.decode.temperature = 0.7
  c.decode.top_p = 0.9
  return c
