"""Per-token decode latency at a short and a long context, per architecture.

`fulcrum bench decode_latency --json`: each model (3 layers, d_model 256, float32) prefills
a context of 256 or 8192 tokens through its cache, then one jitted single-token decode step
is timed. JSON `latency_ratio` (arch → latency at 8192 ÷ latency at 256): a transformer's
KV cache (full causal attention) grows with the context, while Mamba's state and
Griffin's/Hawk's recurrent state plus window-sized ring buffer do not. Goal: ≤ 1.1 for mamba
and griffin.
Writes results/decode_latency.{json,md}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from fulcrum.benchmarks.common import device_description, time_call, write_results
from fulcrum.modules import LM, ModelConfig, build
from fulcrum.modules.blocks import BLOCK_ARCHS

ARCHS = BLOCK_ARCHS  # Every block stack.


def _latency(model: LM, context: int, repeats: int) -> float:
  tokens = jax.random.randint(jax.random.key(0), (1, context), 0, 256)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :8])["params"])
  decode = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method="decode"))
  cache = model.init_cache(1, context + 1)
  positions = jnp.arange(context, dtype=jnp.int32)[None]
  _, cache = decode(params, tokens, positions, cache)
  token, pos = tokens[:, -1:], jnp.full((1, 1), context, jnp.int32)
  # Re-decoding the same position from the same cache: every call does identical work.
  return time_call(
    lambda: jax.block_until_ready(decode(params, token, pos, cache)), repeats=repeats, warmup=2
  )


def run(quick: bool = False) -> dict:
  contexts = (16, 128) if quick else (256, 8192)
  repeats = 2 if quick else 30
  latency = {}
  for arch in ARCHS:
    model = build(
      ModelConfig(
        arch=arch,
        vocab_size=256,
        d_model=32 if quick else 256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=1,
        # The transformer attends to its whole context; Griffin's attention is local.
        window=0 if arch == "transformer" else (16 if quick else 1024),
      )
    )
    latency[arch] = {str(c): _latency(model, c, repeats) for c in contexts}
  short, long = (str(c) for c in contexts)
  ratio = {a: latency[a][long] / latency[a][short] for a in ARCHS}
  result = {
    "device": device_description(),
    "contexts": list(contexts),
    "latency_s": latency,
    "latency_ratio": ratio,
  }
  md = "\n".join(
    [
      f"Per-token decode latency (ms), 3 layers, d_model 256, batch 1 ({result['device']})",
      "",
      f"| arch | context {short} | context {long} | ratio |",
      "|---|---|---|---|",
      *(
        f"| {a} | {latency[a][short] * 1e3:.2f} | {latency[a][long] * 1e3:.2f} | {ratio[a]:.2f} |"
        for a in ARCHS
      ),
    ]
  )
  if quick:
    return {**result, "markdown": md}
  return write_results("decode_latency", result, md)
