"""A scripted planner: the oracle that solves every shipped task, and the source of
demonstrations for behaviour cloning.

`act(state, task)` reads a host copy of one (unbatched) state and returns the next action
(int32[3]). It is reactive: every call re-plans from the state alone (the task's evaluator, the
map, the inventory), so it needs no memory and recovers from anything (a slime in the way, a
day ending early). It gathers materials, tills, plants, waters, sleeps, harvests, walks with
`move_to`, fights and gives gifts. Walking distances come from a breadth-first search over the
same blocked tiles `step` uses (`navigation.blocked`).

`run_episode(task, seed)` plays one episode with a policy (the planner by default).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fulcrum.platform.agents.envs import actions, farm, navigation, tasks, world

Action = np.ndarray
INF = navigation.INF
LOW_HEALTH = 30  # leave the mine and sleep below this
_GATHERED_FROM = {"wood": (world.TREE, world.AXE), "stone": (world.STONE, world.PICKAXE),
                  "fiber": (world.WEED, world.SCYTHE)}  # fmt: skip
_DELTAS = world.DIRECTION_DELTAS
_SAFE_SPOT = (7, 9)  # on the farm road, above the mine entrance


def _a(kind: int, a: int = 0, b: int = 0) -> Action:
  return np.array([kind, a, b], np.int32)


def _either(step: Action | None, otherwise: Callable[[], Action | None]) -> Action | None:
  return step if step is not None else otherwise()


@functools.cache
def _blocked_fn():
  return jax.jit(navigation.blocked)


class _View:
  """A host copy of one state with the planner's derived maps (distances from the player)."""

  def __init__(self, state: world.State):
    self.s = jax.device_get(state)
    self.block = np.asarray(_blocked_fn()(state))
    self.x, self.y = (int(v) for v in self.s.pos)
    self.dist = self._bfs()
    self.t = self.s.task

  def _bfs(self) -> np.ndarray:
    d = np.full((world.SIZE, world.SIZE), INF, np.int32)
    d[self.y, self.x] = 0
    queue = collections.deque([(self.x, self.y)])
    while queue:
      x, y = queue.popleft()
      for dx, dy in _DELTAS:
        nx, ny = x + dx, y + dy
        inside = 0 <= nx < world.SIZE and 0 <= ny < world.SIZE
        if inside and not self.block[ny, nx] and d[ny, nx] == INF:
          d[ny, nx] = d[y, x] + 1
          queue.append((nx, ny))
    return d

  # -- inventory
  def count(self, item: int) -> int:
    return int(self.s.inv_count[self.s.inv_item == item].sum())

  def slot_of(self, item: int) -> int | None:
    slots = np.flatnonzero(self.s.inv_item == item)
    return int(slots[0]) if len(slots) else None

  def holding(self) -> int:
    return int(self.s.inv_item[int(self.s.slot)])

  # -- places
  def adjacent(self, tx: int, ty: int) -> bool:
    return abs(tx - self.x) + abs(ty - self.y) == 1

  def stand_cost(self, tx: int, ty: int) -> int:
    """Walking distance to a free tile beside (tx, ty) (0 when already beside it)."""
    best = INF
    for dx, dy in _DELTAS:
      nx, ny = tx + dx, ty + dy
      if 0 <= nx < world.SIZE and 0 <= ny < world.SIZE:
        best = min(best, int(self.dist[ny, nx]))
    return best

  def nearest(self, mask: np.ndarray, beside: bool = True) -> tuple[int, int] | None:
    """The tile of `mask` that is quickest to stand beside (or on, if not `beside`)."""
    best, where = INF, None
    for ty, tx in zip(*np.nonzero(mask), strict=True):
      cost = self.stand_cost(tx, ty) if beside else int(self.dist[ty, tx])
      if cost < best:
        best, where = cost, (int(tx), int(ty))
    return where


def _toward(v: _View, tx: int, ty: int) -> int:
  """The direction from the player to the 4-adjacent tile (tx, ty)."""
  return int(np.flatnonzero(((tx - v.x, ty - v.y) == _DELTAS).all(1))[0])


def _approach(v: _View, tx: int, ty: int) -> Action | None:
  """None when beside (tx, ty); else a move_to that ends beside it."""
  if v.adjacent(tx, ty):
    return None
  if v.block[ty, tx]:
    return _a(actions.MOVE_TO, tx, ty)  # the environment stops beside a blocked tile
  stands = [(tx + dx, ty + dy) for dx, dy in _DELTAS]
  stands = [(x, y) for x, y in stands if 0 <= x < world.SIZE and 0 <= y < world.SIZE]
  x, y = min(stands, key=lambda p: v.dist[p[1], p[0]])
  return _a(actions.MOVE_TO, x, y)


def _select(v: _View, item: int) -> Action | None:
  if v.holding() == item:
    return None
  slot = v.slot_of(item)
  return None if slot is None else _a(actions.CHOOSE_ITEM, slot)


