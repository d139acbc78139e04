"""Memory-efficient optimizers against AdamW: state bytes, peak step memory, step time, loss.

`fulcrum bench optim --json`: one byte-level transformer LM on the default corpus (the Python
standard library), the same data order, seed and number of steps for each of adamw, galore,
adam8bit, galore8bit and adamw_qat (AdamW with int8 quantization-aware training of the model's
matmuls, `model.quant=int8`). The runs advance in lockstep — a block of steps for each in
turn — so the step-time ratios compare runs that saw the same machine load. A CPU trains 600
steps at batch 8, an accelerator 1200 at batch 16 (same model).

Measured per run:
- `state_bytes`: bytes of the optimizer-state pytree (8-bit codes and block scales included);
- `peak_step_bytes`: XLA's memory analysis of the compiled train step (arguments + outputs +
  temporaries − aliased), i.e. the step's peak device memory;
- `step_time_ms`: mean wall time per step over the whole run, GaLore's SVD refreshes (every
  `update_proj_gap` steps) included;
- `eval_loss`: validation cross-entropy (nats/byte) after the last step.

Ratios (each ÷ AdamW): `galore_state_ratio`, `galore_loss_ratio`, `galore_step_time_ratio`,
`adam8bit_state_ratio`, `adam8bit_loss_ratio`, and the same for galore8bit and qat. GaLore
uses rank d_model / 4 on the attention and MLP matrices and update_proj_gap 200, as the goals
state; its learning rate is set separately (the paper does the same: GaLore's projected
updates are scaled by α = 0.25).
"""

from __future__ import annotations

import time

import jax

from fulcrum.benchmarks.common import device_description, peak_bytes, results_dir, write_results
from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.optim import factory, state_bytes
from fulcrum.platform.training import trainer

# Every optimizer, and AdamW with int8 quantization-aware training.
OPTIMIZERS = (*factory.OPTIMIZERS, "adamw_qat")

# Per-run settings on top of the shared config (learning rates tuned on this model). The last
# run is AdamW with int8 quantization-aware training of the model's matmuls (`model.quant`).
SETTINGS = {
  "adamw": {"optimizer.learning_rate": 3e-3},
  "galore": {"optimizer.learning_rate": 6e-3},
  "adam8bit": {"optimizer.learning_rate": 3e-3},
  "galore8bit": {"optimizer.learning_rate": 6e-3},
  "adamw_qat": {"optimizer.learning_rate": 3e-3, "model.quant": "int8"},
}


def _sizes(quick: bool) -> dict[str, int]:
  """Model and run size: the accelerator run trains longer on bigger batches than a 2-core CPU
  can in a benchmark's time (~15 min there); every optimizer gets the same either way."""
  if quick:
    return dict(d_model=128, layers=2, seq=64, batch=8, steps=40, eval_batches=2)
  if jax.default_backend() == "cpu":
    return dict(d_model=256, layers=4, seq=128, batch=8, steps=600, eval_batches=16)
  return dict(d_model=256, layers=4, seq=128, batch=16, steps=1200, eval_batches=16)


def _config(name: str, quick: bool):
  c = sections.base_config()
  z = _sizes(quick)
  d_model = z["d_model"]
  config_lib.apply_overrides(
    c,
    [
      f"model.d_model={d_model}",
      f"model.num_layers={z['layers']}",
      "model.num_heads=4",
      "model.num_kv_heads=4",
      f"train.seq_len={z['seq']}",
      f"train.batch_size={z['batch']}",
      f"train.steps={z['steps']}",
      f"train.eval_batches={z['eval_batches']}",
      f"optimizer.warmup_steps={5 if quick else 100}",
      f"optimizer.name={name.removesuffix('_qat')}",
      f"optimizer.galore.rank={d_model // 4}",
      f"optimizer.galore.update_proj_gap={10 if quick else 200}",
      "optimizer.galore.scale=0.25",
      "train.progress=False",
    ]
    + [f"{k}={v}" for k, v in SETTINGS[name].items()],
  )
  c.lock()
  return c


class _Run:
  """One optimizer's experiment, compiled ahead of time, stepping through the shared data."""

  def __init__(self, name: str, quick: bool):
    self.name = name
    self.config = _config(name, quick)
    self.exp = trainer.build_experiment(self.config, jax.devices()[:1])
    self.state = self.exp.init_state()
    self.data = self.exp.task.train_iterator(0, 1)
    batch = trainer.global_batch(self.exp, next(iter([self._next()])))
    with self.exp.activate():
      self.step = trainer.jit_train_step(self.exp).lower(self.state, batch).compile()
    self.peak = peak_bytes(self.step)
    self.state, _ = self.step(self.state, batch)  # Step 0 (a GaLore refresh), untimed.
    self.steps_done, self.seconds, self.losses = 1, 0.0, []

  def _next(self):
    return next(self.data)

  def advance(self, n: int) -> None:
    batches = [trainer.global_batch(self.exp, self._next()) for _ in range(n)]
    start = time.perf_counter()
    with self.exp.activate():
      for batch in batches:
        self.state, metrics = self.step(self.state, batch)
      jax.block_until_ready(self.state)
    self.seconds += time.perf_counter() - start
    self.steps_done += n
    self.losses.append((self.steps_done, float(metrics["loss"])))

  def evaluate(self) -> float:
    sets = self.exp.task.eval_sets(0, 1)
    return trainer.evaluate_params(self.exp, self.state.params, sets)["eval/loss"]


