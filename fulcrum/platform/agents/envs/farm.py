"""The farming environment: `reset(key, task)` and `step(state, action)`, pure JAX (jit + vmap).

  state, obs = reset(key, tasks.to_arrays(task))
  state, obs, reward, done, info = step(state, actions.parse_action("move_to(3,14)"))

One step: the player's action, the clock (10 minutes per action or per tile walked; at 2:00 the
player falls asleep where they stand), then every slime moves and hits the player if adjacent.
reward = progress(t+1) - progress(t) of the task's evaluator; the episode is done on success,
when the player faints (health 0) or after the task's max_steps. Stepping a finished episode
leaves its state unchanged (reward 0, done True, invalid False).

The actions (`actions.py` spells them):
  move(dx,dy)     |dx| tiles along x, then |dy| along y, stopping before a blocked tile (water,
                  wall, house, object, villager, slime); facing = the last direction tried.
  move_to(x,y)    the shortest path to (x, y), or, if it is blocked, to the nearest free tile
                  beside it, facing it; invalid if unreachable or already there.
  use(d)          the selected item on the next tile in direction d: hoe (grass -> tilled),
                  watering can (water tilled soil or a crop: 1 water; refill facing the lake),
                  axe (tree -> 3 wood), pickaxe (stone -> 1 stone), scythe (weed -> 1 fiber),
                  sword (1 damage to a slime; at 0 hp it dies), seeds (plant on empty tilled
                  soil). Tools cost TOOL_ENERGY energy; seeds cost none.
  interact(d)     harvest a mature crop (+1 produce, the soil stays tilled), or give a villager
                  the selected item if it is giftable (not a tool), else talk (once a day).
  choose_item(s)  select slot s (an empty slot too).
  craft(r)        consume exactly the recipe's ingredients, add one item.
  sleep()         next day at 6:00: energy and health refilled, watered crops grow a stage,
                  the soil dries, daily talks reset.
An action that cannot act (wrong tile, missing item or ingredients, too little energy, a full
inventory) is an invalid no-op: it changes nothing, takes no time and `info["invalid"]` is set;
the slimes still move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents.envs import actions, navigation, render, tasks, world

# numpy, made device constants where used: importing this module must not start a JAX backend
# (a multi-host run joins after the imports).
_DELTAS = np.asarray(world.DIRECTION_DELTAS)
_VILLAGER_POS = np.asarray(world.VILLAGER_POS)
_GATHER = {world.AXE: (world.TREE, "wood", 3), world.PICKAXE: (world.STONE, "stone", 1),
           world.SCYTHE: (world.WEED, "fiber", 1)}  # fmt: skip
_OBJECT_KINDS = np.array(
  [world.WEED] * world.N_WEEDS + [world.STONE] * world.N_STONES + [world.TREE] * world.N_TREES,
  np.int8,
)


def _tree_where(pred: jax.Array, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


# ---------------------------------------------------------------- inventory


def add_item(item_ids, counts, item, n):
  """Adds n of `item` to a stack of it with room, else to the first empty slot.

  Returns:
    (item ids, counts, ok); n == 0 is a no-op that succeeds.
  """
  same = (item_ids == item) & (counts + n <= world.STACK_MAX)
  empty = item_ids == 0
  idx = jnp.where(same.any(), jnp.argmax(same), jnp.argmax(empty))
  ok = (same.any() | empty.any()) & (n > 0)
  item_ids = item_ids.at[idx].set(jnp.where(ok, item, item_ids[idx]))
  counts = counts.at[idx].add(jnp.where(ok, n, 0))
  return item_ids, counts, ok | (n == 0)


def _take_one(state: world.State) -> world.State:
  """One of the selected item used up (the slot empties at 0)."""
  count = state.inv_count.at[state.slot].add(-1)
  item = jnp.where(count > 0, state.inv_item, 0)
  return state.replace(inv_item=item, inv_count=count)


def owned(state: world.State) -> jax.Array:
  """int32[item]: how many of each item the inventory holds."""
  return jnp.zeros(world.N_ITEMS, jnp.int32).at[state.inv_item].add(state.inv_count)


# ---------------------------------------------------------------- reset


def reset(key: jax.Array, task: tasks.TaskArrays) -> tuple[world.State, jax.Array]:
  """A new episode of `task` (its array form); the key scatters the farm's weeds, stones and
  trees and places the slimes. Returns (state, text observation)."""
  k_obj, k_slime, k_state = jax.random.split(key, 3)
  task = jax.tree.map(jnp.asarray, task)
  n = len(_OBJECT_KINDS)
  spots = jax.random.permutation(k_obj, jnp.asarray(world.OBJECT_CANDIDATES))[:n]
  objects = jnp.zeros(world.SIZE * world.SIZE, jnp.int8).at[spots].set(jnp.asarray(_OBJECT_KINDS))
  objects = objects.reshape(world.SIZE, world.SIZE)

  plot = np.array(world.CROP_PLOT, np.int32)  # [k, (x, y)]
  planted = jnp.arange(len(plot)) < task.crop_count
  terrain = jnp.asarray(world.BASE_TERRAIN)
  terrain = terrain.at[plot[:, 1], plot[:, 0]].set(
    jnp.where(planted, world.TILLED, world.GRASS).astype(jnp.int8)
  )
  zeros8 = jnp.zeros((world.SIZE, world.SIZE), jnp.int8)
  crop = zeros8.at[plot[:, 1], plot[:, 0]].set(jnp.where(planted, task.crop, 0).astype(jnp.int8))
  stage = zeros8.at[plot[:, 1], plot[:, 0]].set(
    jnp.where(planted, task.crop_stage, 0).astype(jnp.int8)
  )
  watered = (
    jnp.zeros((world.SIZE, world.SIZE), bool)
    .at[plot[:, 1], plot[:, 0]]
    .set(planted & task.crop_watered)
  )

  spawn = jax.random.permutation(k_slime, jnp.asarray(world.SLIME_SPAWNS))[: world.MAX_SLIMES]
  slime_pos = jnp.stack([spawn % world.SIZE, spawn // world.SIZE], -1).astype(jnp.int32)
  slime_hp = jnp.where(jnp.arange(world.MAX_SLIMES) < task.slimes, world.SLIME_HP, 0)

  tools = jnp.asarray([world.ITEM[t] for t in world.TOOLS], jnp.int32)
  extra = task.items.astype(jnp.int32)
  inv_count = jnp.concatenate([jnp.ones(len(tools), jnp.int32), extra[:, 1]])
  inv_item = jnp.where(inv_count > 0, jnp.concatenate([tools, extra[:, 0]]), 0)

  i32 = lambda v: jnp.asarray(v, jnp.int32)
  pos = i32(world.START_POS)
  counters = world.Counters(
    harvested=jnp.zeros(len(world.CROPS), jnp.int32),
    crafted=jnp.zeros(world.N_RECIPES, jnp.int32),
    kills=i32(0),
    gifts=i32(0),
    gifted_liked=jnp.zeros(world.N_VILLAGERS, bool),
    talked=jnp.zeros(world.N_VILLAGERS, bool),
    visited=jnp.asarray(world.REGION_MASKS)[:, pos[1], pos[0]],
  )
  state = world.State(
    terrain=terrain,
    objects=objects,
    crop=crop,
    stage=stage,
    watered=watered,
    pos=pos,
    facing=i32(world.START_FACING),
    energy=i32(task.energy),
    health=i32(task.health),
    water=i32(task.water),
    slot=i32(0),
    inv_item=inv_item,
    inv_count=inv_count,
    day=i32(1),
    time=i32(world.DAY_START),
    slime_pos=slime_pos,
    slime_hp=slime_hp.astype(jnp.int32),
    friendship=jnp.zeros(world.N_VILLAGERS, jnp.int32),
    talked_today=jnp.zeros(world.N_VILLAGERS, bool),
    counters=counters,
    steps=i32(0),
    progress=jnp.asarray(0.0, jnp.float32),
    done=jnp.asarray(False),
    fainted=jnp.asarray(False),
    task=task,
    key=jax.random.key_data(k_state) if jnp.issubdtype(k_state.dtype, jax.dtypes.prng_key)
    else k_state,
  )  # fmt: skip
  state = state.replace(progress=tasks.progress(state))
  return state, render.text(state)


# ---------------------------------------------------------------- actions
# Each returns (state after the action, valid, minutes taken); `step` discards invalid results.


def _move(state, a, b, kind):
  del kind
  block = navigation.blocked(state)
  pos, facing, walked = navigation.walk(state.pos, state.facing, a, b, block)
  ok = (jnp.abs(a) <= world.MOVE_MAX) & (jnp.abs(b) <= world.MOVE_MAX) & (walked > 0)
  return state.replace(pos=pos, facing=facing), ok, walked * world.MINUTES_PER_ACTION


def _move_to(state, a, b, kind):
  block = navigation.blocked(state)
  target = jnp.stack([a, b]).astype(jnp.int32)
  active = kind == actions.MOVE_TO
  pos, facing, dist, reachable = navigation.walk_to(state.pos, target, block, active)
  moved = (pos != state.pos).any()
  turned = (dist == 0) & (pos != target).any()  # already beside a blocked target: turn to it
  ok = reachable & (moved | turned)
  minutes = jnp.maximum(dist, 1) * world.MINUTES_PER_ACTION
  return state.replace(pos=pos, facing=facing), ok, minutes


def _facing_tile(state, direction):
  d = jnp.clip(direction, 0, 3)
  t = state.pos + jnp.asarray(_DELTAS)[d]
  return d, t, navigation.in_bounds(t) & (direction >= 0) & (direction <= 3)


def _use(state, a, b, kind):
  del b, kind
  d, t, inside = _facing_tile(state, a)
  item = state.inv_item[state.slot]
  ty, tx = jnp.clip(t[1], 0, world.SIZE - 1), jnp.clip(t[0], 0, world.SIZE - 1)
  terrain, obj, crop = state.terrain[ty, tx], state.objects[ty, tx], state.crop[ty, tx]
  occupied = navigation.blocked(state)[ty, tx] & (obj == 0) & (terrain != world.WATER)
  occupied = occupied & (terrain != world.WALL) & (terrain != world.HOUSE)  # villager or slime
  tool = jnp.asarray(world.ITEM_KIND)[item] == world.ITEM_KINDS.index("tool")
  seed = jnp.asarray(world.SEED_CROP)[item]

  till = (item == world.HOE) & (terrain == world.GRASS) & (obj == 0) & ~occupied
  refill = (item == world.CAN) & (terrain == world.WATER) & (state.water < world.WATER_MAX)
  wet = (item == world.CAN) & (terrain == world.TILLED) & (obj == 0) & ~state.watered[ty, tx]
  wet = wet & (state.water > 0)
  gather_item, gather_n = jnp.asarray(0), jnp.asarray(0)
  for tool_id, (obj_kind, name, n) in _GATHER.items():
    hit = (item == tool_id) & (obj == obj_kind)
    gather_item = jnp.where(hit, world.ITEM[name], gather_item)
    gather_n = jnp.where(hit, n, gather_n)
  inv_item, inv_count, stored = add_item(state.inv_item, state.inv_count, gather_item, gather_n)
  gathered = (gather_n > 0) & stored
  slime = (state.slime_hp > 0) & (state.slime_pos == t).all(-1)
  strike = (item == world.SWORD) & slime.any()
  plant = (seed > 0) & (terrain == world.TILLED) & (crop == 0) & (obj == 0) & ~occupied

  energy_ok = ~tool | (state.energy >= world.TOOL_ENERGY)
  ok = inside & energy_ok & (till | refill | wet | gathered | strike | plant)
  hp = state.slime_hp - (strike & slime)
  killed = (strike & slime & (hp == 0)).any()
  new = state.replace(
    terrain=state.terrain.at[ty, tx].set(jnp.where(till, world.TILLED, terrain).astype(jnp.int8)),
    objects=state.objects.at[ty, tx].set(jnp.where(gathered, world.NONE, obj).astype(jnp.int8)),
    crop=state.crop.at[ty, tx].set(jnp.where(plant, seed, crop).astype(jnp.int8)),
    stage=state.stage.at[ty, tx].set(jnp.where(plant, 0, state.stage[ty, tx]).astype(jnp.int8)),
    watered=state.watered.at[ty, tx].set(state.watered[ty, tx] | wet),
    water=jnp.where(refill, world.WATER_MAX, state.water - wet),
    inv_item=jnp.where(gathered, inv_item, state.inv_item),
    inv_count=jnp.where(gathered, inv_count, state.inv_count),
    slime_hp=hp,
    energy=state.energy - jnp.where(tool, world.TOOL_ENERGY, 0),
    facing=d,
    counters=state.counters.replace(kills=state.counters.kills + killed),
  )
  new = _tree_where(plant, _take_one(new), new)
  return new, ok, world.MINUTES_PER_ACTION


def _interact(state, a, b, kind):
  del b, kind
  d, t, inside = _facing_tile(state, a)
  ty, tx = jnp.clip(t[1], 0, world.SIZE - 1), jnp.clip(t[0], 0, world.SIZE - 1)
  crop = state.crop[ty, tx]
  mature = (crop > 0) & (state.stage[ty, tx] >= jnp.asarray(world.CROP_DAYS)[crop])
  produce = jnp.asarray(world.CROP_PRODUCE)[crop]
  inv_item, inv_count, stored = add_item(
    state.inv_item, state.inv_count, produce, jnp.where(mature, 1, 0)
  )
  harvest = mature & stored
  c = state.counters
  harvested = state.replace(
    crop=state.crop.at[ty, tx].set(0),
    stage=state.stage.at[ty, tx].set(0),
    watered=state.watered.at[ty, tx].set(False),
    inv_item=inv_item,
    inv_count=inv_count,
    counters=c.replace(harvested=c.harvested.at[crop].add(1)),
  )

  here = (t == jnp.asarray(_VILLAGER_POS)).all(-1)  # [villager]
  v = jnp.argmax(here)
  item = state.inv_item[state.slot]
  gift = here.any() & jnp.asarray(world.GIFTABLE)[item]
  talk = here.any() & ~gift & ~state.talked_today[v]
  delta = jnp.where(gift, jnp.asarray(world.GIFT_DELTA)[v, item], world.TALK_FRIENDSHIP)
  social = state.replace(
    friendship=state.friendship.at[v].set(jnp.maximum(state.friendship[v] + delta, 0)),
    talked_today=state.talked_today.at[v].set(state.talked_today[v] | talk),
    counters=c.replace(
      gifts=c.gifts + gift,
      gifted_liked=c.gifted_liked.at[v].set(
        c.gifted_liked[v] | (gift & (item == jnp.asarray(world.VILLAGER_LIKES)[v]))
      ),
      talked=c.talked.at[v].set(c.talked[v] | talk),
    ),
  )
  social = _tree_where(gift, _take_one(social), social)
  new = _tree_where(harvest, harvested, social).replace(facing=d)
  return new, inside & (harvest | gift | talk), world.MINUTES_PER_ACTION


def _choose_item(state, a, b, kind):
  del b, kind
  ok = (a >= 0) & (a < world.N_SLOTS)
  return state.replace(slot=jnp.clip(a, 0, world.N_SLOTS - 1)), ok, world.MINUTES_PER_ACTION


def _craft(state, a, b, kind):
  del b, kind
  r = jnp.clip(a, 0, world.N_RECIPES - 1)
  cost = jnp.asarray(world.RECIPE_COST)[r]  # [item]
  enough = (owned(state) >= cost).all()
  # Take each ingredient from its stacks in slot order.
  item, count = state.inv_item, state.inv_count
  same = (item[:, None] == item[None, :]) & jnp.tri(world.N_SLOTS, k=-1, dtype=bool)
  before = (same * count[None, :]).sum(1)  # earlier slots holding the same item
  take = jnp.clip(cost[item] - before, 0, count)
  count = count - take
  item = jnp.where(count > 0, item, 0)
  out = jnp.asarray(world.RECIPE_OUTPUT)[r]
  item, count, stored = add_item(item, count, out, 1)
  c = state.counters
  new = state.replace(
    inv_item=item, inv_count=count, counters=c.replace(crafted=c.crafted.at[r].add(1))
  )
  ok = (a >= 0) & (a < world.N_RECIPES) & enough & stored
  return new, ok, world.MINUTES_PER_ACTION


def sleep(state: world.State) -> world.State:
  """The night: a new day at 6:00, energy and health refilled, every watered crop one stage
  older (up to maturity), the soil dry again, today's talks forgotten."""
  days = jnp.asarray(world.CROP_DAYS)[state.crop]
  grow = (state.crop > 0) & state.watered & (state.stage < days)
  return state.replace(
    day=state.day + 1,
    time=jnp.asarray(world.DAY_START, jnp.int32),
    energy=jnp.asarray(world.ENERGY_MAX, jnp.int32),
    health=jnp.asarray(world.HEALTH_MAX, jnp.int32),
    stage=(state.stage + grow).astype(jnp.int8),
    watered=jnp.zeros_like(state.watered),
    talked_today=jnp.zeros_like(state.talked_today),
  )


