"""Forward+backward step time against sequence length, per architecture, at equal width.

`fulcrum bench scaling --json`: for transformer, mamba, griffin and hawk (3 layers,
d_model 256, batch 1, float32) the jitted value-and-gradient of the LM loss is timed at
L = 1K, 2K, 4K, 8K and 16K. The transformer uses full causal attention (its cost is what the
recurrent models avoid); Griffin's attention layer is local (window 1024). JSON `slopes` holds
each architecture's log-log slope fitted over the longer half of its lengths (1 = linear in L,
2 = quadratic) and `crossover_len` the shortest measured length at which mamba is faster than
the transformer (null if never). Goal: mamba and griffin slopes ≤ 1.1.

On CPU the transformer stops at `MAX_FULL_ATTENTION_LEN` (8K): XLA's CPU attention holds the
float32 score matrix of every layer for the backward pass (3 × 4 heads × L² floats, 13 GB at
16K), more than the 24 GB benchmark machine can spare; its 16K entry is null. On GPU/TPU every
length runs. Writes results/scaling.{json,md,png}.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import linen as nn

from fulcrum.benchmarks.common import device_description, results_dir, time_call, write_results
from fulcrum.modules import ModelConfig, build
from fulcrum.modules.blocks import BLOCK_ARCHS

ARCHS = BLOCK_ARCHS  # Every block stack.
MAX_FULL_ATTENTION_LEN = 8192  # On CPU; see the module docstring.


def _model(arch: str, quick: bool):
  width = 32 if quick else 256
  return build(
    ModelConfig(
      arch=arch,
      vocab_size=256,
      d_model=width,
      num_layers=3,
      num_heads=4,
      num_kv_heads=1,
      # Full causal attention for the transformer; Griffin's local attention is windowed.
      window=0 if arch == "transformer" else (64 if quick else 1024),
    )
  )


def _step_time(model, length: int, repeats: int) -> float:
  tokens = jax.random.randint(jax.random.key(0), (1, length), 0, 256)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :8])["params"])

  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  step = jax.jit(jax.value_and_grad(loss))
  return time_call(lambda: jax.block_until_ready(step(params)), repeats=repeats, warmup=1)


def run(quick: bool = False) -> dict:
  lengths = [64, 128, 256] if quick else [1024, 2048, 4096, 8192, 16384]
  repeats = 1 if quick else 3
  cap = MAX_FULL_ATTENTION_LEN if jax.default_backend() == "cpu" else max(lengths)
  times: dict[str, list[float | None]] = {}
  for arch in ARCHS:
    model = _model(arch, quick)
    times[arch] = [
      None if arch == "transformer" and n > cap else _step_time(model, n, repeats) for n in lengths
    ]
  slopes = {arch: _slope(lengths, t) for arch, t in times.items()}
  crossover = next(
    (
      n
      for n, m, tr in zip(lengths, times["mamba"], times["transformer"], strict=True)
      if tr is not None and m < tr
    ),
    None,
  )
  result = {
    "device": device_description(),
    "lengths": lengths,
    "step_time_s": times,
    "slopes": slopes,
    "crossover_len": crossover,
  }
  header = "| arch | " + " | ".join(f"L={n}" for n in lengths) + " | log-log slope |"
  rows = [
    f"| {a} | "
    + " | ".join("—" if t is None else f"{t:.3f}" for t in times[a])
    + f" | {slopes[a]:.2f} |"
    for a in ARCHS
  ]
  md = "\n".join(
    [
      f"Forward+backward step time (s), 3 layers, batch 1 ({result['device']}); "
      f"mamba faster than the transformer from L = {crossover}",
      "",
      header,
      "|" + "---|" * (len(lengths) + 2),
      *rows,
    ]
  )
  if quick:
    return {**result, "markdown": md}
  _plot(lengths, times)
  return write_results("scaling", result, md)


def _slope(lengths: list[int], times: list[float | None]) -> float:
  """Log-log slope over the longer half of the measured lengths (the asymptotic regime)."""
  points = [(n, t) for n, t in zip(lengths, times, strict=True) if t is not None]
  tail = points[len(points) // 2 :] if len(points) > 3 else points[-2:]
  x, y = zip(*tail, strict=True)
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def _plot(lengths, times) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for arch, t in times.items():
    measured = [(n, s) for n, s in zip(lengths, t, strict=True) if s is not None]
    ax.loglog(*zip(*measured, strict=True), "o-", label=arch)
  ref = np.asarray(lengths, float)
  ax.loglog(lengths, times["mamba"][0] * ref / ref[0], "k:", label="slope 1")
  ax.set_xlabel("sequence length")
  ax.set_ylabel("fwd+bwd step time (s)")
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  results_dir().mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(results_dir() / "scaling.png", dpi=120)