def analyse(rows: dict[str, dict]) -> dict[str, float]:
  """Ratios of each optimizer's state bytes, eval loss and step time to AdamW's."""
  base = rows["adamw"]
  out = {}
  for name, key in (
    ("galore", "galore"),
    ("adam8bit", "adam8bit"),
    ("galore8bit", "galore8bit"),
    ("adamw_qat", "qat"),
  ):
    r = rows[name]
    out[f"{key}_state_ratio"] = r["state_bytes"] / base["state_bytes"]
    out[f"{key}_loss_ratio"] = r["eval_loss"] / base["eval_loss"]
    out[f"{key}_step_time_ratio"] = r["step_time_ms"] / base["step_time_ms"]
    if r.get("peak_step_bytes") and base.get("peak_step_bytes"):
      out[f"{key}_peak_memory_ratio"] = r["peak_step_bytes"] / base["peak_step_bytes"]
  return out


def markdown(result: dict) -> str:
  c, rows = result["config"], result["optimizers"]
  lines = [
    f"Optimizers on a byte-level transformer LM (d_model {c['d_model']}, {c['num_layers']} "
    f"layers, {c['params_m']}M parameters, seq {c['seq_len']}, batch {c['batch_size']}, "
    f"{c['steps']} steps; GaLore rank {c['galore_rank']}, update_proj_gap "
    f"{c['update_proj_gap']}; {result['device']})",
    "",
    "| optimizer | learning rate | state (MB) | ÷ AdamW | peak step memory (MB) | step (ms) "
    "| ÷ AdamW | eval loss | ÷ AdamW |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  base = rows["adamw"]
  for name in OPTIMIZERS:
    r = rows[name]
    peak = f"{r['peak_step_bytes'] / 1e6:.1f}" if r.get("peak_step_bytes") else "n/a"
    lines.append(
      f"| {name} | {r['learning_rate']:g} | {r['state_bytes'] / 1e6:.2f} "
      f"| {r['state_bytes'] / base['state_bytes']:.2f} | {peak} | {r['step_time_ms']:.1f} "
      f"| {r['step_time_ms'] / base['step_time_ms']:.2f} | {r['eval_loss']:.4f} "
      f"| {r['eval_loss'] / base['eval_loss']:.3f} |"
    )
  return "\n".join(lines)


def plot(result: dict, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
  for name in OPTIMIZERS:
    steps, losses = zip(*result["optimizers"][name]["train_loss"], strict=True)
    ax_loss.plot(steps, losses, label=name)
  ax_loss.set(xlabel="step", ylabel="train loss (nats/byte)", title="training loss")
  ax_loss.legend()
  names = list(OPTIMIZERS)
  ax_mem.bar(names, [result["optimizers"][n]["state_bytes"] / 1e6 for n in names])
  ax_mem.set(ylabel="optimizer state (MB)", title="optimizer state")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(quick: bool = False) -> dict:
  runs = {name: _Run(name, quick) for name in OPTIMIZERS}
  first = runs["adamw"].config
  total, block = first.train.steps, (5 if quick else 25)
  while runs["adamw"].steps_done < total:
    n = min(block, total - runs["adamw"].steps_done)
    for r in runs.values():  # Lockstep: every optimizer sees the same load.
      r.advance(n)
  rows = {}
  for name, r in runs.items():
    rows[name] = {
      "learning_rate": r.config.optimizer.learning_rate,
      "state_bytes": state_bytes(r.state.opt_state),
      "param_bytes": state_bytes(r.state.params),
      "peak_step_bytes": r.peak,
      "step_time_ms": 1e3 * r.seconds / (r.steps_done - 1),
      "eval_loss": r.evaluate(),
      "train_loss": r.losses,
    }
  n_params = sum(x.size for x in jax.tree.leaves(runs["adamw"].state.params))
  result = {
    "device": device_description(),
    "config": {
      "d_model": first.model.d_model,
      "num_layers": first.model.num_layers,
      "seq_len": first.train.seq_len,
      "batch_size": first.train.batch_size,
      "steps": total,
      "params_m": round(n_params / 1e6, 2),
      "galore_rank": first.optimizer.galore.rank,
      "update_proj_gap": first.optimizer.galore.update_proj_gap,
      "block_size": first.optimizer.quant.block_size,
    },
    "optimizers": rows,
    **analyse(rows),
  }
  md = markdown(result)
  if quick:
    return {**result, "markdown": md}
  results_dir().mkdir(parents=True, exist_ok=True)
  plot(result, results_dir() / "optim.png")
  return write_results("optim", result, md)


if __name__ == "__main__":
  print(run(quick=True)["markdown"])
