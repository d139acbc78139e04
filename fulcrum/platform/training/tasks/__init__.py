"""Tasks: what a recipe trains on — its data, the model's inputs, its loss and eval metrics.

The trainer is task-agnostic: it asks the task (chosen by the config's `task` key) for
iterators and evaluation sets, and calls `task.loss` / `task.eval_sums` inside its jitted
steps. Each task is one module in this folder that sets `TASK` to its `Task` class; the class's
`name` is what `task = ...` selects. A new task is a new module here: nothing else changes.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

import ml_collections

from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Batch, Task, cross_entropy

__all__ = ["Batch", "Task", "check_name", "cross_entropy", "get_task", "registry", "validate"]


@functools.cache
def registry() -> dict[str, type[Task]]:
  """Task name → class, from every module in this folder that defines `TASK`."""
  found = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f"{__name__}.{info.name}")
    cls = getattr(module, "TASK", None)
    if cls is not None:
      found[cls.name] = cls
  return found


def check_name(name: str) -> None:
  """Raises UserError unless `name` is a task (the config's `task` key)."""
  if name not in registry():
    raise UserError(f"task={name!r} is unknown; choose one of {', '.join(registry())}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for an unknown task, or a config the task cannot train (`check_config`)."""
  name = config.get("task", "lm")
  check_name(name)
  registry()[name].check_config(config)


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The task a config names in its `task` key."""
  name = config.get("task", "lm")
  check_name(name)
  return registry()[name](config)
