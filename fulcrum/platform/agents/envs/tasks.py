"""Tasks as data (StarDojo's schema), their array form, and their evaluators.

A task file is a JSON list of objects with exactly these keys (StarDojo's, plus two):

  id          unique name, e.g. "farming_harvest_parsnip_easy"
  domain      one of DOMAINS
  object      what the evaluator counts (an item, crop, recipe, tile kind, region, villager...)
  quantity    how many (1 for `reach` and `gift_liked`)
  tool        the tool the task mainly needs (a `world.TOOLS` name) or null
  init        what the episode starts with: {"items": {name: count}, "crops": {"crop", "stage",
              "count", "watered"} (planted on the crop plot), "slimes": 0..4, "energy",
              "health", "water"}; every key optional
  evaluator   one of EVALUATORS: a pure predicate on the state, with a progress in [0, 1]
  difficulty  one of DIFFICULTIES
  max_steps   the episode's step limit
  lite        in the Lite set (a small set that covers every domain)

Every evaluator measures one integer `value` of the state; the task is met when value >=
quantity, and its progress is min(value, quantity) / quantity.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents.envs import world
from fulcrum.platform.errors import UserError

TASKS_JSON = Path(__file__).with_name("tasks.json")
DOMAINS = ("farming", "crafting", "exploration", "combat", "social")
DIFFICULTIES = ("easy", "medium", "hard")
KEYS = (
  "id", "domain", "object", "quantity", "tool", "init", "evaluator", "difficulty", "max_steps",
  "lite",
)  # fmt: skip
INIT_KEYS = ("items", "crops", "slimes", "energy", "health", "water")
CROP_INIT_KEYS = ("crop", "stage", "count", "watered")
TILE_KINDS = ("tilled", "watered", "planted", "watered_crop", "mature")
DESC_LEN = 38  # bytes of the task's description in TaskArrays (the text render's first line)
DEFAULT_SLIMES = 2

# Evaluator -> the names its `object` may take; the object's id is its index in this tuple.
# Index 0 of the item and crop tables is "none", which no task may name.
EVALUATORS: dict[str, tuple[str, ...]] = {
  "inventory_at_least": world.ITEM_NAMES,
  "harvested_at_least": world.CROP_NAMES,
  "crafted_at_least": world.RECIPE_NAMES,
  "tiles_at_least": TILE_KINDS,
  "reach": world.REGION_NAMES,
  "kills_at_least": ("slime",),
  "friendship_at_least": world.VILLAGER_NAMES,
  "gift_liked": (*world.VILLAGER_NAMES, "any"),
  "talked_at_least": ("villager",),
  "visited_at_least": ("region",),
}
EVALUATOR_NAMES = tuple(EVALUATORS)
BINARY = ("reach", "gift_liked")  # quantity must be 1


@dataclasses.dataclass(frozen=True)
class CropInit:
  crop: str
  stage: int = 0
  count: int = 1
  watered: bool = False


@dataclasses.dataclass(frozen=True)
class TaskInit:
  items: tuple[tuple[str, int], ...] = ()
  crops: CropInit | None = None
  slimes: int = DEFAULT_SLIMES
  energy: int = world.ENERGY_MAX
  health: int = world.HEALTH_MAX
  water: int = world.START_WATER


@dataclasses.dataclass(frozen=True)
class Task:
  """One task, validated (see the module docstring for the fields)."""

  id: str
  domain: str
  object: str
  quantity: int
  tool: str | None
  init: TaskInit
  evaluator: str
  difficulty: str
  max_steps: int
  lite: bool


class TaskArrays(NamedTuple):
  """A task as arrays (`stack` gives a batch of them for vmap)."""

  evaluator: Any  # int32  EVALUATOR_NAMES index
  target: Any  # int32  the object's id in EVALUATORS[evaluator]
  quantity: Any  # int32
  max_steps: Any  # int32
  domain: Any  # int32  DOMAINS index
  difficulty: Any  # int32  DIFFICULTIES index
  items: Any  # int32[N_INIT_ITEMS, 2]  (item id, count) added after the tools; 0 rows unused
  crop: Any  # int32  crop id planted on the crop plot (0: none)
  crop_stage: Any  # int32
  crop_count: Any  # int32  tiles of the plot planted
  crop_watered: Any  # bool
  slimes: Any  # int32  slimes in the mine
  energy: Any  # int32
  health: Any  # int32
  water: Any  # int32  watering-can level
  description: Any  # uint8[DESC_LEN]  describe(task), space-padded


# ---------------------------------------------------------------- loading and validation


def _fail(task_id: Any, where: str, problem: str) -> UserError:
  return UserError(f"task {task_id!r} in {where}: {problem}")


def _int(value: Any, lo: int, hi: int, what: str, task_id: Any, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise _fail(task_id, where, f"{what} must be an integer in {lo}..{hi}, got {value!r}")
  return value


def _choice(value: Any, options: Sequence[str], what: str, task_id: Any, where: str) -> str:
  if value not in options:
    raise _fail(task_id, where, f"unknown {what} {value!r}; use one of {', '.join(options)}")
  return value


def _parse_init(raw: Any, tid: Any, where: str) -> TaskInit:
  if not isinstance(raw, dict):
    raise _fail(tid, where, f"init must be an object with keys among {', '.join(INIT_KEYS)}")
  unknown = sorted(set(raw) - set(INIT_KEYS))
  if unknown:
    raise _fail(tid, where, f"unknown init key {unknown[0]!r}; use {', '.join(INIT_KEYS)}")
  items = raw.get("items", {})
  if not isinstance(items, dict) or len(items) > world.N_INIT_ITEMS:
    raise _fail(tid, where, f"init.items must map at most {world.N_INIT_ITEMS} items to counts")
  parsed = []
  for name, count in items.items():
    _choice(name, world.ITEM_NAMES[1:], "init item", tid, where)
    if name in world.TOOLS:
      raise _fail(tid, where, f"init item {name!r} is a tool; every episode starts with the tools")
    parsed.append((name, _int(count, 1, world.STACK_MAX, f"init.items.{name}", tid, where)))
  crops = raw.get("crops")
  if crops is not None:
    if not isinstance(crops, dict) or "crop" not in crops or set(crops) - set(CROP_INIT_KEYS):
      raise _fail(tid, where, f"init.crops must be an object with keys {', '.join(CROP_INIT_KEYS)}")
    kind = _choice(crops["crop"], world.CROP_NAMES[1:], "init crop", tid, where)
    days = int(world.CROP_DAYS[world.CROP_NAMES.index(kind)])
    watered = crops.get("watered", False)
    if not isinstance(watered, bool):
      raise _fail(tid, where, f"init.crops.watered must be true or false, got {watered!r}")
    crops = CropInit(
      kind,
      _int(crops.get("stage", 0), 0, days, "init.crops.stage", tid, where),
      _int(crops.get("count", 1), 1, len(world.CROP_PLOT), "init.crops.count", tid, where),
      watered,
    )
  return TaskInit(
    tuple(parsed),
    crops,
    _int(raw.get("slimes", DEFAULT_SLIMES), 0, world.MAX_SLIMES, "init.slimes", tid, where),
    _int(raw.get("energy", world.ENERGY_MAX), 0, world.ENERGY_MAX, "init.energy", tid, where),
    _int(raw.get("health", world.HEALTH_MAX), 1, world.HEALTH_MAX, "init.health", tid, where),
    _int(raw.get("water", world.START_WATER), 0, world.WATER_MAX, "init.water", tid, where),
  )


def parse(raw: Any, where: str = "<task>") -> Task:
  """One task from its JSON object, validated (UserError naming the task and the fix)."""
  tid = raw.get("id") if isinstance(raw, dict) else None
  if not isinstance(raw, dict):
    raise _fail(tid, where, "each task must be a JSON object")
  missing = [k for k in KEYS if k not in raw]
  if missing:
    raise _fail(tid, where, f"missing key {missing[0]!r}; every task has {', '.join(KEYS)}")
  unknown = sorted(set(raw) - set(KEYS))
  if unknown:
    raise _fail(tid, where, f"unknown key {unknown[0]!r}; a task has exactly {', '.join(KEYS)}")
  if not isinstance(tid, str) or not tid:
    raise _fail(tid, where, "id must be a non-empty string")
  evaluator = _choice(raw["evaluator"], EVALUATOR_NAMES, "evaluator", tid, where)
  names = EVALUATORS[evaluator]
  allowed = [n for n in names if n != "none"]
  obj = _choice(raw["object"], allowed, f"object for {evaluator}", tid, where)
  hi = 1 if evaluator in BINARY else world.STACK_MAX
  quantity = _int(raw["quantity"], 1, hi, "quantity", tid, where)
  tool = raw["tool"]
  if tool is not None:
    _choice(tool, world.TOOLS, "tool", tid, where)
  if not isinstance(raw["lite"], bool):
    raise _fail(tid, where, f"lite must be true or false, got {raw['lite']!r}")
  task = Task(
    id=tid,
    domain=_choice(raw["domain"], DOMAINS, "domain", tid, where),
    object=obj,
    quantity=quantity,
    tool=tool,
    init=_parse_init(raw["init"], tid, where),
    evaluator=evaluator,
    difficulty=_choice(raw["difficulty"], DIFFICULTIES, "difficulty", tid, where),
    max_steps=_int(raw["max_steps"], 1, 100_000, "max_steps", tid, where),
    lite=raw["lite"],
  )
  if len(describe(task)) > DESC_LEN:
    raise _fail(tid, where, f"its description {describe(task)!r} is over {DESC_LEN} bytes")
  return task


def load(path: str | Path | None = None) -> list[Task]:
  """The tasks of a JSON file (the shipped tasks.json by default), every field validated."""
  path = Path(path) if path is not None else TASKS_JSON
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise UserError(f"task file {path} does not exist; pass a JSON list of tasks") from e
  except json.JSONDecodeError as e:
    raise UserError(f"task file {path} is not valid JSON ({e}); fix the file") from e
  if not isinstance(raw, list) or not raw:
    raise UserError(f"task file {path} must hold a non-empty JSON list of task objects")
  tasks = [parse(t, str(path)) for t in raw]
  seen: set[str] = set()
  for t in tasks:
    if t.id in seen:
      raise _fail(t.id, str(path), "the id is used twice; give each task its own id")
    seen.add(t.id)
  return tasks


def select(tasks: Sequence[Task], spec: str | Sequence[str]) -> list[Task]:
  """The tasks "all", "lite", one id or a list of ids name (UserError on an unknown id)."""
  if spec == "all":
    return list(tasks)
  if spec == "lite":
    return [t for t in tasks if t.lite]
  ids = [spec] if isinstance(spec, str) else list(spec)
  by_id = {t.id: t for t in tasks}
  for i in ids:
    if i not in by_id:
      some = ", ".join(list(by_id)[:5])
      raise UserError(f"unknown task id {i!r}; use 'all', 'lite' or ids such as {some}")
  return [by_id[i] for i in ids]


# ---------------------------------------------------------------- words and arrays


def _plural(name: str, n: int) -> str:
  words = name.replace("_", " ")
  if n == 1 or name in ("wood", "stone", "fiber") or words.endswith("seeds"):
    return words
  if words.endswith(("o", "ch", "sh")):
    return words + "es"
  return words + "s"


def describe(task: Task) -> str:
  """The task in words, e.g. "Harvest 3 parsnips."."""
  q, obj = task.quantity, task.object
  e = task.evaluator
  if e == "inventory_at_least":
    return f"Collect {q} {_plural(obj, q)}."
  if e == "harvested_at_least":
    return f"Harvest {q} {_plural(obj, q)}."
  if e == "crafted_at_least":
    return f"Craft {'a' if q == 1 else q} {_plural(obj, q)}."
  if e == "tiles_at_least":
    return {
      "tilled": f"Till {q} {_plural('tile', q)}.",
      "watered": f"Water {q} tilled {_plural('tile', q)}.",
      "planted": f"Plant {q} {_plural('seed', q)}.",
      "watered_crop": f"Water {q} {_plural('crop', q)}.",
      "mature": f"Grow {q} mature {_plural('crop', q)}.",
    }[obj]
  if e == "reach":
    if obj in world.VILLAGER_NAMES:
      return f"Walk up to {obj}."
    return {"mine": "Enter the mine.", "mine_depths": "Reach the bottom of the mine."}.get(
      obj, f"Find and reach the {obj}."
    )
  if e == "kills_at_least":
    return f"Defeat {q} {_plural('slime', q)}."
  if e == "friendship_at_least":
    return f"Reach friendship {q} with {obj}."
  if e == "gift_liked":
    return "Give a villager a gift they like." if obj == "any" else f"Give {obj} a gift they like."
  if e == "talked_at_least":
    return f"Talk to {q} {_plural('villager', q)}."
  return f"Visit {q} different places."


def to_arrays(task: Task) -> TaskArrays:
  """The task's array form (numpy; jax converts it)."""
  i32 = lambda v: np.asarray(v, np.int32)
  items = np.zeros((world.N_INIT_ITEMS, 2), np.int32)
  for row, (name, count) in enumerate(task.init.items):
    items[row] = (world.ITEM[name], count)
  crops = task.init.crops
  desc = np.full(DESC_LEN, ord(" "), np.uint8)
  text = describe(task).encode()
  desc[: len(text)] = np.frombuffer(text, np.uint8)
  return TaskArrays(
    evaluator=i32(EVALUATOR_NAMES.index(task.evaluator)),
    target=i32(EVALUATORS[task.evaluator].index(task.object)),
    quantity=i32(task.quantity),
    max_steps=i32(task.max_steps),
    domain=i32(DOMAINS.index(task.domain)),
    difficulty=i32(DIFFICULTIES.index(task.difficulty)),
    items=items,
    crop=i32(world.CROP_NAMES.index(crops.crop) if crops else 0),
    crop_stage=i32(crops.stage if crops else 0),
    crop_count=i32(crops.count if crops else 0),
    crop_watered=np.asarray(bool(crops and crops.watered)),
    slimes=i32(task.init.slimes),
    energy=i32(task.init.energy),
    health=i32(task.init.health),
    water=i32(task.init.water),
    description=desc,
  )


