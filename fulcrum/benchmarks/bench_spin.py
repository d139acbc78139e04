"""SPIN against its controls on checkable instructions: does self-play beat more SFT?

`fulcrum bench spin --json` trains (or reuses, in runs/bench_spin/) the `instruct_sft` model,
then from it (a) SPIN for `spin.iterations` iterations (recipe `spin`) and (b) the paper's
control: the same SFT model trained further on the same data for as many steps as SPIN took,
at SPIN's learning rate. Every model answers the same held-out TEST prompts greedily (the SFT
runs evaluated on validation; the test split is only read here), checked by each family's
checker.

JSON keys: `sft_exact_match`, `sft_continued_exact_match`, `spin_exact_match` (one per
iteration), `exact_match_ci95` (half-width of the 95% interval of one model's exact match at
the best SPIN iteration's rate), `gain_ci95` (paired 95% half-width of best SPIN − best control,
per prompt), `generation_tokens_per_s` (SPIN's sampling of y', compiled `generate`),
`spin_step_peak_bytes` and `sft_step_peak_bytes` (XLA's peak memory of one train step at the
same batch: SPIN runs two sequences per example and keeps no second model), `rows` (the
per-iteration table). Goals: best SPIN iteration − max(SFT, continued SFT) > the 95% interval;
spin/sft peak ≤ 2.2.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np

from fulcrum import recipes
from fulcrum.benchmarks.common import (
  checkout_root,
  device_description,
  peak_bytes,
  results_dir,
  write_results,
)
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.data import instruct, instruct_pipeline
from fulcrum.platform.selfplay import driver
from fulcrum.platform.training import sharding, trainer
from fulcrum.platform.training.tasks import instruction_following as instruct_task

RUNS = checkout_root() / "runs" / "bench_spin"
QUICK = {  # Seconds, not minutes: the test of this benchmark's plumbing.
  "train.steps": 30,
  "train.eval_every": 0,
  "train.checkpoint_every": 30,
  "train.seq_len": 64,
  "train.batch_size": 8,
  "model.d_model": 32,
  "model.num_layers": 2,
  "model.num_heads": 2,
  "data.instruct_train_size": 2000,
  "data.instruct_eval_size": 200,
  "data.instruct_eval_prompts": 64,
  "data.instruct_families": "add,reverse",
}
QUICK_SPIN = {"spin.iterations": 2, "spin.num_prompts": 64, "spin.steps": 10}
TEST_PROMPTS = 2000  # Held-out test prompts every model answers (>= 1000).


def _config(recipe: str, quick: bool, extra: dict | None = None):
  config = recipes.get(recipe)
  with config.unlocked():
    config.train.progress = False
    settings = {**(QUICK if quick else {}), **(extra or {})}
    if quick and recipe == "spin":
      settings.update(QUICK_SPIN)
    for key, value in settings.items():
      section, field = key.split(".")
      if quick and recipe == "spin" and key == "train.steps":
        continue
      config[section][field] = value
  return config


def _whole(result: dict, what: str) -> dict:
  """`result`, unless the run was stopped (SIGTERM): the next stage must not start from it."""
  if result.get("preempted"):
    raise SystemExit(f"{what} was stopped before its end; rerun the benchmark to resume")
  return result


def _step_minutes(workdir) -> float:
  """Minutes the run's train steps took, from its metrics rows (a resumed run's too; evaluation
  excluded)."""
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  timed = [r for r in rows if "step_time_s" in r]
  previous, seconds = 0, 0.0
  for r in timed:
    seconds += r["step_time_s"] * (r["step"] - previous)
    previous = r["step"]
  return seconds / 60


def _test_exact_match(workdir, problems) -> tuple[float, np.ndarray]:
  exp, state, _ = workdir_lib.load(workdir)
  tok = instruct_task.get_tokenizer(exp.config)
  texts, _, _ = instruct_task.answers(
    exp.model,
    state.params,
    tok,
    problems,
    max_new_tokens=instruct_task.max_answer_tokens(tok, problems),
  )
  correct = np.array([instruct.check(p, t) for p, t in zip(problems, texts, strict=True)])
  return float(correct.mean()), correct


def _step_peak(config, pairs: bool) -> int | None:
  """Peak bytes of one compiled train step (SPIN: a batch of pairs; SFT: of sequences)."""
  exp = trainer.build_experiment(config, jax.devices()[:1])
  b, t = config.train.batch_size, config.train.seq_len
  spec = sharding.batch_sharding(exp.mesh)
  shapes = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}
  batch = {}
  for side in ("real_", "generated_") if pairs else ("",):
    for key, dtype in shapes.items():
      batch[side + key] = jax.ShapeDtypeStruct((b, t), dtype, sharding=spec)
  if pairs:
    for key in ("opponent_real", "opponent_generated"):
      batch[key] = jax.ShapeDtypeStruct((b,), np.float32, sharding=spec)
  with exp.activate():
    compiled = trainer.jit_train_step(exp).lower(exp.abstract_state, batch).compile()
  return peak_bytes(compiled)


def _plot(result: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  spin = result["spin_exact_match"]
  its = np.arange(len(spin))
  ci = result["exact_match_ci95"]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.errorbar(its, spin, yerr=ci, marker="o", capsize=3, label="SPIN (iteration t → θ_{t+1})")
  ax.axhline(result["sft_exact_match"], color="gray", ls="--", label="SFT (θ_0)")
  ax.axhline(result["sft_continued_exact_match"], color="tab:red", ls=":", label="SFT continued")
  ax.set_xticks(its)
  ax.set_xlabel("SPIN iteration")
  ax.set_ylabel(f"exact match ({result['test_prompts']} test prompts)")
  ax.legend(fontsize=8)
  ax.set_title("Self-play fine-tuning on checkable instructions")
  fig.tight_layout()
  fig.savefig(results_dir() / "spin.png", dpi=120)
  plt.close(fig)


def run(quick: bool = False, extra: dict | None = None, name: str | None = None) -> dict:
  """Measures SPIN against its controls. `extra` settings apply to every run (e.g. a smaller
  `data.instruct_train_size`); a `name` keeps the runs in runs/bench_spin/NAME and returns the
  result without writing benchmarks/results (an experiment, not the benchmark)."""
  base = RUNS / (name or ("quick" if quick else "full"))
  extra = extra or {}
  sft_config = _config("instruct_sft", quick, extra)
  sft_dir = base / "sft"
  _whole(trainer.train(sft_config, sft_dir), "the SFT run")
  sft_minutes = _step_minutes(sft_dir)

  spin_config = _config("spin", quick, {**extra, "spin.init_from": str(sft_dir)})
  spin_dir = workdir_lib.resolve(base / "spin")
  spin_result = _whole(driver.run(spin_config, spin_dir), "SPIN")
  s = spin_config.spin

  # The control: as many more SFT steps as SPIN took, at SPIN's learning rate and warmup.
  continued = _config(
    "instruct_sft",
    quick,
    {
      **extra,
      "train.steps": s.iterations * s.steps,
      "optimizer.learning_rate": spin_config.optimizer.learning_rate,
      "optimizer.warmup_steps": spin_config.optimizer.warmup_steps,
      "optimizer.weight_decay": spin_config.optimizer.weight_decay,
      "train.eval_every": 0,
    },
  )
  _, sft_state, _ = workdir_lib.load(sft_dir)
  _whole(
    trainer.run(continued, base / "sft_continued", initial_params=sft_state.params)[0],
    "the continued SFT run",
  )

  problems = instruct_pipeline.eval_problems(sft_config.data, "test", 64 if quick else TEST_PROMPTS)
  sft_em, sft_ok = _test_exact_match(sft_dir, problems)
  cont_em, cont_ok = _test_exact_match(base / "sft_continued", problems)
  spin_em, spin_ok = [], []
  for t in range(s.iterations):
    em, ok = _test_exact_match(
      driver.iteration_dir(workdir_lib.resolve(base / "spin"), t), problems
    )
    spin_em.append(em)
    spin_ok.append(ok)
  n = len(problems)
  best = int(np.argmax(spin_em))
  control = sft_ok if sft_em >= cont_em else cont_ok
  diff = spin_ok[best].astype(float) - control.astype(float)
  p = spin_em[best]
  rows = spin_result["rows"]
  result = {
    "device": device_description(),
    "test_prompts": n,
    "sft_exact_match": sft_em,
    "sft_continued_exact_match": cont_em,
    "spin_exact_match": spin_em,
    "exact_match_ci95": 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n),
    "gain": float(diff.mean()),
    "gain_ci95": 1.96 * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan"),
    "generation_tokens_per_s": float(
      np.mean([r["spin/generation_tokens_per_s"] for r in rows if r["iteration"] >= 0])
    ),
    "spin_step_peak_bytes": _step_peak(
      driver.iteration_config(driver.with_source_model(spin_config), 0, spin_dir), True
    ),
    "sft_step_peak_bytes": _step_peak(sft_config, False),
    "rows": rows,
    "settings": {
      "spin": {k: s[k] for k in s if k not in ("pairs", "init_from")},
      "learning_rate": spin_config.optimizer.learning_rate,
      "batch_size": spin_config.train.batch_size,
      "sft_steps": sft_config.train.steps,
      "params": sum(x.size for x in jax.tree.leaves(sft_state.params)),
    },
    "minutes": {
      "sft": sft_minutes,
      "spin": sum(_step_minutes(driver.iteration_dir(spin_dir, t)) for t in range(s.iterations)),
    },
  }
  result["step_peak_ratio"] = (
    result["spin_step_peak_bytes"] / result["sft_step_peak_bytes"]
    if result["spin_step_peak_bytes"] and result["sft_step_peak_bytes"]
    else None
  )
  result["significant"] = result["gain"] > result["gain_ci95"]
  md = _markdown(result, spin_result["table"])
  if quick or name:
    return {**result, "markdown": md}
  _plot(result)
  return write_results("spin", result, md)


def _markdown(r: dict, table: str) -> str:
  spin = ", ".join(f"{x:.3f}" for x in r["spin_exact_match"])
  ratio = r["step_peak_ratio"]
  lines = [
    f"# SPIN on checkable instructions ({r['device']})",
    "",
    f"Held-out test exact match over {r['test_prompts']} prompts (greedy; 95% half-width "
    f"{r['exact_match_ci95']:.3f}):",
    "",
    "| model | exact match |",
    "|---|---|",
    f"| SFT (θ_0) | {r['sft_exact_match']:.3f} |",
    f"| SFT continued ({sum(1 for x in r['spin_exact_match'])} × spin.steps more steps) | "
    f"{r['sft_continued_exact_match']:.3f} |",
    *(f"| SPIN iteration {t} | {x:.3f} |" for t, x in enumerate(r["spin_exact_match"])),
    "",
    f"Best SPIN − best control: {r['gain']:+.3f} (paired 95% half-width {r['gain_ci95']:.3f}; "
    f"{'significant' if r['significant'] else 'not significant'}).",
    "",
    "Per iteration (validation exact match, reward accuracy and mean sequence log-probs on the "
    "iteration's pairs after training, generation tokens/s):",
    "",
    table,
    "",
    f"Train-step peak memory: SPIN {r['spin_step_peak_bytes']} B, SFT {r['sft_step_peak_bytes']}"
    f" B" + (f" (ratio {ratio:.2f}; goal ≤ 2.2)" if ratio else ""),
    f"Generation of y': {r['generation_tokens_per_s']:.0f} tokens/s (compiled loop). "
    f"SPIN iterations: {spin}. Train steps: SFT {r['minutes']['sft']:.1f} min, SPIN "
    f"{r['minutes']['spin']:.1f} min (all iterations; generation and evaluation excluded).",
  ]
  return "\n".join(lines)
