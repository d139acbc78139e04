"""LM agents in the farming world: how fast the environment and compiled rollouts run, and how
often each agent succeeds on held-out seeds.

`fulcrum bench agents --json` trains (or reuses, in runs/bench_agents/) the `agent_bc` recipe's
behaviour-cloned agent and the `agent_improve` recipe's improvement rounds from it (DAgger on the
agent's own rollouts), then measures, side by side in one run:
- `env_steps_per_s`: the environment alone, 64 vmapped envs, random actions, one compiled scan;
- `rollout_steps_per_s`: the cloned LM policy and the 64 envs in one compiled `lax.scan`
  (observation → tokens → grammar-constrained decode → env step);
- `python_loop_steps_per_s`: the same policy and envs stepped from a Python loop, one compiled
  call per step (as API-style harnesses do); `rollout_speedup` is their ratio;
- `success` (agent → {domain → rate, "overall"}) for `random`, `behaviour_cloned`, `improved`
  and `planner` on every Lite task × `EPISODES` held-out seeds, `success_ci95` (Wilson half-widths),
  `invalid_action_rate` (turns whose text was no action) and `noop_action_rate` per agent.
`improvement` is improved − behaviour_cloned overall, with the 95% half-width of that paired
difference (`improvement_ci95`: the two agents play the same seeds).
Goals on CPU: env ≥ 10,000 steps/s; compiled rollout ≥ 10× the Python loop; invalid actions 0;
the improved agent beats the cloned one by more than the 95% interval.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum import recipes
from fulcrum.benchmarks.common import checkout_root, device_description, write_results
from fulcrum.platform import launch
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import demos, envs, evaluation, rollout
from fulcrum.platform.agents.environments import FARM
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.training import trainer

RUNS = checkout_root() / "runs" / "bench_agents"
ENVS = 64  # Environments stepped together in the speed measurements.
SPEED_STEPS = 200  # Env steps timed (after compilation) for env_steps_per_s.
ROLLOUT_STEPS = 12  # Policy turns timed for the rollout and the Python loop.
EPISODES = 16  # Held-out episodes per Lite task for success rates (240: a paired 95%
# interval of ~±0.06 on a difference, against ~±0.08 with 8 a task).
TINY = {  # The smallest agent: --quick's, and the tests' (one set of shapes compiled for all).
  "train.batch_size": 8,
  "model.d_model": 32,
  "model.num_layers": 1,
  "model.num_heads": 2,
  "agent.tasks": "farming_till_3,exploration_reach_lake",  # Both 30 steps: one rollout shape.
  "agent.demos_per_task": 1,
  "agent.eval_episodes": 1,  # The shapes the bench evaluates with: training's eval compiles it.
  "agent.history": 2,
  "train.seq_len": demos.seq_len(rollout.Interface(FARM, history=2)),
}
QUICK = {**TINY, "train.steps": 10, "train.eval_every": 0, "train.checkpoint_every": 10}


QUICK_IMPROVE = {  # Demonstrations anchor it: a 10-step agent's episodes may all return alike.
  "improve.iterations": 1,
  "improve.steps": 1,
  "improve.episodes": 2,
  "improve.demo_weight": 1.0,
  "improve.demos_per_task": 1,
  "improve.pg_weight": 1.0,  # The recipe's DAgger and the policy-gradient rows, both exercised.
}


def _config(quick: bool, recipe: str = "agent_bc", **extra):
  config = recipes.get(recipe)
  with config.unlocked():
    config.train.progress = False
    for key, value in {**(QUICK if quick else {}), **extra}.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def _improved(quick: bool, bc_workdir) -> tuple:
  """The `agent_improve` recipe run from the bench's cloned agent (reused when done)."""
  extra = {"improve.init_from": str(bc_workdir)}
  if quick:
    extra.update(QUICK_IMPROVE)
  config = _config(quick, "agent_improve", **extra)
  workdir = RUNS / ("quick_improved" if quick else "improved")
  result = launch.train(config, workdir)
  return workdir, result


def _speed_batch(config, n: int):
  chosen = evaluation.selected_tasks(config)
  played = [chosen[i % len(chosen)] for i in range(n)]
  seeds = jnp.asarray([evaluation.EVAL_SEED + i for i in range(n)], jnp.int32)
  return envs.stack([envs.to_arrays(t) for t in played]), seeds


