"""Evaluating an agent: episodes of the selected tasks on held-out seeds, played by compiled
rollouts; success per domain × difficulty with 95% intervals, progress, invalid actions, steps/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fulcrum.platform.agents import envs, rollout
from fulcrum.platform.agents.environments import ENVIRONMENTS
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.errors import UserError

EVAL_SEED = 1_000_000  # Held-out episodes use seeds from here; demonstrations from 0.


def interface(config: ml_collections.ConfigDict) -> rollout.Interface:
  """The text interface `agent.*` describes."""
  return rollout.Interface(ENVIRONMENTS[config.agent.env], history=config.agent.history)


def selected_tasks(config: ml_collections.ConfigDict, spec: str | None = None) -> list[envs.Task]:
  """The tasks `agent.tasks` (or `spec`: lite | all | comma-separated ids) names."""
  spec = config.agent.tasks if spec is None else spec
  ids: str | list[str] = spec if spec in ("lite", "all") else [s for s in spec.split(",") if s]
  if not ids:
    raise UserError("agent.tasks is empty; give lite, all or comma-separated task ids")
  return envs.select(envs.load(), ids)


def ci95(successes: int, n: int) -> float:
  """Half-width of the 95% Wilson score interval of a success rate (honest at 0 and 1, where
  the normal approximation's width collapses to 0); 0 when n = 0."""
  if n == 0:
    return 0.0
  z, p = 1.96, successes / n
  return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def summarize(tasks: Sequence[envs.Task], outcomes: dict[str, np.ndarray]) -> dict[str, Any]:
  """Rates per domain, per domain × difficulty and overall, with 95% half-widths.

  Args:
    tasks: the task of each episode.
    outcomes: `episode_outcomes` of their rollout.
  """
  success = outcomes["success"]
  domains = [t.domain for t in tasks]
  cells = [f"{t.domain}/{t.difficulty}" for t in tasks]
  out: dict[str, Any] = {"success": {}, "success_ci95": {}, "success_by_difficulty": {}}
  for name in sorted(set(domains)):
    pick = np.array([d == name for d in domains])
    out["success"][name] = float(success[pick].mean())
    out["success_ci95"][name] = ci95(int(success[pick].sum()), int(pick.sum()))
  for name in sorted(set(cells)):
    pick = np.array([c == name for c in cells])
    out["success_by_difficulty"][name] = float(success[pick].mean())
  out["success"]["overall"] = float(success.mean())
  out["success_ci95"]["overall"] = ci95(int(success.sum()), len(success))
  out["progress"] = float(outcomes["progress"].mean())
  turns = max(int(outcomes["turns"]), 1)
  out["invalid_action_rate"] = int(outcomes["malformed"]) / turns
  out["noop_action_rate"] = int(outcomes["noops"]) / turns
  out["episodes"] = len(success)
  return out


def episode_outcomes(turns: rollout.Turn) -> dict[str, np.ndarray]:
  """Per episode `success` and `progress` ([b]), and over live turns: `turns`, `malformed`
  (the agent's text was no action: the decoder never completed one) and `noops` (a valid
  action the environment could not carry out, e.g. a hoe swung at water)."""
  live = np.asarray(turns.live)
  info = jax.tree.map(np.asarray, turns.info)
  return {
    "success": (info["success"] & live).any(0),
    "progress": np.where(live, info["progress"], 0.0).max(0),
    "turns": live.sum(),
    "malformed": ((np.asarray(turns.action) < 0) & live).sum(),
    "noops": (info["invalid"] & live).sum(),
  }


def evaluate(model, params, config: ml_collections.ConfigDict, *, tasks: str | None = None,
             episodes: int | None = None, temperature: float | None = None, seed: int = 0
             ) -> dict[str, Any]:  # fmt: skip
  """Plays `episodes` (default `agent.eval_episodes`) of every selected task on held-out seeds
  with the agent, all in one compiled rollout; returns `summarize`'s rates, the env steps taken
  and the seconds it took."""
  a = config.agent
  chosen = selected_tasks(config, tasks)
  n = a.eval_episodes if episodes is None else episodes
  temperature = a.eval_temperature if temperature is None else temperature
  played = [t for t in chosen for _ in range(n)]
  seeds = jnp.asarray([EVAL_SEED + i for _ in chosen for i in range(n)], jnp.int32)
  arrays = envs.stack([envs.to_arrays(t) for t in played])
  steps = max(t.max_steps for t in chosen)
  sampling = Sampling(temperature=temperature)
  start = time.perf_counter()
  turns, _ = rollout.rollout(
    model, interface(config), sampling, steps, params, arrays, seeds, jax.random.key(seed)
  )
  turns = jax.block_until_ready(turns)
  seconds = time.perf_counter() - start
  outcomes = episode_outcomes(turns)
  out = summarize(played, outcomes)
  out["episode_success"] = [bool(x) for x in outcomes["success"]]  # Task-major, as `played`.
  out["env_steps"] = int(outcomes["turns"])  # Steps of running episodes.
  out["seconds"] = seconds  # The compiled rollout, compilation included (see `bench agents`).
  return out


def evaluate_random(config: ml_collections.ConfigDict, *, tasks: str | None = None,
                    episodes: int | None = None, seed: int = 1) -> dict[str, Any]:  # fmt: skip
  """`evaluate`'s rates for the random agent (actions drawn uniformly from the vocabulary) on the
  same tasks and held-out seeds."""
  chosen = selected_tasks(config, tasks)
  n = config.agent.eval_episodes if episodes is None else episodes
  played = [t for t in chosen for _ in range(n)]
  seeds = jnp.asarray([EVAL_SEED + i for _ in chosen for i in range(n)], jnp.int32)
  arrays = envs.stack([envs.to_arrays(t) for t in played])
  steps = max(t.max_steps for t in chosen)
  turns, _ = rollout.random_rollout(interface(config), steps, arrays, seeds, jax.random.key(seed))
  return summarize(played, episode_outcomes(turns))


def evaluate_workdir(workdir, *, tasks: str | None = None, episodes: int | None = None,
                     record: str | None = None) -> dict[str, Any]:  # fmt: skip
  """`evaluate` on a trained agent workdir's newest checkpoint (what `fulcrum agent eval` runs);
  `record` writes the first episode as text (PATH.txt) and an animated GIF (PATH.gif)."""
  from fulcrum.platform import workdir as workdir_lib
  from fulcrum.platform.agents import record as record_lib

  config = workdir_lib.read_config(workdir)
  if config.get("task") not in ("agent", "agent_improve"):
    raise UserError(
      f"{workdir} trained task={config.get('task')!r}, not an agent; pass the --workdir of an "
      "agent recipe run (e.g. agent_bc, agent_improve)"
    )
  if episodes is not None and episodes < 1:
    raise UserError(f"--episodes must be >= 1, got {episodes}")
  exp, state, step = workdir_lib.load(workdir)
  result = evaluate(exp.model, state.params, exp.config, tasks=tasks, episodes=episodes)
  result["step"] = step
  if record:
    chosen = selected_tasks(exp.config, tasks)[0]
    result["recorded"] = record_lib.record(
      exp.model, state.params, interface(exp.config), chosen, EVAL_SEED, record
    )
  return result


def render(result: dict[str, Any]) -> str:
  """The evaluation as a few lines of text (what `fulcrum agent eval` prints)."""
  lines = [f"{'domain':<14}{'success':>9}{'± 95%':>8}"]
  for domain, rate in result["success"].items():
    lines.append(f"{domain:<14}{rate:>9.3f}{result['success_ci95'][domain]:>8.3f}")
  lines.append(
    f"episodes {result['episodes']}, progress {result['progress']:.3f}, invalid actions "
    f"{result['invalid_action_rate']:.3f}, no-op actions {result['noop_action_rate']:.3f}; "
    f"{result['env_steps']} env steps in "
    f"{result['seconds']:.1f} s (compilation included)"
  )
  if "recorded" in result:
    lines.append("recorded: " + ", ".join(result["recorded"]))
  return "\n".join(lines)
