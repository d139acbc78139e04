"""Craftax-Classic (Matthews et al. 2024: Crafter's world and its 22 achievements in JAX, pip
`craftax`) through the environment protocol the farming world follows.

  reset(key, task=None) -> (state, obs float32[OBS_SIZE])
  step(state, action)   -> (state, obs, reward, done, info)   a finished episode stays finished
  auto_reset_batch(states, actions, pool)                      a batch; finished episodes restart
                                                               from a pool of fresh worlds (PPO)

The observation is Craftax's symbolic one (a 7×9 local view as one-hot blocks and mobs, the
inventory, health/food/drink/energy, direction, light); actions are its 17 (`ACTIONS`). `info`
carries `achievements` (bool[22], `ACHIEVEMENTS` order: those unlocked this episode so far),
`episode_return` and `episode_length` (of the episode this step ended, when `done`).

craftax is imported on first use: its constants are jnp arrays, and importing fulcrum must not
start a JAX backend.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

ACTIONS = (
  "noop", "left", "right", "up", "down", "do", "sleep", "place_stone", "place_table",
  "place_furnace", "place_plant", "make_wood_pickaxe", "make_stone_pickaxe",
  "make_iron_pickaxe", "make_wood_sword", "make_stone_sword", "make_iron_sword",
)  # fmt: skip
ACHIEVEMENTS = (
  "collect_wood", "place_table", "eat_cow", "collect_sapling", "collect_drink",
  "make_wood_pickaxe", "make_wood_sword", "place_plant", "defeat_zombie", "collect_stone",
  "place_stone", "eat_plant", "defeat_skeleton", "make_stone_pickaxe", "make_stone_sword",
  "wake_up", "place_furnace", "collect_coal", "collect_iron", "collect_diamond",
  "make_iron_pickaxe", "make_iron_sword",
)  # fmt: skip
OBS_SIZE = 1345


class CraftaxState(NamedTuple):
  """The Craftax state with what the protocol adds: the PRNG key of its next step, whether the
  episode is over, and the episode's return and length so far."""

  env: Any
  key: Array
  done: Array
  episode_return: Array
  episode_length: Array


@functools.cache
def _env():
  """(environment, params) of Craftax-Classic, symbolic observations, no automatic reset."""
  try:  # Its module-level jnp constants must be arrays even when first imported while tracing.
    with jax.ensure_compile_time_eval():
      from craftax.craftax_classic.constants import Achievement, Action
      from craftax.craftax_classic.envs.craftax_symbolic_env import (
        CraftaxClassicSymbolicEnvNoAutoReset,
      )
  except ImportError as e:  # pragma: no cover - craftax is a dependency.
    raise ImportError(
      f"Craftax-Classic needs the craftax package (pip install craftax): {e}"
    ) from e
  if tuple(a.name.lower() for a in Action) != ACTIONS:
    raise ImportError("this craftax version's actions differ from the adapter's")
  if tuple(a.name.lower() for a in Achievement) != ACHIEVEMENTS:
    raise ImportError("this craftax version's achievements differ from the adapter's")
  env = CraftaxClassicSymbolicEnvNoAutoReset()
  return env, env.default_params


def reset(key: Array, task: Any = None) -> tuple[CraftaxState, Array]:
  """A new world from `key` (Craftax has no tasks: `task` is ignored)."""
  del task
  env, params = _env()
  key, sub = jax.random.split(key)
  obs, state = env.reset_env(sub, params)
  # Strong types throughout (Craftax leaves a weakly typed field): a state after `step` has the
  # same types, so a compiled loop is not traced again for its second call.
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), state)
  zero = jnp.zeros((), jnp.float32)
  return CraftaxState(state, key, jnp.zeros((), bool), zero, jnp.zeros((), jnp.int32)), obs


def _advance(state: CraftaxState, action: Array):
  env, params = _env()
  key, sub = jax.random.split(state.key)
  obs, new, reward, done, _ = env.step_env(sub, state.env, action, params)
  reward = jnp.asarray(reward, jnp.float32)
  ret, length = state.episode_return + reward, state.episode_length + 1
  info = {
    "achievements": new.achievements.astype(bool),
    "episode_return": ret,
    "episode_length": length,
  }
  return CraftaxState(new, key, jnp.asarray(done, bool), ret, length), obs, reward, info


def step(state: CraftaxState, action: Array):
  """One step; a finished episode is left unchanged (reward 0, done stays true)."""
  new, obs, reward, info = _advance(state, action)
  over = state.done
  pick = lambda old, fresh: jnp.where(over, old, fresh)  # noqa: E731
  before = {
    "achievements": state.env.achievements.astype(bool),
    "episode_return": state.episode_return,
    "episode_length": state.episode_length,
  }
  env, _ = _env()
  new = jax.tree.map(pick, state, new)
  return (
    new,
    pick(env.get_obs(state.env), obs),
    pick(0.0, reward),
    new.done,
    jax.tree.map(pick, before, info),
  )


class WorldPool(NamedTuple):
  """Fresh worlds that ended episodes restart from (`auto_reset_batch`)."""

  worlds: CraftaxState  # [size] reset states.
  obs: Array  # [size, OBS_SIZE] their observations.
  key: Array
  step: Array  # Batch steps taken: one world is regenerated every `refresh_every`.


def world_pool(key: Array, size: int) -> WorldPool:
  """`size` freshly generated worlds."""
  key, sub = jax.random.split(key)
  worlds, obs = jax.vmap(reset)(jax.random.split(sub, size))
  return WorldPool(worlds, obs, key, jnp.zeros((), jnp.int32))


def auto_reset_batch(state: CraftaxState, action: Array, pool: WorldPool, refresh_every: int = 8):
  """One step of a batch of episodes ([n] states and actions); the episodes it ends restart at
  once from a world drawn from `pool` (`info` still describes the episodes that ended).

  Generating a world costs as much as ~40 batch steps, so restarts draw from a pool of fresh
  worlds (PureJaxRL's optimistic resets, with the pool renewed one world every `refresh_every`
  steps); each restarted episode keeps its own PRNG key, so two that start from the same world
  play differently. Returns (state, obs, reward, ended, info, pool).
  """
  new, obs, reward, info = jax.vmap(_advance)(state, action)
  ended = new.done
  key, draw, regen = jax.random.split(pool.key, 3)
  size = pool.obs.shape[0]
  slot = jax.random.randint(draw, ended.shape, 0, size)
  fresh = jax.tree.map(lambda x: x[slot], pool.worlds)._replace(key=new.key)

  def pick(a, b):
    return jnp.where(ended.reshape(ended.shape + (1,) * (a.ndim - 1)), a, b)

  new = jax.tree.map(pick, fresh, new)
  obs = pick(pool.obs[slot], obs)

  def renew(pool):
    world, world_obs = reset(regen)
    i = (pool.step // refresh_every) % size
    worlds = jax.tree.map(lambda all_, one: all_.at[i].set(one), pool.worlds, world)
    return pool._replace(worlds=worlds, obs=pool.obs.at[i].set(world_obs))

  pool = jax.lax.cond(pool.step % refresh_every == 0, renew, lambda p: p, pool)
  return new, obs, reward, ended, info, pool._replace(key=key, step=pool.step + 1)
