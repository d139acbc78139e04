"""The `agent.*` config section: the environment, tasks, text interface, demonstrations and
evaluation of LM agents (read when `task = agent`)."""

from __future__ import annotations

import ml_collections

from fulcrum.platform.agents.environments import ENVIRONMENTS


def config_defaults() -> ml_collections.ConfigDict:
  """Every `agent.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.env = "farm"  # The environment (agents/environments.py).
  c.tasks = "lite"  # lite | all | comma-separated task ids.
  c.history = 4  # Past actions the agent reads each turn (one line each).
  c.demos_per_task = 16  # Planner episodes per task for behaviour cloning (training seeds).
  c.eval_episodes = 4  # Episodes per task in evaluation (held-out seeds).
  c.eval_temperature = 0.0  # 0: greedy actions in evaluation.
  return c


def validate_config(s: ml_collections.ConfigDict) -> None:
  """Checks the `agent.*` section; raises ValueError naming the fix."""
  checks = [
    (s.env in ENVIRONMENTS, f"agent.env={s.env!r} is unknown; choose one of "
     f"{', '.join(ENVIRONMENTS)}"),
    (s.history >= 0, f"agent.history must be >= 0, got {s.history}"),
    (s.demos_per_task >= 1, f"agent.demos_per_task must be >= 1, got {s.demos_per_task}"),
    (s.eval_episodes >= 1, f"agent.eval_episodes must be >= 1, got {s.eval_episodes}"),
    (s.eval_temperature >= 0, f"agent.eval_temperature must be >= 0, got {s.eval_temperature}"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
