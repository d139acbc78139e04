"""What `fulcrum train` and `fulcrum.platform.train` run for a config.

Most tasks are one run of the trainer. An iterated config at its top level
(`workdir.is_iteration_driver`: SPIN with no `spin.pairs` yet, an agent's improvement with no
`improve.rollouts` yet) is a sequence of runs, one per iteration, that its driver
(`selfplay/driver.py`, `agents/improve.py`) generates data for and starts. PPO (`task = ppo`)
is one compiled loop of its own (`agents/ppo.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import improve, ppo
from fulcrum.platform.selfplay import driver
from fulcrum.platform.training import init_from, trainer

DRIVERS = {"spin": driver, "agent_improve": improve}  # task → its iterations' driver module.
OWN_LOOPS = {"ppo": ppo}  # task → the module whose `run` trains it (not the supervised trainer).


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`; returns the last metrics (see `trainer.train`)."""
  if workdir_lib.is_iteration_driver(config):
    return DRIVERS[config.task].run(config, workdir)
  if config.get("task") in OWN_LOOPS:
    return OWN_LOOPS[config.task].run(config, workdir)
  return trainer.train(config, workdir)


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run of `config` trains with: the model (and tokenizer) of its source
  (`train.init_from`, or an iterated run's `spin.init_from` / `improve.init_from`) in place of
  the recipe's."""
  if workdir_lib.is_iteration_driver(config):
    return DRIVERS[config.task].with_source_model(config)
  if config.get("task") in OWN_LOOPS:
    return config
  return init_from.resolve_config(config)
