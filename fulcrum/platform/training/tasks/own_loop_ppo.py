"""`task = ppo`: reinforcement learning on a JAX environment with its own compiled loop
(`fulcrum.platform.agents.ppo`, which `fulcrum train` runs for this task). The trainer's
supervised hooks do not apply: each says so in one line."""

from __future__ import annotations

from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Task


def _own_loop(*_args, **_kwargs):
  raise UserError(
    "task=ppo trains with its own loop (fulcrum train --recipe craftax_ppo runs it); it has no "
    "supervised data, evaluation or decoding"
  )


class Ppo(Task):
  """Marks `task = ppo` as known; the PPO loop owns its data and loss."""

  name = "ppo"
  example_inputs = train_iterator = eval_sets = loss = eval_sums = eval_metrics = _own_loop


TASK = Ppo