def _do(v: _View, kind: int, tx: int, ty: int, item: int | None = None) -> Action:
  """Select `item` (if given), walk beside (tx, ty), then use/interact toward it."""
  if item is not None and (step := _select(v, item)) is not None:
    return step
  return _either(_approach(v, tx, ty), lambda: _a(kind, _toward(v, tx, ty)))


def _use_tool(v: _View, tool: int, mask: np.ndarray) -> Action | None:
  """Use `tool` on the nearest tile of `mask` (sleep first if too tired); None if none."""
  where = v.nearest(mask)
  if where is None:
    return None
  if world.ITEM_KIND[tool] == world.ITEM_KINDS.index("tool") and v.s.energy < world.TOOL_ENERGY:
    return _a(actions.SLEEP)
  return _do(v, actions.USE, *where, item=tool)


# ---------------------------------------------------------------- skills


def _free_grass(v: _View) -> np.ndarray:
  s = v.s
  return (s.terrain == world.GRASS) & (s.objects == 0) & ~world.VILLAGER_MASK


def _till(v: _View) -> Action | None:
  return _use_tool(v, world.HOE, _free_grass(v))


def _water(v: _View, mask: np.ndarray) -> Action | None:
  """Water the nearest tile of `mask`, refilling the can at the lake first if it is empty."""
  if not mask.any():
    return None
  if v.s.water == 0:
    return _use_tool(v, world.CAN, v.s.terrain == world.WATER)
  return _use_tool(v, world.CAN, mask)


def _plant(v: _View, crop: int) -> Action | None:
  seed = int(world.CROP_SEED[crop])
  if v.count(seed) == 0:
    return None
  s = v.s
  empty = (s.terrain == world.TILLED) & (s.crop == 0) & (s.objects == 0)
  if v.nearest(empty) is None:
    return _till(v)
  return _use_tool(v, seed, empty)


def _farm(v: _View, crop: int, need: int, harvest: bool = True) -> Action | None:
  """Grow (and harvest) `need` more of `crop`: till, plant, water, sleep, harvest."""
  s = v.s
  mine = s.crop == crop
  mature = mine & (s.stage >= world.CROP_DAYS[crop])
  if harvest and mature.any():
    return _do(v, actions.INTERACT, *v.nearest(mature))
  if mine.sum() < need and (step := _plant(v, crop)) is not None:
    return step
  if (step := _water(v, mine & ~mature & ~s.watered)) is not None:
    return step
  return _a(actions.SLEEP)


def _gather(v: _View, name: str) -> Action | None:
  obj, tool = _GATHERED_FROM[name]
  return _use_tool(v, tool, v.s.objects == obj)


def _obtain(v: _View, item: int, total: int) -> Action | None:
  """The next action toward holding `total` of `item`; None when held (or impossible)."""
  have = v.count(item)
  if have >= total:
    return None
  name = world.ITEM_NAMES[item]
  if name in _GATHERED_FROM:
    return _gather(v, name)
  crops = np.flatnonzero(item == world.CROP_PRODUCE)
  if len(crops):
    return _farm(v, int(crops[0]), total - have)
  if name in world.RECIPE_NAMES:
    return _craft(v, world.RECIPE_NAMES.index(name))
  return None


def _craft(v: _View, recipe: int) -> Action | None:
  for item in np.flatnonzero(world.RECIPE_COST[recipe]):
    step = _obtain(v, int(item), int(world.RECIPE_COST[recipe, item]))
    if step is not None:
      return step
  return _a(actions.CRAFT, recipe)


def _talk(v: _View, villager: int) -> Action:
  if world.GIFTABLE[v.holding()]:  # interacting would give the item away
    return _a(actions.CHOOSE_ITEM, v.slot_of(world.HOE))
  return _do(v, actions.INTERACT, *world.VILLAGER_POS[villager])


def _gift(v: _View, villager: int, item: int) -> Action:
  return _do(v, actions.INTERACT, *world.VILLAGER_POS[villager], item=item)


def _befriend(v: _View, villager: int) -> Action:
  liked = int(world.VILLAGER_LIKES[villager])
  if v.count(liked):
    return _gift(v, villager, liked)
  if not v.s.talked_today[villager]:
    return _talk(v, villager)
  return _either(_obtain(v, liked, 1), lambda: _a(actions.SLEEP))


def _gift_liked(v: _View, target: int) -> Action:
  choices = range(world.N_VILLAGERS) if target == world.N_VILLAGERS else [target]
  for villager in choices:  # first a villager whose liked item is at hand
    liked = int(world.VILLAGER_LIKES[villager])
    if v.count(liked):
      return _gift(v, villager, liked)
  for villager in choices:
    step = _obtain(v, int(world.VILLAGER_LIKES[villager]), 1)
    if step is not None:
      return step
  return _a(actions.SLEEP)


def _reach(v: _View, mask: np.ndarray) -> Action:
  where = v.nearest(mask & ~v.block, beside=False)
  if where is None:  # the way is blocked (a slime): wait a step
    return _a(actions.SLEEP) if v.s.time > world.DAY_END - 60 else _a(actions.CHOOSE_ITEM, 0)
  return _a(actions.MOVE_TO, *where)


