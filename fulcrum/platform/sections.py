"""The sections of a training config and the package that owns each.

  task        which `training/tasks/` module trains (lm, forecast, synthetic)
  train       training/train_config.py    steps, batch, logging, checkpoints
  model       modules/model_config.py     derived from `ModelConfig` (one source of defaults)
  optimizer   optim/factory.py            name, schedule, GaLore, 8-bit state
  data        data/pipeline.py            the text corpus; tasks' recipe bases add their keys
  decode      decode/strategies.py        `fulcrum decode` / `fulcrum calibrate` defaults
  mesh        training/train_config.py    device mesh axes
  log         training/metrics.py         TensorBoard, Weights & Biases
  spin        selfplay/spin_config.py     SPIN iterations (read when task = spin)
  agent       agents/agent_config.py      LM agents: environment, tasks, interface, evaluation
  improve     agents/improve_config.py    an agent's policy-gradient rounds (task = agent_improve)
  ppo         agents/ppo_config.py        PPO on a JAX environment, e.g. Craftax (task = ppo)

`base_config()` assembles them; `validate(config)` runs each owner's check. Recipes start from
`base_config()` (through `fulcrum/recipes/_bases.py`).
"""

from __future__ import annotations

import ml_collections

from fulcrum.modules import ModelConfig, models
from fulcrum.platform import config as config_lib
from fulcrum.platform.agents import agent_config, improve_config, ppo_config
from fulcrum.platform.config import Section
from fulcrum.platform.data import pipeline
from fulcrum.platform.decode import strategies
from fulcrum.platform.optim import factory
from fulcrum.platform.selfplay import spin_config
from fulcrum.platform.training import metrics, tasks, train_config


def model_defaults() -> ml_collections.ConfigDict:
  """The `model.*` section: `ModelConfig`'s config fields and their defaults."""
  return config_lib.from_dataclass(ModelConfig.config_fields())


def validate_model(section: ml_collections.ConfigDict) -> None:
  """`models.validate` on the section (ValueError naming the fix)."""
  models.validate(ModelConfig.from_mapping(section))


SECTIONS: dict[str, Section] = {
  "train": Section(train_config.train_defaults, train_config.validate_train),
  "model": Section(model_defaults, validate_model),
  "optimizer": Section(factory.config_defaults, factory.validate_config),
  "data": Section(pipeline.config_defaults, pipeline.validate_config),
  "decode": Section(strategies.config_defaults, strategies.validate_config),
  "mesh": Section(train_config.mesh_defaults, train_config.validate_mesh),
  "log": Section(metrics.config_defaults, metrics.validate_config),
  "spin": Section(spin_config.config_defaults, spin_config.validate_config),
  "agent": Section(agent_config.config_defaults, agent_config.validate_config),
  "improve": Section(improve_config.config_defaults, improve_config.validate_config),
  "ppo": Section(ppo_config.config_defaults, ppo_config.validate_config),
}
TOP_LEVEL = {"task": "lm"}  # What is trained: a task in fulcrum/platform/training/tasks/.


def base_config() -> ml_collections.ConfigDict:
  """Every key a training recipe understands, each with its default (unlocked)."""
  return config_lib.assemble(TOP_LEVEL, SECTIONS)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that a type alone cannot; raises `UserError` naming the fix."""
  tasks.check_name(config.get("task", "lm"))
  config_lib.check(config, SECTIONS)
  tasks.validate(config)  # What the task needs across sections (e.g. the tokenizer's vocab).


def from_json(text: str) -> ml_collections.ConfigDict:
  """A run's `config.json` as a locked config, keys added since then at their defaults."""
  return config_lib.from_json(text, base_config())