def _sleep(state, a, b, kind):
  del a, b, kind
  return sleep(state), jnp.asarray(True), jnp.asarray(0, jnp.int32)


_HANDLERS = (_move, _move_to, _use, _interact, _choose_item, _craft, _sleep)
assert len(_HANDLERS) == len(actions.KINDS)


# ---------------------------------------------------------------- slimes and the step


def _slimes(state: world.State) -> world.State:
  """Every live slime walks one tile toward the player when within SLIME_SIGHT tiles, else one
  random tile or stays (on mine floor only); then each adjacent slime hits the player."""
  key, sub = jax.random.split(state.key)
  wander = jax.random.randint(sub, (world.MAX_SLIMES,), 0, 5)  # 0: stay, 1..4: a direction
  spos, alive = state.slime_pos, state.slime_hp > 0
  free = (state.terrain == world.FLOOR) & (state.objects == 0)

  def one(i, spos):  # in turn, so two slimes never step onto the same tile
    diff = state.pos - spos[i]
    chase = jnp.abs(diff).sum() <= world.SLIME_SIGHT
    toward = jnp.where(
      jnp.abs(diff[0]) >= jnp.abs(diff[1]),
      jnp.where(diff[0] > 0, navigation.RIGHT, navigation.LEFT),
      jnp.where(diff[1] > 0, navigation.DOWN, navigation.UP),
    )
    d = jnp.where(chase, toward, jnp.maximum(wander[i] - 1, 0))
    nxt = spos[i] + jnp.asarray(_DELTAS)[d]
    others = alive & (jnp.arange(world.MAX_SLIMES) != i) & (spos == nxt).all(-1)
    ok = alive[i] & (chase | (wander[i] > 0)) & navigation.in_bounds(nxt)
    ok = ok & navigation.at(free, nxt) & (nxt != state.pos).any() & ~others.any()
    return spos.at[i].set(jnp.where(ok, nxt, spos[i]))

  spos = jax.lax.fori_loop(0, world.MAX_SLIMES, one, spos)
  adjacent = alive & (jnp.abs(spos - state.pos).sum(-1) == 1)
  health = jnp.maximum(state.health - world.SLIME_DAMAGE * adjacent.sum(), 0)
  return state.replace(slime_pos=spos, health=health.astype(jnp.int32), key=key)