def _fight(v: _View) -> Action | None:
  """Strike a slime beside the player, or (when low on health) leave the mine and sleep."""
  s = v.s
  alive = s.slime_hp > 0
  near = [tuple(p) for p, a in zip(s.slime_pos, alive, strict=True) if a and v.adjacent(*p)]
  in_mine = s.terrain[v.y, v.x] == world.FLOOR
  if s.health <= LOW_HEALTH:
    if in_mine or near:
      return _a(actions.MOVE_TO, *_SAFE_SPOT)
    return _a(actions.SLEEP)
  if near:
    return _do(v, actions.USE, *near[0], item=world.SWORD)
  return None


def _hunt(v: _View) -> Action:
  s = v.s
  live = [tuple(int(c) for c in p) for p, hp in zip(s.slime_pos, s.slime_hp, strict=True) if hp]
  if not live:
    return _a(actions.SLEEP)
  target = min(live, key=lambda p: v.stand_cost(*p))
  if v.stand_cost(*target) >= INF:  # walled in by other slimes: step toward the mine
    return _reach(v, world.REGION_MASKS[world.REGION_NAMES.index("mine")])
  return _a(actions.MOVE_TO, *target)


def act(state: world.State, task: Any = None) -> Action:
  """The planner's next action (int32[3]) for one unbatched state (its task is `state.task`;
  `task` is accepted for the policy signature and unused)."""
  del task
  v = _View(state)
  t = v.t
  evaluator = tasks.EVALUATOR_NAMES[int(t.evaluator)]
  target, quantity = int(t.target), int(t.quantity)
  if (step := _fight(v)) is not None:
    return step
  c = v.s.counters
  if evaluator == "inventory_at_least":
    return _either(_obtain(v, target, quantity), lambda: _a(actions.SLEEP))
  if evaluator == "harvested_at_least":
    return _farm(v, target, quantity - int(c.harvested[target]))
  if evaluator == "crafted_at_least":
    return _craft(v, target)
  if evaluator == "tiles_at_least":
    return _tiles(v, tasks.TILE_KINDS[target], quantity)
  if evaluator == "reach":
    return _reach(v, world.REGION_MASKS[target])
  if evaluator == "kills_at_least":
    return _hunt(v)
  if evaluator == "friendship_at_least":
    return _befriend(v, target)
  if evaluator == "gift_liked":
    return _gift_liked(v, target)
  if evaluator == "talked_at_least":
    todo = [i for i in range(world.N_VILLAGERS) if not c.talked[i]]
    villager = min(todo, key=lambda i: v.stand_cost(*world.VILLAGER_POS[i]))
    return _talk(v, villager)
  unvisited = ~c.visited[:, None, None] & world.REGION_MASKS
  return _reach(v, unvisited.any(0))  # visited_at_least


def _tiles(v: _View, kind: str, quantity: int) -> Action:
  s = v.s
  tilled = s.terrain == world.TILLED
  if kind == "tilled":
    step = _till(v)
  elif kind == "watered":
    step = _either(_water(v, tilled & ~s.watered & (s.objects == 0)), lambda: _till(v))
  elif kind == "planted":
    crop = max(range(1, len(world.CROPS)), key=lambda c: v.count(int(world.CROP_SEED[c])))
    step = _plant(v, crop)
  elif kind == "watered_crop":
    step = _water(v, (s.crop > 0) & ~s.watered)
    if step is None:
      crop = max(range(1, len(world.CROPS)), key=lambda c: v.count(int(world.CROP_SEED[c])))
      step = _plant(v, crop)
  else:  # mature
    crop = max(range(1, len(world.CROPS)), key=lambda c: v.count(int(world.CROP_SEED[c])))
    step = _farm(v, crop, quantity, harvest=False)
  return step if step is not None else _a(actions.SLEEP)


# ---------------------------------------------------------------- episodes


@functools.cache
def _compiled():
  return jax.jit(farm.reset), jax.jit(farm.step)


def run_episode(
  task: tasks.Task | tasks.TaskArrays,
  seed: int,
  policy: Callable[[world.State, Any], Any] | None = None,
) -> dict[str, Any]:
  """Plays one episode of `task` from reset key `seed` with `policy(state, task) -> action`
  (the planner by default) until done.

  Returns:
    {"steps", "success", "reward" (total), "actions" (text), "progress" (after each step),
    "invalid" (count of invalid actions)}.
  """
  policy = policy or act
  arrays = tasks.to_arrays(task) if isinstance(task, tasks.Task) else task
  reset, step = _compiled()
  state, _ = reset(jax.random.PRNGKey(seed), arrays)
  texts, progress, total, invalid, info = [], [], 0.0, 0, {"success": False}
  done = False
  while not done:
    action = np.asarray(policy(state, task), np.int32)
    texts.append(actions.format_action(action))
    state, _, reward, done, info = step(state, action)
    total += float(reward)
    progress.append(float(info["progress"]))
    invalid += int(info["invalid"])
    done = bool(done)
  return {
    "steps": len(texts),
    "success": bool(info["success"]),
    "reward": total,
    "actions": texts,
    "progress": progress,
    "invalid": invalid,
    "final_state": state,
  }
