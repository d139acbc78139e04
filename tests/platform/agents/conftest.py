"""A tiny behaviour-cloned agent run shared by the agent tests (trained once per session)."""

from __future__ import annotations

import pytest

from tests.conftest import train_recipe
from tests.platform.agents.test_rollout import TINY_AGENT


@pytest.fixture(scope="session")
def agent_run(tmp_path_factory):
  """An `agent_bc` run of TINY_AGENT (6 steps, 2 demonstrations a task)."""
  workdir = tmp_path_factory.mktemp("agent") / "run"
  settings = {**TINY_AGENT, "train.steps": 6, "train.eval_every": 6, "train.log_every": 3}
  settings["agent.demos_per_task"] = 2
  train_recipe("agent_bc", [f"{k}={v}" for k, v in settings.items()], workdir)
  return workdir