def step(
  state: world.State, action: jax.Array
) -> tuple[world.State, jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
  """One action (int32[3], `actions`) in one environment (vmap for a batch).

  Returns:
    (state, obs uint8[OBS_LEN], reward float32, done bool, info {"success", "progress",
    "invalid" (the action changed nothing), "fainted"}). A finished episode's state is returned
    unchanged, with reward 0, done True and invalid False.
  """
  action = jnp.asarray(action, jnp.int32)
  kind, a, b = action[0], action[1], action[2]
  branch = jnp.clip(kind, 0, len(_HANDLERS) - 1)
  acted, valid, minutes = jax.lax.switch(branch, _HANDLERS, state, a, b, kind)
  valid = valid & (kind >= 0) & (kind < len(_HANDLERS))
  new = _tree_where(valid, acted, state)
  new = new.replace(time=new.time + jnp.where(valid, minutes, 0))
  new = _tree_where(new.time >= world.DAY_END, sleep(new), new)
  new = _slimes(new)
  c = new.counters
  visited = c.visited | jnp.asarray(world.REGION_MASKS)[:, new.pos[1], new.pos[0]]
  new = new.replace(counters=c.replace(visited=visited), steps=new.steps + 1)
  met = tasks.success(new)
  new = new.replace(
    progress=tasks.progress(new),
    fainted=new.health <= 0,
  )
  new = new.replace(done=met | new.fainted | (new.steps >= new.task.max_steps))
  reward = new.progress - state.progress

  frozen = state.done
  new = _tree_where(frozen, state, new)
  reward = jnp.where(frozen, 0.0, reward).astype(jnp.float32)
  info = {
    "success": jnp.where(frozen, tasks.success(state), met),
    "progress": new.progress,
    "invalid": ~valid & ~frozen,
    "fainted": new.fainted,
  }
  return new, render.text(new), reward, new.done, info
