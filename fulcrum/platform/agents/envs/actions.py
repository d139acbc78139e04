"""The action vocabulary: the one owner of what an action is, as text and as int32[3].

An action is encoded as (kind, a, b):

  MOVE         move(dx,dy)      dx, dy in -4..4, not both 0: walk |dx| tiles along x, then |dy|
  MOVE_TO      move_to(x,y)     x, y in 0..15: walk the shortest path to the tile (or next to it)
  USE          use(up)          use the selected item on the tile in that direction
  INTERACT     interact(left)   harvest, talk or give the selected item
  CHOOSE_ITEM  choose_item(4)   select inventory slot 0..11
  CRAFT        craft(chest)     a recipe by name (`world.RECIPE_NAMES`)
  SLEEP        sleep()

The text has no spaces. `vocabulary()` lists every valid action once, in a fixed order, and
`encoded_vocabulary()` gives their arrays in the same order (the LM agent's grammar is built
from these two).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from fulcrum.platform.agents.envs import world
from fulcrum.platform.errors import UserError

KINDS = ("move", "move_to", "use", "interact", "choose_item", "craft", "sleep")
MOVE, MOVE_TO, USE, INTERACT, CHOOSE_ITEM, CRAFT, SLEEP = range(len(KINDS))

FORMS = (
  f"move(dx,dy) with dx,dy in -{world.MOVE_MAX}..{world.MOVE_MAX} (not both 0)",
  f"move_to(x,y) with x,y in 0..{world.SIZE - 1}",
  f"use(d) or interact(d) with d in {'|'.join(world.DIRECTIONS)}",
  f"choose_item(slot) with slot in 0..{world.N_SLOTS - 1}",
  f"craft(r) with r in {'|'.join(world.RECIPE_NAMES)}",
  "sleep()",
)

_PATTERN = re.compile(r"^([a-z_]+)\(([^()]*)\)$")
_INT = re.compile(r"^-?\d+$")


def _encode_all() -> list[tuple[int, int, int]]:
  out = []
  r = range(-world.MOVE_MAX, world.MOVE_MAX + 1)
  out += [(MOVE, dx, dy) for dx in r for dy in r if (dx, dy) != (0, 0)]
  out += [(MOVE_TO, x, y) for x in range(world.SIZE) for y in range(world.SIZE)]
  out += [(USE, d, 0) for d in range(len(world.DIRECTIONS))]
  out += [(INTERACT, d, 0) for d in range(len(world.DIRECTIONS))]
  out += [(CHOOSE_ITEM, s, 0) for s in range(world.N_SLOTS)]
  out += [(CRAFT, r, 0) for r in range(world.N_RECIPES)]
  out += [(SLEEP, 0, 0)]
  return out


def _text(kind: int, a: int, b: int) -> str:
  if kind in (MOVE, MOVE_TO):
    return f"{KINDS[kind]}({a},{b})"
  if kind in (USE, INTERACT):
    return f"{KINDS[kind]}({world.DIRECTIONS[a]})"
  if kind == CHOOSE_ITEM:
    return f"choose_item({a})"
  if kind == CRAFT:
    return f"craft({world.RECIPE_NAMES[a]})"
  return "sleep()"


@functools.cache
def _tables() -> tuple[tuple[str, ...], np.ndarray, dict[str, int], dict[tuple, int]]:
  codes = _encode_all()
  texts = tuple(_text(*c) for c in codes)
  return (
    texts,
    np.array(codes, np.int32),
    {t: i for i, t in enumerate(texts)},
    {c: i for i, c in enumerate(codes)},
  )


def vocabulary() -> list[str]:
  """Every valid action's text, in the fixed vocabulary order."""
  return list(_tables()[0])


def encoded_vocabulary() -> np.ndarray:
  """int32[n, 3]: `vocabulary()`'s actions encoded, in the same order."""
  return _tables()[1].copy()


def index(action: np.ndarray | tuple[int, int, int]) -> int:
  """The vocabulary index of an encoded action (UserError if it is not a valid action)."""
  code = tuple(int(v) for v in np.asarray(action).reshape(-1))
  found = _tables()[3].get(code)
  if found is None:
    raise UserError(f"{code} is not an encoded action; valid forms: {'; '.join(FORMS)}")
  return found


def format_action(action: np.ndarray | tuple[int, int, int]) -> str:
  """The text of an encoded action, e.g. [2, 0, 0] -> "use(up)"."""
  return _tables()[0][index(action)]


def parse_action(text: str) -> np.ndarray:
  """int32[3] for an action's text, e.g. "move(1,-2)" -> [0, 1, -2].

  Raises:
    UserError: the text is not one valid action (the message names it and the valid forms).
  """
  found = _tables()[2].get(text)
  if found is not None:
    return _tables()[1][found].copy()
  m = _PATTERN.match(text.strip()) if isinstance(text, str) else None
  hint = ""
  if m and m.group(1) in KINDS:
    args = m.group(2).split(",")
    if " " in text:
      hint = " (write it without spaces)"
    elif m.group(1) in ("move", "move_to") and not all(_INT.match(a) for a in args):
      hint = " (its arguments must be integers)"
    else:
      hint = " (an argument is out of range)"
  raise UserError(f"unknown action {text!r}{hint}; valid forms: {'; '.join(FORMS)}")
