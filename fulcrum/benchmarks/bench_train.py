"""Transformer train-step throughput against the device's own matmul throughput.

`fulcrum bench train --json`: the train step of a d_model 512, seq 512 transformer
(4 layers, 8 heads, batch 8, float32), timed in one process beside an f32 matmul so that the
ratio `flops_ratio` = achieved FLOP/s ÷ matmul FLOP/s is comparable across (noisy) machines.
FLOPs per step come from XLA's cost analysis of the compiled step (falling back to 6·N·T plus
attention when the backend reports none).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from fulcrum.benchmarks.common import (
  device_description,
  matmul_flops_per_s,
  time_call,
  write_results,
)
from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.training import trainer


def _config(quick: bool):
  c = sections.base_config()
  config_lib.apply_overrides(
    c,
    [
      "model.d_model=512",
      "model.num_layers=4",
      "model.num_heads=8",
      "model.vocab_size=256",
      "train.seq_len=512",
      "train.batch_size=8",
      "train.steps=1000",
      "model.dtype=float32",
    ],
  )
  if quick:
    config_lib.apply_overrides(
      c, ["model.num_layers=1", "train.batch_size=2", "train.seq_len=128", "model.d_model=128"]
    )
  c.lock()
  return c


def _analytic_flops(config, n_params: int) -> float:
  t, m = config.train, config.model
  tokens = t.batch_size * t.seq_len
  attention = 12 * m.num_layers * t.batch_size * t.seq_len**2 * m.d_model / 2  # causal half
  return 6 * n_params * tokens + attention


def run(quick: bool = False) -> dict:
  config = _config(quick)
  exp = trainer.build_experiment(config, jax.devices()[:1])
  state = exp.init_state()
  t = config.train
  rng = np.random.default_rng(0)
  batch = trainer.global_batch(
    exp,
    {
      k: rng.integers(0, 256, (t.batch_size, t.seq_len), dtype=np.int32)
      for k in ("inputs", "targets")
    },
  )
  step = trainer.jit_train_step(exp)
  start = time.perf_counter()
  with exp.activate():
    compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  flops = float((cost or {}).get("flops", 0.0)) or _analytic_flops(config, n_params)

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  repeats = 3 if quick else 8
  step_s = time_call(one_step, repeats=repeats, warmup=2)
  matmul = matmul_flops_per_s(512 if quick else 1024)
  achieved = flops / step_s
  tokens = t.batch_size * t.seq_len
  result = {
    "device": device_description(),
    "config": {
      "d_model": config.model.d_model,
      "seq_len": t.seq_len,
      "num_layers": config.model.num_layers,
      "batch_size": t.batch_size,
      "params_m": round(n_params / 1e6, 2),
    },
    "step_time_s": step_s,
    "tokens_per_s": tokens / step_s,
    "compile_time_s": compile_s,
    "flops_per_step": flops,
    "achieved_flops_per_s": achieved,
    "matmul_flops_per_s": matmul,
    "flops_ratio": achieved / matmul,
  }
  md = "\n".join(
    [
      f"Train step, transformer d_model {config.model.d_model}, seq {t.seq_len}, "
      f"{config.model.num_layers} layers, batch {t.batch_size} ({result['device']})",
      "",
      "| step time (s) | tokens/s | compile (s) | achieved GFLOP/s | f32 matmul GFLOP/s "
      "| flops_ratio |",
      "|---|---|---|---|---|---|",
      f"| {step_s:.3f} | {tokens / step_s:,.0f} | {compile_s:.1f} | {achieved / 1e9:.1f} "
      f"| {matmul / 1e9:.1f} | {achieved / matmul:.2f} |",
    ]
  )
  if quick:
    return {**result, "markdown": md}
  return write_results("train", result, md)
