"""PPO on Craftax-Classic: achievement success rates against the random agent, and speed.

`fulcrum bench craftax --json` trains (or reuses, in runs/bench_craftax/) the `craftax_ppo`
recipe, then plays its final policy and the uniform random agent on fresh worlds, side by side:
- `success` (agent → {achievement → rate}) and `score` (agent → Crafter score, %): for `ppo`
  over the episodes that ended in the last 10% of training (as Craftax reports), for
  `ppo_fresh` and `random` over the episodes ending within `PLAY_STEPS` steps of
  `ppo.num_envs` fresh worlds (episodes still running then are not counted);
- `env_steps_per_s`: the random agent's compiled loop (environment, a small MLP, restarts);
- `train_steps_per_s`: environment steps per second of PPO training (median over its log rows);
- `episode_return`, `episode_length`: per agent.
Writes craftax.json, craftax.md and craftax.png (success per achievement, PPO vs random).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fulcrum import recipes
from fulcrum.benchmarks.common import checkout_root, device_description, results_dir, write_results
from fulcrum.platform import launch
from fulcrum.platform.agents import ppo
from fulcrum.platform.agents.envs import craftax

RUNS = checkout_root() / "runs" / "bench_craftax"
PLAY_STEPS = 1000  # Steps of the fresh worlds the final policy and the random agent play.
PLAY_SEED = 1_000_000
QUICK = {
  "ppo.num_envs": 8,
  "ppo.num_steps": 16,
  "ppo.total_steps": 8 * 16 * 4,
  "ppo.minibatches": 2,
  "ppo.epochs": 1,
  "ppo.width": 32,
  "ppo.pool": 4,
  "ppo.log_every": 1,
  "ppo.checkpoint_every": 2,
  "ppo.report_fraction": 0.5,
}


def _config(quick: bool):
  config = recipes.get("craftax_ppo")
  with config.unlocked():
    config.train.progress = False
    for key, value in (QUICK if quick else {}).items():
      config.ppo[key.split(".")[1]] = value
  return config


def _summary(sums: dict) -> dict:
  tally = ppo.Tally()
  tally.add(sums)
  rates = tally.rates()
  return {"success": rates, "score": ppo.crafter_score(rates), **tally.dump()}


def run(quick: bool = False) -> dict:
  config = _config(quick)
  workdir = RUNS / ("quick" if quick else "ppo")
  launch.train(config, workdir)
  report = json.loads((workdir / "achievements.json").read_text())
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  _, params, updates = ppo.load_params(workdir)
  steps = 20 if quick else PLAY_STEPS
  random = ppo.play(config.ppo, ppo.uniform_policy(params), PLAY_SEED, steps)
  fresh = ppo.play(config.ppo, params, PLAY_SEED, steps)
  agents = {
    "ppo": {"success": report["success_rates"], "score": report["score"],
            "episodes": report["episodes"],
            "episode_return": float(np.mean([r["episode_return"] for r in rows[-3:]])),
            "episode_length": float(np.mean([r["episode_length"] for r in rows[-3:]]))},
    "ppo_fresh": _summary(fresh),
    "random": _summary(random),
  }  # fmt: skip
  result = {
    "device": device_description(),
    "env_steps": updates * config.ppo.num_envs * config.ppo.num_steps,
    "num_envs": config.ppo.num_envs,
    "env_steps_per_s": random["steps_per_s"],
    "train_steps_per_s": float(np.median([r["steps_per_s"] for r in rows])),
    "success": {k: v["success"] for k, v in agents.items()},
    "score": {k: v["score"] for k, v in agents.items()},
    "episodes": {k: v["episodes"] for k, v in agents.items()},
    "episode_return": {k: v["episode_return"] for k, v in agents.items()},
    "episode_length": {k: v["episode_length"] for k, v in agents.items()},
  }
  md = _markdown(result)
  if quick:
    return {**result, "markdown": md}
  _plot(result, results_dir() / "craftax.png")
  return write_results("craftax", result, md)


def _markdown(r: dict) -> str:
  agents = list(r["success"])
  lines = [
    f"# PPO on Craftax-Classic ({r['device']})",
    "",
    f"`craftax_ppo` (MLP policy), {r['env_steps']:,} environment steps in {r['num_envs']} "
    f"environments; training ran {r['train_steps_per_s']:,.0f} env steps/s, the random agent's "
    f"compiled loop {r['env_steps_per_s']:,.0f}.",
    "",
    "| achievement | " + " | ".join(agents) + " |",
    "|---|" + "---|" * len(agents),
  ]
  for name in craftax.ACHIEVEMENTS:
    lines.append(f"| {name} | " + " | ".join(f"{r['success'][a][name]:.3f}" for a in agents) + " |")
  lines += [
    "| **Crafter score (%)** | " + " | ".join(f"**{r['score'][a]:.2f}**" for a in agents) + " |",
    "| episodes | " + " | ".join(f"{r['episodes'][a]:.0f}" for a in agents) + " |",
    "| episode return | " + " | ".join(f"{r['episode_return'][a]:.2f}" for a in agents) + " |",
    "| episode length | " + " | ".join(f"{r['episode_length'][a]:.0f}" for a in agents) + " |",
    "",
    "`ppo`: episodes ending in the last 10% of training; `ppo_fresh` and `random`: the final "
    f"policy and the uniform random agent on {r['num_envs']} fresh worlds for "
    f"{PLAY_STEPS} steps (episodes still running then are not counted).",
  ]
  return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  x = np.arange(len(craftax.ACHIEVEMENTS))
  for i, (agent, color) in enumerate((("random", "tab:gray"), ("ppo", "tab:blue"))):
    rates = [100 * r["success"][agent][a] for a in craftax.ACHIEVEMENTS]
    label = f"{agent} (score {r['score'][agent]:.1f}%)"
    ax.bar(x + (i - 0.5) * 0.4, rates, 0.4, label=label, color=color)
  ax.set_xticks(x, craftax.ACHIEVEMENTS, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("success rate (%)")
  ax.set_title(f"Craftax-Classic: PPO after {r['env_steps']:,} steps vs random")
  ax.legend()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
