"""Tasks: the shipped table, validation of bad task files, evaluators at their thresholds; and the
scripted planner solving every task."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.platform.agents.envs import farm, planner, tasks, world
from fulcrum.platform.errors import UserError

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.


@pytest.fixture(scope="module")
def shipped() -> list[tasks.Task]:
  return tasks.load()


def test_shipped_tasks(shipped):
  assert len(shipped) >= 40
  assert len({t.id for t in shipped}) == len(shipped)
  cells = {(t.domain, t.difficulty) for t in shipped}
  assert cells == {(d, k) for d in tasks.DOMAINS for k in tasks.DIFFICULTIES}
  for domain in tasks.DOMAINS:
    assert sum(t.domain == domain for t in shipped) >= 6, domain
  lite = tasks.select(shipped, "lite")
  assert 10 <= len(lite) <= 20 and {t.domain for t in lite} == set(tasks.DOMAINS)
  assert tasks.select(shipped, "all") == shipped
  for t in shipped:
    text = tasks.describe(t)
    assert 0 < len(text) <= tasks.DESC_LEN and text.endswith(".")
    desc = bytes(tasks.to_arrays(t).description).decode()
    assert desc == text.ljust(tasks.DESC_LEN)


def test_describe_and_select(shipped):
  by_id = {t.id: t for t in shipped}
  assert tasks.describe(by_id["farming_harvest_3_parsnips_easy"]) == "Harvest 3 parsnips."
  assert tasks.describe(by_id["crafting_chest_hard"]) == "Craft a chest."
  assert tasks.describe(by_id["combat_defeat_2_slimes"]) == "Defeat 2 slimes."
  assert tasks.describe(by_id["exploration_reach_lake"]) == "Find and reach the lake."
  picked = tasks.select(shipped, ["social_talk_all_3", "crafting_torch"])
  assert [t.id for t in picked] == ["social_talk_all_3", "crafting_torch"]
  with pytest.raises(UserError, match="unknown task id 'nope'.*farming_till_3"):
    tasks.select(shipped, ["crafting_torch", "nope"])
  batch = tasks.stack(shipped[:3])
  assert batch.items.shape == (3, world.N_INIT_ITEMS, 2) and batch.description.shape[0] == 3


GOOD = {
  "id": "my_task", "domain": "farming", "object": "tilled", "quantity": 3, "tool": "hoe",
  "init": {}, "evaluator": "tiles_at_least", "difficulty": "easy", "max_steps": 30, "lite": False,
}  # fmt: skip


@pytest.mark.parametrize(
  "change, message",
  [
    ({"evaluator": "grow_beans"}, "unknown evaluator 'grow_beans'; use one of inventory_at_least"),
    ({"domain": "fishing"}, "unknown domain 'fishing'"),
    ({"object": "beans"}, "unknown object for tiles_at_least 'beans'"),
    ({"difficulty": "extreme"}, "unknown difficulty"),
    ({"tool": "shovel"}, "unknown tool 'shovel'"),
    ({"quantity": 0}, "quantity must be an integer"),
    ({"init": {"items": {"gold": 1}}}, "unknown init item 'gold'"),
    ({"init": {"items": {"hoe": 1}}}, "is a tool"),
    ({"init": {"seeds": 1}}, "unknown init key 'seeds'"),
    ({"colour": "red"}, "unknown key 'colour'"),
    (
      {"evaluator": "reach", "object": "lake", "quantity": 2},
      "quantity must be an integer in 1..1",
    ),
  ],
)
def test_bad_task_is_a_user_error_naming_the_task(tmp_path, change, message):
  path = tmp_path / "tasks.json"
  path.write_text(json.dumps([GOOD, {**GOOD, "id": "bad_one", **change}]))
  with pytest.raises(UserError, match="bad_one") as e:
    tasks.load(path)
  assert message in str(e.value)


def test_bad_task_files(tmp_path):
  path = tmp_path / "tasks.json"
  missing = {k: v for k, v in GOOD.items() if k != "evaluator"}
  path.write_text(json.dumps([missing]))
  with pytest.raises(UserError, match="task 'my_task'.*missing key 'evaluator'"):
    tasks.load(path)
  path.write_text(json.dumps([GOOD, GOOD]))
  with pytest.raises(UserError, match="task 'my_task'.*used twice"):
    tasks.load(path)
  path.write_text("[{")
  with pytest.raises(UserError, match="not valid JSON"):
    tasks.load(path)
  with pytest.raises(UserError, match="does not exist"):
    tasks.load(tmp_path / "none.json")


# ---------------------------------------------------------------- evaluators at the threshold


def _tiles(f, v, watered=0, crop=0, stage=0, dry=0):
  """v + dry tiles of row 3 tilled, the first `watered` watered, all planted with `crop`."""
  n = v + dry
  f["terrain"][3, :n] = world.TILLED
  f["watered"][3, :watered] = True
  f["crop"][3, :n] = crop
  f["stage"][3, :n] = stage


def _item(name):
  """A setter of slot 6 to `value` of item `name`."""

  def setter(f, c, v):
    f["inv_item"][6], f["inv_count"][6] = (world.ITEM[name], v) if v else (0, 0)

  return setter


def _friendship(villager):
  return lambda f, c, v: f["friendship"].__setitem__(villager, v)


def _set(key, index=None):
  """A setter of counter `key` (at `index`) to the value."""

  def setter(f, c, v):
    if index is None:
      c[key] = np.asarray(v, c[key].dtype)
    else:
      c[key][index] = v

  return setter


def _first(key):
  """A setter of the first `value` flags of counter `key` (villagers talked to, regions seen)."""
  return lambda f, c, v: c[key].__setitem__(slice(None), np.arange(c[key].size) < v)


# case -> (evaluator, object, quantity, setter(state fields, counter fields, value))
SETTERS = {
  "inventory_wood": ("inventory_at_least", "wood", 5, _item("wood")),
  "inventory_parsnip": ("inventory_at_least", "parsnip", 2, _item("parsnip")),
  "harvested": ("harvested_at_least", "potato", 2, _set("harvested", 2)),
  "crafted": ("crafted_at_least", "fence", 3, _set("crafted", 1)),
  "tilled": ("tiles_at_least", "tilled", 5, lambda f, c, v: _tiles(f, v)),
  "watered": ("tiles_at_least", "watered", 4, lambda f, c, v: _tiles(f, v, v, dry=2)),
  "planted": ("tiles_at_least", "planted", 4, lambda f, c, v: _tiles(f, v, crop=1)),
  "watered_crop": ("tiles_at_least", "watered_crop", 3, lambda f, c, v: _tiles(f, v, v, 1, dry=1)),
  "mature": ("tiles_at_least", "mature", 2, lambda f, c, v: _tiles(f, v, crop=1, stage=2)),
  "reach_lake": ("reach", "lake", 1, _set("visited", world.REGION_NAMES.index("lake"))),
  "reach_robin": ("reach", "robin", 1, _set("visited", world.REGION_NAMES.index("robin"))),
  "kills": ("kills_at_least", "slime", 2, _set("kills")),
  "friendship": ("friendship_at_least", "pierre", 3, _friendship(1)),
  "gift_liked": ("gift_liked", "robin", 1, _set("gifted_liked", 2)),
  "gift_liked_any": ("gift_liked", "any", 1, _set("gifted_liked", 0)),
  "talked": ("talked_at_least", "villager", 3, _first("talked")),
  "visited": ("visited_at_least", "region", 5, _first("visited")),
}  # fmt: skip


@pytest.fixture(scope="module")
def judge():
  return jax.jit(lambda s: (tasks.success(s), tasks.progress(s)))


def _with(state, case, value):
  _, _, _, setter = SETTERS[case]
  host = jax.device_get(state)
  f = {k: np.array(v) for k, v in vars(host).items() if k not in ("counters", "task")}
  c = {k: np.array(v) for k, v in vars(host.counters).items()}
  setter(f, c, value)
  return state.replace(**f, counters=state.counters.replace(**c))


@pytest.mark.parametrize("case", sorted(SETTERS))
def test_evaluator_true_exactly_at_the_threshold(case, judge):
  evaluator, obj, quantity, _ = SETTERS[case]
  task = tasks.parse({**GOOD, "evaluator": evaluator, "object": obj, "quantity": quantity})
  state, _ = jax.jit(farm.reset)(jax.random.PRNGKey(0), tasks.to_arrays(task))
  state = state.replace(objects=jnp.zeros_like(state.objects))
  for value in sorted({0, quantity - 1, quantity}):
    met, progress = judge(_with(state, case, value))
    assert bool(met) == (value >= quantity), (case, value)
    assert float(progress) == pytest.approx(value / quantity), (case, value)


# ---------------------------------------------------------------- the planner


@pytest.mark.parametrize("seed", [0, 1])
def test_planner_solves_every_task(shipped, seed):
  for task in shipped:
    result = planner.run_episode(task, seed)
    assert result["success"], (task.id, seed, result["actions"])
    assert result["steps"] <= task.max_steps, task.id
    progress = np.array(result["progress"])
    assert ((progress >= 0) & (progress <= 1)).all(), task.id
    assert (np.diff(progress) >= 0).all(), (task.id, progress)  # monotone along the episode
    assert progress[-1] == 1.0
    start = float(result["final_state"].progress) - result["reward"]  # rewards telescope
    assert 0.0 <= start < 1.0, task.id
    assert all(isinstance(a, str) for a in result["actions"])


def test_run_episode_with_another_policy(shipped):
  task = tasks.select(shipped, ["farming_till_3"])[0]
  result = planner.run_episode(task, 0, policy=lambda s, t: np.array([6, 0, 0], np.int32))
  assert not result["success"] and result["steps"] == task.max_steps
  assert set(result["actions"]) == {"sleep()"} and result["reward"] == 0.0
