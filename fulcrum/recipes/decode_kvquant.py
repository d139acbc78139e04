"""The demo LM decoding from a 3-bit KVQuant cache (calibrate once, then decode).

Trains the `demo` model, then `fulcrum calibrate` fits per-layer non-uniform codebooks
(Fisher-weighted k-means) and per-channel pre-RoPE key thresholds on 16 training batches and
saves them beside the checkpoint; `fulcrum decode` then keeps keys and values in 3 bits with 1%
dense-and-sparse outliers (4.7x smaller than a bfloat16 cache). Expected: validation perplexity
within 2% of the full-precision cache (`fulcrum bench decode` measures it). About 5 minutes on
2 CPU cores.

  fulcrum train --recipe decode_kvquant --workdir runs/decode_kvquant
  fulcrum calibrate --workdir runs/decode_kvquant
  fulcrum decode --workdir runs/decode_kvquant --prompt 'def __init__(self'
"""

from fulcrum.recipes._bases import byte_lm_config


def get_config():
  c = byte_lm_config(d_model=192, num_layers=4, num_heads=4, num_kv_heads=2, learning_rate=3e-3)
  c.decode.kv_cache = "kvquant"
  c.decode.kv_bits = 3
  return c
