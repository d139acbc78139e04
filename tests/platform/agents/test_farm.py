"""The farming environment: invariants over random rollouts, crop growth, the day cycle,
jit(vmap(step)) = stepping one environment at a time, and finished episodes staying finished."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.platform.agents.envs import actions, farm, render, tasks, world

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.

B = 8  # the batch every vmapped test uses (one compiled program)
VOCAB = actions.encoded_vocabulary()


def _task(**fields) -> tasks.Task:
  raw = {
    "id": "test", "domain": "farming", "object": "parsnip", "quantity": 99, "tool": None,
    "init": {}, "evaluator": "harvested_at_least", "difficulty": "easy", "max_steps": 10_000,
    "lite": False,
  }  # fmt: skip
  raw.update(fields)
  return tasks.parse(raw)


RICH = _task(init={"items": {"wood": 40, "stone": 20, "fiber": 20, "parsnip_seeds": 9}})


@pytest.fixture(scope="module")
def env():
  return {
    "reset": jax.jit(farm.reset),
    "step": jax.jit(farm.step),
    "vreset": jax.jit(jax.vmap(farm.reset)),
    "vstep": jax.jit(jax.vmap(farm.step)),
  }


def _batch(task: tasks.Task, seed: int, env):
  keys = jax.random.split(jax.random.PRNGKey(seed), B)
  return env["vreset"](keys, tasks.stack([task] * B))


def _random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
  """[n, B, 3]: a kind drawn uniformly, then one of its actions (so crafting and sleeping are
  as common as walking)."""
  kinds = rng.integers(0, len(actions.KINDS), (n, B))
  out = np.empty((n, B, 3), np.int32)
  for kind in range(len(actions.KINDS)):
    rows = np.flatnonzero(VOCAB[:, 0] == kind)
    pick = VOCAB[rng.choice(rows, size=(n, B))]
    out[kinds == kind] = pick[kinds == kind]
  return out


def _owned(s) -> np.ndarray:
  """[B, item] counts from a host batch of states."""
  out = np.zeros((s.inv_item.shape[0], world.N_ITEMS), np.int64)
  for b in range(out.shape[0]):
    np.add.at(out[b], s.inv_item[b], s.inv_count[b])
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rollout_invariants(env, seed):
  rng = np.random.default_rng(seed)
  state, _ = _batch(RICH, seed, env)
  acts = _random_actions(rng, 250)
  crafted = 0
  for t in range(len(acts)):
    before = jax.device_get(state)
    state, obs, reward, done, info = env["vstep"](state, acts[t])
    s = jax.device_get(state)
    assert (s.energy >= 0).all() and (s.energy <= world.ENERGY_MAX).all()
    assert (s.health >= 0).all() and (s.health <= world.HEALTH_MAX).all()
    assert (s.water >= 0).all() and (s.water <= world.WATER_MAX).all()
    assert (s.inv_count >= 0).all() and (s.inv_count <= world.STACK_MAX).all()
    assert ((s.inv_count == 0) == (s.inv_item == 0)).all()
    assert ((s.time >= world.DAY_START) & (s.time < world.DAY_END)).all()
    assert (s.stage <= world.CROP_DAYS[s.crop]).all()
    assert obs.shape == (B, render.OBS_LEN) and obs.dtype == jnp.uint8
    invalid = np.asarray(info["invalid"])
    kind = acts[t, :, 0]
    have, had = _owned(s), _owned(before)
    for b in range(B):
      if before.done[b]:  # finished (fainted): frozen, checked in test_finished_episode_...
        continue
      if invalid[b]:  # a no-op: the player and the world are as they were
        for f in ("pos", "facing", "energy", "time", "day", "inv_item", "inv_count", "terrain",
                  "objects", "crop", "stage", "watered", "slot", "water"):  # fmt: skip
          np.testing.assert_array_equal(getattr(s, f)[b], getattr(before, f)[b], err_msg=f)
      elif kind[b] == actions.CRAFT:  # exactly the recipe's ingredients become its output
        r = acts[t, b, 1]
        want = had[b] - world.RECIPE_COST[r]
        want[world.RECIPE_OUTPUT[r]] += 1
        np.testing.assert_array_equal(have[b], want)
        assert s.counters.crafted[b, r] == before.counters.crafted[b, r] + 1
        crafted += 1
      elif kind[b] in (actions.MOVE, actions.MOVE_TO, actions.CHOOSE_ITEM, actions.SLEEP):
        np.testing.assert_array_equal(have[b], had[b])
  assert crafted > 0  # the conservation check ran


def test_energy_and_health_floor_at_zero(env):
  state, _ = env["reset"](jax.random.PRNGKey(0), tasks.to_arrays(RICH))
  tired = state.replace(energy=jnp.asarray(1, jnp.int32))
  s, _, _, _, info = env["step"](tired, actions.parse_action("use(up)"))  # the hoe needs 2
  assert bool(info["invalid"]) and int(s.energy) == 1
  # Two slimes beside the player hit 2 x 5 with 7 health left: health 0, not -3; the player faints.
  x, y = world.MINE_ENTRANCE
  hurt = state.replace(
    pos=jnp.asarray([x, y + 2], jnp.int32),
    health=jnp.asarray(7, jnp.int32),
    slime_pos=jnp.asarray([[x - 1, y + 2], [x + 1, y + 2], [0, 15], [1, 15]], jnp.int32),
    slime_hp=jnp.asarray([3, 3, 0, 0], jnp.int32),
  )
  s, _, _, done, info = env["step"](hurt, actions.parse_action("choose_item(1)"))
  assert int(s.health) == 0 and bool(done) and bool(info["fainted"])


def _clear(state):
  """No objects or slimes: a predictable map."""
  return state.replace(
    objects=jnp.zeros_like(state.objects), slime_hp=jnp.zeros_like(state.slime_hp)
  )


def _play(env, state, texts):
  infos = []
  for text in texts:
    state, _, _, _, info = env["step"](state, actions.parse_action(text))
    infos.append(info)
  return state, infos


def test_crop_grows_only_when_watered(env):
  task = _task(init={"items": {"parsnip_seeds": 3}, "crops": {"crop": "parsnip", "count": 2}})
  state, _ = env["reset"](jax.random.PRNGKey(3), tasks.to_arrays(task))
  state = _clear(state)
  # The plot's crops are at (1, 5) and (2, 5); (3, 5) is grass. Stand below it at (3, 6).
  state, infos = _play(env, state, ["move_to(3,6)", "use(up)", "choose_item(6)", "use(up)"])
  assert not any(bool(i["invalid"]) for i in infos)
  assert int(state.crop[5, 3]) == 1 and int(state.stage[5, 3]) == 0
  state, _ = _play(env, state, ["sleep()"])  # nothing watered: nothing grows
  np.testing.assert_array_equal(np.asarray(state.stage[5, 1:4]), [0, 0, 0])
  state, infos = _play(env, state, ["choose_item(1)", "use(up)", "move(-1,0)", "use(up)"])
  assert not any(bool(i["invalid"]) for i in infos)
  assert bool(state.watered[5, 3]) and bool(state.watered[5, 2]) and not bool(state.watered[5, 1])
  state, _ = _play(env, state, ["sleep()"])  # the two watered crops grow one stage
  np.testing.assert_array_equal(np.asarray(state.stage[5, 1:4]), [0, 1, 1])
  assert not np.asarray(state.watered).any()
  state, infos = _play(env, state, ["use(up)", "sleep()", "interact(up)"])
  assert int(state.stage[5, 2]) == 0 and int(state.crop[5, 2]) == 0  # harvested: tilled again
  assert int(state.counters.harvested[1]) == 1 and not bool(infos[-1]["invalid"])
  assert int(state.terrain[5, 2]) == world.TILLED


def test_day_cycle_and_forced_sleep(env):
  state, _ = env["reset"](jax.random.PRNGKey(0), tasks.to_arrays(RICH))
  state = _clear(state)
  state, infos = _play(env, state, ["use(down)"])  # till (2, 4): 2 energy
  assert not bool(infos[0]["invalid"]) and int(state.energy) == world.ENERGY_MAX - 2
  per_day = (world.DAY_END - world.DAY_START) // world.MINUTES_PER_ACTION  # 120 actions
  wait = actions.parse_action("choose_item(0)")
  for _ in range(per_day - 2):
    state, *_ = env["step"](state, wait)
  assert int(state.day) == 1 and int(state.time) == world.DAY_END - world.MINUTES_PER_ACTION
  state, *_ = env["step"](state, wait)  # 2:00: asleep where the player stands
  assert int(state.day) == 2 and int(state.time) == world.DAY_START
  assert int(state.energy) == world.ENERGY_MAX
  state, *_ = env["step"](state, actions.parse_action("move_to(2,9)"))
  assert int(state.time) == world.DAY_START + 6 * world.MINUTES_PER_ACTION  # 6 tiles walked
  state, *_ = env["step"](state, actions.parse_action("sleep()"))
  assert int(state.day) == 3 and int(state.time) == world.DAY_START


def test_move_rules(env):
  state, _ = env["reset"](jax.random.PRNGKey(0), tasks.to_arrays(RICH))
  state = _clear(state)  # the player is at (2, 3); the house fills x 1..3, y 0..1
  s, _, _, _, info = env["step"](state, actions.parse_action("move(0,-3)"))
  assert s.pos.tolist() == [2, 2] and int(s.facing) == 0 and not bool(info["invalid"])
  s, _, _, _, info = env["step"](s, actions.parse_action("move(0,-1)"))  # the house: 0 tiles
  assert bool(info["invalid"]) and s.pos.tolist() == [2, 2]
  s, _, _, _, info = env["step"](s, actions.parse_action("move(2,1)"))
  assert s.pos.tolist() == [4, 3] and int(s.facing) == 1
  s, _, _, _, info = env["step"](s, actions.parse_action("move_to(12,1)"))  # the lake: beside it
  assert not bool(info["invalid"]) and s.pos.tolist() == [11, 1] and int(s.facing) == 3
  s, _, _, _, info = env["step"](s, actions.parse_action("move_to(11,1)"))  # already there
  assert bool(info["invalid"])


def _equal_trees(a, b, what: str):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {path}")


def test_vmap_jit_equals_stepping_one_by_one(env):
  all_tasks = tasks.load()
  batch = tasks.stack([all_tasks[i * 5] for i in range(B)])
  keys = jax.random.split(jax.random.PRNGKey(7), B)
  state, obs = env["vreset"](keys, batch)
  acts = VOCAB[np.random.default_rng(0).integers(0, len(VOCAB), (40, B))]
  one = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(B)]
  for i in range(B):  # reset one by one
    s, o = env["reset"](keys[i], jax.tree.map(lambda x, i=i: x[i], batch))
    _equal_trees(s, one[i], "reset")
    np.testing.assert_array_equal(np.asarray(o), np.asarray(obs[i]))
  for t in range(len(acts)):
    state, obs, reward, done, info = env["vstep"](state, acts[t])
    batched = jax.tree.map(np.asarray, (state, obs, reward, done, info))  # Sliced on the host.
    for i in range(B):
      eager = t < 3 and i < 3  # un-jitted for the first steps of a few environments
      step = farm.step if eager else env["step"]
      one[i], o, r, d, inf = step(one[i], acts[t, i])
      got = jax.tree.map(lambda x, i=i: x[i], batched)
      _equal_trees((one[i], o, r, d, inf), got, f"step {t} env {i}")


def test_finished_episode_stays_unchanged(env):
  short = _task(max_steps=3)
  state, _ = env["reset"](jax.random.PRNGKey(0), tasks.to_arrays(short))
  for _ in range(3):
    state, _, _, done, _ = env["step"](state, actions.parse_action("choose_item(2)"))
  assert bool(done) and int(state.steps) == 3
  for text in ("sleep()", "move(1,0)", "move_to(12,12)"):
    after, _, reward, done, info = env["step"](state, actions.parse_action(text))
    _equal_trees(after, state, text)
    assert float(reward) == 0.0 and bool(done) and not bool(info["invalid"])
  # Success ends an episode too, with the reward that completes the progress.
  house = _task(evaluator="reach", object="house", quantity=1)
  state, _ = env["reset"](jax.random.PRNGKey(0), tasks.to_arrays(house))
  state = _clear(state)  # (2, 2), beside the house, may hold a weed
  state, _, reward, done, info = env["step"](state, actions.parse_action("move(0,-1)"))
  assert bool(done) and bool(info["success"]) and float(reward) == 1.0


def test_every_action_is_accepted_by_step(env):
  state, _ = _batch(RICH, 0, env)
  n = len(VOCAB)
  padded = np.concatenate([VOCAB, VOCAB[: (-n) % B]])
  invalid = []
  for chunk in padded.reshape(-1, B, 3):
    s, obs, reward, done, info = env["vstep"](state, chunk)
    assert np.isfinite(np.asarray(reward)).all()
    for row in np.asarray(obs):
      bytes(row).decode("ascii")
    invalid += list(np.asarray(info["invalid"]))
  # Many actions are valid from the start (moves, choices, crafts, sleep); interacting with
  # nothing is not.
  assert 0 < sum(invalid[:n]) < n