def _timed(fn) -> float:
  """Seconds of one call of `fn` (blocking), after a first call that compiles."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _planner_success(config, episodes: int) -> dict:
  chosen = evaluation.selected_tasks(config)
  played = [t for t in chosen for _ in range(episodes)]
  eps = [
    demos.planner_episode(t, evaluation.EVAL_SEED + i) for t in chosen for i in range(episodes)
  ]
  outcomes = {
    "success": np.array([e.success for e in eps]),
    "progress": np.array([1.0 if e.success else 0.0 for e in eps]),
    "turns": sum(len(e.actions) for e in eps),
    "malformed": 0,
    "noops": 0,
  }
  return evaluation.summarize(played, outcomes)


def run(quick: bool = False) -> dict:
  config = _config(quick)
  workdir = RUNS / ("quick" if quick else "bc")
  trainer.train(config, workdir)
  improved_dir, improved_run = _improved(quick, workdir)
  exp, state, _ = workdir_lib.load(workdir)
  _, improved_state, _ = workdir_lib.load(improved_dir)
  interface = evaluation.interface(exp.config)
  episodes = 1 if quick else EPISODES
  chosen = evaluation.selected_tasks(exp.config)
  # --quick times the evaluation's own shapes (its episodes, its steps): compiled once for both.
  n_envs = len(chosen) * episodes if quick else ENVS
  episode_steps = max(t.max_steps for t in chosen)

  tasks, seeds = _speed_batch(exp.config, n_envs)
  speed_steps = episode_steps if quick else SPEED_STEPS
  env_s = _timed(
    lambda: rollout.random_rollout(interface, speed_steps, tasks, seeds, jax.random.key(0))
  )
  greedy = Sampling()
  steps = episode_steps if quick else ROLLOUT_STEPS
  scan_s = _timed(
    lambda: rollout.rollout(
      exp.model, interface, greedy, steps, state.params, tasks, seeds, jax.random.key(0)
    )  # fmt: skip
  )
  loop_s = _timed(
    lambda: rollout.python_loop_rollout(
      exp.model, interface, greedy, steps, state.params, tasks, seeds, jax.random.key(0)
    )  # fmt: skip
  )

  agents = {
    "random": evaluation.evaluate_random(exp.config, episodes=episodes),
    "behaviour_cloned": evaluation.evaluate(exp.model, state.params, exp.config, episodes=episodes),
    "improved": evaluation.evaluate(
      exp.model, improved_state.params, exp.config, episodes=episodes
    ),
    "planner": _planner_success(exp.config, episodes),
  }
  result = {
    "device": device_description(),
    "envs": n_envs,
    "env_steps_per_s": n_envs * speed_steps / env_s,
    "rollout_steps_per_s": n_envs * steps / scan_s,
    "python_loop_steps_per_s": n_envs * steps / loop_s,
    "success": {name: r["success"] for name, r in agents.items()},
    "success_ci95": {name: r["success_ci95"] for name, r in agents.items()},
    "success_by_difficulty": {name: r["success_by_difficulty"] for name, r in agents.items()},
    "invalid_action_rate": {name: r["invalid_action_rate"] for name, r in agents.items()},
    "noop_action_rate": {name: r["noop_action_rate"] for name, r in agents.items()},
    "episodes_per_task": episodes,
    "tasks": exp.config.agent.tasks,
    "params": sum(x.size for x in jax.tree.leaves(state.params)),
    "improve_table": improved_run["table"],
  }
  result.update(_paired_difference(agents["improved"], agents["behaviour_cloned"]))
  result["rollout_speedup"] = result["rollout_steps_per_s"] / result["python_loop_steps_per_s"]
  md = _markdown(result)
  if quick:
    return {**result, "markdown": md}
  return write_results("agents", result, md)


def _paired_difference(a: dict, b: dict) -> dict:
  """a − b overall success on the same episodes, with the 95% half-width of the paired
  difference (normal approximation over per-episode differences)."""
  d = np.asarray(a["episode_success"], float) - np.asarray(b["episode_success"], float)
  half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
  return {"improvement": float(d.mean()), "improvement_ci95": float(half)}


def _markdown(r: dict) -> str:
  domains = [d for d in r["success"]["planner"] if d != "overall"] + ["overall"]
  lines = [
    f"# LM agents in the farming world ({r['device']})",
    "",
    f"Success on the {r['tasks']} tasks, {r['episodes_per_task']} held-out seeds each "
    "(± Wilson 95% half-width):",
    "",
    "| agent | " + " | ".join(domains) + " | invalid actions | no-op actions |",
    "|---|" + "---|" * (len(domains) + 2),
  ]
  for name, rates in r["success"].items():
    ci = r["success_ci95"][name]
    cells = [f"{rates[d]:.2f} ± {ci[d]:.2f}" for d in domains]
    lines.append(
      f"| {name} | " + " | ".join(cells) + f" | {r['invalid_action_rate'][name]:.3f} | "
      f"{r['noop_action_rate'][name]:.3f} |"
    )
  lines += [
    "",
    f"Speed ({r['envs']} environments): environment alone {r['env_steps_per_s']:,.0f} steps/s; "
    f"LM policy + environment in one compiled scan {r['rollout_steps_per_s']:,.0f} steps/s vs "
    f"a Python loop of compiled steps {r['python_loop_steps_per_s']:,.0f} steps/s "
    f"({r['rollout_speedup']:.1f}x).",
    "",
    f"Improved − behaviour-cloned, same episodes: {r['improvement']:+.3f} ± "
    f"{r['improvement_ci95']:.3f} (paired 95%). The improvement rounds (`agent_improve`: "
    "the planner's labels for the states the agent's own rollouts reached, DAgger; held-out "
    "success on 8 seeds a task):",
    "",
    r["improve_table"],
  ]
  return "\n".join(lines)
