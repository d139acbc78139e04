"""The farming world's facts: map layout, tiles, items, tools, crops, recipes, villagers, sizes,
and the environment `State`.

Everything here is a module constant (static under jit) or the `State` pytree of arrays. Every
other module of `envs/` reads its vocabulary from here; nothing else spells an item, a recipe or
a villager.

The 16x16 map (x to the right, y down), here as `reset` draws it for one key and task
(`render.map_chars`; `@` the player, `P` the task's mature parsnips, `S` slimes):

  y=0   .HHH........~~~~   the house (x 1..3, y 0..1) and the lake (x 12..15, y 0..2)
  y=1   .HHH........~~~~
  y=2   w.o.o....o..~~~~   weeds `w`, stones `o` and trees `T`: scattered on the farm
  y=3   ..@.............   (x 0..10, y 2..9) by the reset key, never on row 3, column 7
  y=4   wo....w.........   or the crop plot (x 1..4, y 5..6, where a task's crops grow)
  y=5   .PPP......w.....
  y=6   o...........V.V.   abigail (12, 6), pierre (14, 6)
  y=7   .TT.wTT.T.w.....
  y=8   .T........w..V..   robin (13, 8)
  y=9   ..ow............
  y=10  ................
  y=11  #######,########   the mine's wall, its entrance at (7, 11)
  y=12  ,,,,,,,,,,,,,,,,   the mine floor, where slimes live
  y=13  ,,,#,,,,,,,#,,,,
  y=14  ,,,,,,#,,S,,,,,,
  y=15  ,,,,,,,,,,,,,,S,   the mine's deepest row
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

SIZE = 16  # the map is SIZE x SIZE tiles
N_SLOTS = 12  # inventory slots
STACK_MAX = 99  # items per slot
MAX_SLIMES = 4
N_INIT_ITEMS = 6  # item stacks a task's `init` may add (slots 6..11, after the six tools)

ENERGY_MAX = 100
HEALTH_MAX = 100
WATER_MAX = 20  # watering-can capacity
TOOL_ENERGY = 2  # energy per tool use
SLIME_HP = 3
SLIME_DAMAGE = 5  # per adjacent slime per step
SLIME_SIGHT = 3  # a slime within this many tiles (Manhattan) walks toward the player
MOVE_MAX = 4  # move(dx, dy) takes dx, dy in -MOVE_MAX..MOVE_MAX

DAY_START = 6 * 60  # minutes after midnight when a day starts
DAY_END = 26 * 60  # 2:00 the next night: the player falls asleep
MINUTES_PER_ACTION = 10  # and per tile walked

# Directions, in the order of the action text (up = y - 1).
DIRECTIONS = ("up", "down", "left", "right")
DIRECTION_DELTAS = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], np.int32)  # (dx, dy)

# Terrain: (name, render char, walkable).
TERRAIN = (
  ("grass", ".", True),
  ("tilled", "=", True),
  ("water", "~", False),
  ("wall", "#", False),
  ("floor", ",", True),
  ("house", "H", False),
)
GRASS, TILLED, WATER, WALL, FLOOR, HOUSE = range(len(TERRAIN))
TERRAIN_NAMES = tuple(t[0] for t in TERRAIN)
TERRAIN_WALKABLE = np.array([t[2] for t in TERRAIN])

# Objects on a tile (they all block walking): (name, render char).
OBJECTS = (("none", " "), ("weed", "w"), ("stone", "o"), ("tree", "T"))
NONE, WEED, STONE, TREE = range(len(OBJECTS))
OBJECT_NAMES = tuple(o[0] for o in OBJECTS)

# Items: (name, kind, short name for the text render). Item 0 is the empty slot.
ITEM_KINDS = ("none", "tool", "seed", "produce", "material", "gift", "crafted")
ITEMS = (
  ("none", "none", ""),
  ("hoe", "tool", "hoe"),
  ("watering_can", "tool", "can"),
  ("axe", "tool", "axe"),
  ("pickaxe", "tool", "pickaxe"),
  ("scythe", "tool", "scythe"),
  ("sword", "tool", "sword"),
  ("parsnip_seeds", "seed", "pars_sd"),
  ("potato_seeds", "seed", "pota_sd"),
  ("parsnip", "produce", "parsnip"),
  ("potato", "produce", "potato"),
  ("wood", "material", "wood"),
  ("stone", "material", "stone"),
  ("fiber", "material", "fiber"),
  ("amethyst", "gift", "amethyst"),
  ("daffodil", "gift", "daffodil"),
  ("chest", "crafted", "chest"),
  ("fence", "crafted", "fence"),
  ("torch", "crafted", "torch"),
  ("scarecrow", "crafted", "scarecrw"),
  ("path", "crafted", "path"),
  ("sprinkler", "crafted", "sprinklr"),
)
ITEM_NAMES = tuple(i[0] for i in ITEMS)
ITEM_SHORT = tuple(i[2] for i in ITEMS)
N_ITEMS = len(ITEMS)
ITEM = {name: index for index, name in enumerate(ITEM_NAMES)}
ITEM_KIND = np.array([ITEM_KINDS.index(i[1]) for i in ITEMS], np.int32)
# Anything but tools (and the empty slot) can be given to a villager.
GIFTABLE = np.array([i[1] not in ("none", "tool") for i in ITEMS])
TOOLS = tuple(i[0] for i in ITEMS if i[1] == "tool")  # the starting inventory, slots 0..5
HOE, CAN, AXE, PICKAXE, SCYTHE, SWORD = (ITEM[t] for t in TOOLS)

# Crops: (name, seed item, produce item, grown days to maturity, render char when mature).
# Maturity is short (2 and 3 watered nights) so that farming tasks fit one episode.
CROPS = (
  ("none", "none", "none", 0, " "),
  ("parsnip", "parsnip_seeds", "parsnip", 2, "P"),
  ("potato", "potato_seeds", "potato", 3, "Q"),
)
CROP_NAMES = tuple(c[0] for c in CROPS)
CROP_SEED = np.array([ITEM[c[1]] for c in CROPS], np.int32)
CROP_PRODUCE = np.array([ITEM[c[2]] for c in CROPS], np.int32)
CROP_DAYS = np.array([c[3] for c in CROPS], np.int32)
SEED_CROP = np.zeros(N_ITEMS, np.int32)  # item -> the crop it plants (0: not a seed)
for _crop, _seed in enumerate(CROP_SEED[1:], start=1):
  SEED_CROP[_seed] = _crop

# Recipes: (name = the item made, {ingredient: count}).
RECIPES = (
  ("chest", {"wood": 10}),
  ("fence", {"wood": 2}),
  ("torch", {"wood": 1, "fiber": 1}),
  ("scarecrow", {"wood": 5, "fiber": 2, "stone": 1}),
  ("path", {"stone": 2}),
  ("sprinkler", {"stone": 3, "wood": 2}),
)
RECIPE_NAMES = tuple(r[0] for r in RECIPES)
N_RECIPES = len(RECIPES)
RECIPE_OUTPUT = np.array([ITEM[r[0]] for r in RECIPES], np.int32)
RECIPE_COST = np.zeros((N_RECIPES, N_ITEMS), np.int32)  # [recipe, item] -> count consumed
for _r, (_, _cost) in enumerate(RECIPES):
  for _name, _count in _cost.items():
    RECIPE_COST[_r, ITEM[_name]] = _count

# Friendship changes.
TALK_FRIENDSHIP = 1  # once per villager per day
GIFT_FRIENDSHIP = {"liked": 3, "neutral": 1, "disliked": -1}

# Villagers: (name, (x, y), liked item, disliked item). They stand still.
VILLAGERS = (
  ("abigail", (12, 6), "amethyst", "fiber"),
  ("pierre", (14, 6), "daffodil", "stone"),
  ("robin", (13, 8), "wood", "parsnip"),
)
VILLAGER_NAMES = tuple(v[0] for v in VILLAGERS)
N_VILLAGERS = len(VILLAGERS)
VILLAGER_POS = np.array([v[1] for v in VILLAGERS], np.int32)  # [v, (x, y)]
VILLAGER_LIKES = np.array([ITEM[v[2]] for v in VILLAGERS], np.int32)
VILLAGER_DISLIKES = np.array([ITEM[v[3]] for v in VILLAGERS], np.int32)
# [v, item] -> friendship change of a gift.
GIFT_DELTA = np.full((N_VILLAGERS, N_ITEMS), GIFT_FRIENDSHIP["neutral"], np.int32)
GIFT_DELTA[np.arange(N_VILLAGERS), VILLAGER_LIKES] = GIFT_FRIENDSHIP["liked"]
GIFT_DELTA[np.arange(N_VILLAGERS), VILLAGER_DISLIKES] = GIFT_FRIENDSHIP["disliked"]

START_POS = (2, 3)
START_FACING = 1  # down
START_WATER = WATER_MAX
MINE_ENTRANCE = (7, 11)
CROP_PLOT = tuple((x, y) for y in (5, 6) for x in range(1, 5))  # a task's pre-grown crops
N_WEEDS, N_STONES, N_TREES = 8, 6, 6  # scattered on the farm by the reset key


def _base_terrain() -> np.ndarray:
  t = np.full((SIZE, SIZE), GRASS, np.int8)  # indexed [y, x]
  t[0:2, 1:4] = HOUSE
  t[0:3, 12:16] = WATER
  t[11, :] = WALL
  t[12:, :] = FLOOR
  t[MINE_ENTRANCE[1], MINE_ENTRANCE[0]] = FLOOR
  t[13, 3] = t[13, 11] = t[14, 6] = WALL  # pillars in the mine
  return t


BASE_TERRAIN = _base_terrain()


def _object_candidates() -> np.ndarray:
  """Farm tiles where the reset key may put a weed, stone or tree: flat indices y * SIZE + x."""
  keep = []
  for y in range(2, 10):
    for x in range(0, 11):
      road = y == 3 or x == 7
      if road or (x, y) in CROP_PLOT or BASE_TERRAIN[y, x] != GRASS:
        continue
      keep.append(y * SIZE + x)
  return np.array(keep, np.int32)


OBJECT_CANDIDATES = _object_candidates()
SLIME_SPAWNS = np.array(  # mine tiles at least 2 rows below the entrance
  [y * SIZE + x for y in range(13, SIZE) for x in range(SIZE) if BASE_TERRAIN[y, x] == FLOOR],
  np.int32,
)


def _neighbours(mask: np.ndarray) -> np.ndarray:
  """Tiles 4-adjacent to `mask` (not in it)."""
  out = np.zeros_like(mask)
  out[1:, :] |= mask[:-1, :]
  out[:-1, :] |= mask[1:, :]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out & ~mask


def _regions() -> tuple[tuple[str, ...], np.ndarray]:
  """Named places a `reach` task asks for: (names, bool[region, y, x])."""
  walkable = TERRAIN_WALKABLE[BASE_TERRAIN]
  ys, xs = np.mgrid[0:SIZE, 0:SIZE]
  regions = {
    "lake": _neighbours(BASE_TERRAIN == WATER) & walkable,
    "house": _neighbours(BASE_TERRAIN == HOUSE) & walkable,
    "town": (xs >= 11) & (ys >= 4) & (ys <= 10) & walkable,
    "mine": BASE_TERRAIN == FLOOR,
    "mine_depths": (BASE_TERRAIN == FLOOR) & (ys == SIZE - 1),
  }
  for name, (x, y), _, _ in VILLAGERS:
    spot = np.zeros((SIZE, SIZE), bool)
    spot[y, x] = True
    regions[name] = _neighbours(spot) & walkable
  return tuple(regions), np.stack(list(regions.values()))


REGION_NAMES, REGION_MASKS = _regions()
N_REGIONS = len(REGION_NAMES)
VILLAGER_MASK = np.zeros((SIZE, SIZE), bool)
VILLAGER_MASK[VILLAGER_POS[:, 1], VILLAGER_POS[:, 0]] = True


@struct.dataclass
class Counters:
  """What the player has done this episode (the evaluators read these)."""

  harvested: jax.Array  # int32[crop]  produce harvested per crop id (index 0 unused)
  crafted: jax.Array  # int32[recipe]  items crafted per recipe
  kills: jax.Array  # int32  slimes defeated
  gifts: jax.Array  # int32  gifts given
  gifted_liked: jax.Array  # bool[villager]  was given an item they like
  talked: jax.Array  # bool[villager]  talked to at least once
  visited: jax.Array  # bool[region]  the player stood in the region


@struct.dataclass
class State:
  """One environment: arrays only (vmap adds a leading batch axis to every field)."""

  terrain: jax.Array  # int8[y, x]  TERRAIN index
  objects: jax.Array  # int8[y, x]  OBJECTS index
  crop: jax.Array  # int8[y, x]  CROPS index, 0 = none
  stage: jax.Array  # int8[y, x]  watered nights grown
  watered: jax.Array  # bool[y, x]
  pos: jax.Array  # int32[2]  (x, y)
  facing: jax.Array  # int32  DIRECTIONS index
  energy: jax.Array  # int32  0..ENERGY_MAX
  health: jax.Array  # int32  0..HEALTH_MAX
  water: jax.Array  # int32  watering-can level 0..WATER_MAX
  slot: jax.Array  # int32  selected inventory slot
  inv_item: jax.Array  # int32[slot]  ITEMS index, 0 = empty
  inv_count: jax.Array  # int32[slot]  0..STACK_MAX
  day: jax.Array  # int32  from 1
  time: jax.Array  # int32  minutes after midnight, DAY_START..DAY_END
  slime_pos: jax.Array  # int32[slime, 2]  (x, y)
  slime_hp: jax.Array  # int32[slime]  0 = dead or absent
  friendship: jax.Array  # int32[villager]  >= 0
  talked_today: jax.Array  # bool[villager]
  counters: Counters
  steps: jax.Array  # int32  actions taken this episode
  progress: jax.Array  # float32  the task's progress after the last step, in [0, 1]
  done: jax.Array  # bool
  fainted: jax.Array  # bool
  task: Any  # tasks.TaskArrays (tasks.py imports this module)
  key: jax.Array  # uint32[2]  raw PRNG key (slime moves)
