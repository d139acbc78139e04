"""The farming environment suite (issue 18): a small Stardew-like world in pure JAX.

world.py       the world's facts (map, items, tools, crops, recipes, villagers) and `State`
actions.py     the action vocabulary: text <-> int32[3]
farm.py        reset / step (jit + vmap)
navigation.py  blocked tiles, move and move_to (BFS distance field)
tasks.py       tasks as data (StarDojo's schema), their array form, evaluators
tasks.json     the shipped tasks (and the Lite set)
render.py      the text observation (fixed-length bytes) and the RGB image
planner.py     the scripted planner (oracle and demonstrations)
"""

from fulcrum.platform.agents.envs.actions import (
  encoded_vocabulary,
  format_action,
  parse_action,
  vocabulary,
)
from fulcrum.platform.agents.envs.farm import reset, step
from fulcrum.platform.agents.envs.render import OBS_LEN, rgb, text, text_str
from fulcrum.platform.agents.envs.tasks import (
  Task,
  TaskArrays,
  describe,
  load,
  select,
  stack,
  to_arrays,
)
from fulcrum.platform.agents.envs.world import State

__all__ = [
  "OBS_LEN",
  "State",
  "Task",
  "TaskArrays",
  "describe",
  "encoded_vocabulary",
  "format_action",
  "load",
  "parse_action",
  "reset",
  "rgb",
  "select",
  "stack",
  "step",
  "text",
  "text_str",
  "to_arrays",
  "vocabulary",
]