def stack(tasks: Sequence[Task | TaskArrays]) -> TaskArrays:
  """A batch of tasks (leading axis) for vmapped reset."""
  arrays = [to_arrays(t) if isinstance(t, Task) else t for t in tasks]
  return TaskArrays(
    *(np.stack([np.asarray(f) for f in fields]) for fields in zip(*arrays, strict=True))
  )


# ---------------------------------------------------------------- evaluators (pure JAX)


def tile_counts(state: world.State) -> jax.Array:
  """int32[TILE_KINDS]: tilled, watered, planted, watered-crop and mature-crop tile counts."""
  tilled = state.terrain == world.TILLED
  planted = state.crop > 0
  mature = planted & (state.stage >= jnp.asarray(world.CROP_DAYS)[state.crop])
  masks = (tilled, tilled & state.watered, planted, planted & state.watered, mature)
  return jnp.stack([m.sum(dtype=jnp.int32) for m in masks])


def measure(state: world.State) -> jax.Array:
  """int32: the value the state's task evaluator counts (met when >= the task's quantity)."""
  c, t = state.counters, state.task.target
  owned = jnp.where(state.inv_item == t, state.inv_count, 0).sum()
  values = jnp.stack(
    [
      owned,  # inventory_at_least
      c.harvested[t],  # harvested_at_least
      c.crafted[t],  # crafted_at_least
      tile_counts(state)[t],  # tiles_at_least
      c.visited[t].astype(jnp.int32),  # reach
      c.kills,  # kills_at_least
      state.friendship[t],  # friendship_at_least
      jnp.append(c.gifted_liked, c.gifted_liked.any())[t].astype(jnp.int32),  # gift_liked
      c.talked.sum(dtype=jnp.int32),  # talked_at_least
      c.visited.sum(dtype=jnp.int32),  # visited_at_least
    ]
  ).astype(jnp.int32)
  return values[state.task.evaluator]


def success(state: world.State) -> jax.Array:
  """bool: the task is met."""
  return measure(state) >= state.task.quantity


def progress(state: world.State) -> jax.Array:
  """float32 in [0, 1]: min(value, quantity) / quantity (1 exactly when the task is met)."""
  q = jnp.maximum(state.task.quantity, 1)
  return jnp.minimum(measure(state), q).astype(jnp.float32) / q.astype(jnp.float32)
