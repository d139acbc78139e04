"""What `fulcrum train` and `fulcrum.platform.train` run for a config.

Most tasks are one run of the trainer. A SPIN config at its top level (`task = spin` with no
`spin.pairs` yet) is a sequence of runs, one per self-play iteration, that its driver
(`selfplay/driver.py`) generates data for and starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from fulcrum.platform.selfplay import driver
from fulcrum.platform.training import init_from, trainer


def is_spin_driver(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a SPIN run's top level (the driver's), not one iteration's run."""
  return config.get("task") == "spin" and not config.spin.pairs


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`; returns the last metrics (see `trainer.train`)."""
  if is_spin_driver(config):
    return driver.run(config, workdir)
  return trainer.train(config, workdir)


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run of `config` trains with: the model (and tokenizer) of its source
  (`train.init_from`, or a SPIN run's `spin.init_from`) in place of the recipe's."""
  if is_spin_driver(config):
    return driver.with_source_model(config)
  return init_from.resolve_config(config)
