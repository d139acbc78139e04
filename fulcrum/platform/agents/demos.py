"""Demonstrations: the scripted planner's episodes, and the masked next-token rows behaviour
cloning trains on (each turn's context as the prompt, the planner's action as the response).

A turn's context is exactly what the agent reads in a rollout (`rollout.Interface.context`): the
last actions, the observation and the prompt mark, so a cloned policy sees in evaluation what it
was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents import envs
from fulcrum.platform.agents.envs import actions as actions_lib
from fulcrum.platform.agents.envs import planner
from fulcrum.platform.agents.rollout import SPACE, Interface
from fulcrum.platform.data.instruct_pipeline import masked_row
from fulcrum.platform.files import write_atomic

log = logging.getLogger("fulcrum")


@dataclasses.dataclass
class Episode:
  """One planner episode: what the agent saw and what the planner did at each turn."""

  task: str
  seed: int
  obs: np.ndarray  # [T, obs_len] uint8: the observation before each action.
  actions: np.ndarray  # [T] int32: vocabulary index of each action.
  success: bool


@functools.cache
def _env_fns():
  return jax.jit(envs.reset), jax.jit(envs.step)


def planner_episode(task: envs.Task, seed: int) -> Episode:
  """Plays `task` from `PRNGKey(seed)` with the planner, recording observations and actions."""
  reset, step = _env_fns()
  state, obs = reset(jax.random.PRNGKey(seed), envs.to_arrays(task))
  seen, chosen, done, info = [], [], False, {"success": False}
  while not done:
    action = np.asarray(planner.act(state), np.int32)
    seen.append(np.asarray(obs, np.uint8))
    chosen.append(actions_lib.index(action))
    state, obs, _, done, info = step(state, jnp.asarray(action))
    done = bool(done)
  return Episode(task.id, seed, np.stack(seen), np.asarray(chosen, np.int32), bool(info["success"]))


def episodes(tasks: Sequence[envs.Task], seeds: Sequence[int], progress=None) -> list[Episode]:
  """The planner's episodes of every task on every seed (`progress(n)` after each)."""
  out = []
  for task in tasks:
    for seed in seeds:
      out.append(planner_episode(task, seed))
      if progress is not None:
        progress(1)
  return out


def _cache_key(tasks: Sequence[envs.Task], seeds: Sequence[int]) -> str:
  """A hash of everything an episode depends on: the environment's and planner's code (every
  file of `envs/` and this module), the tasks' full specifications and the seeds."""
  h = hashlib.sha256()
  root = Path(envs.__file__).parent
  code = [*sorted(root.glob("*.py")), *sorted(root.glob("*.json")), Path(__file__)]
  for path in code:
    h.update(path.name.encode() + b"\0" + path.read_bytes())
  h.update(json.dumps([repr(t) for t in tasks]).encode())
  h.update(json.dumps([int(x) for x in seeds]).encode())
  return h.hexdigest()[:24]


def _read_cached(path: Path) -> list[Episode] | None:
  try:
    with np.load(path, allow_pickle=False) as f:
      ends = np.cumsum(f["lengths"])
      obs, acts = np.split(f["obs"], ends[:-1]), np.split(f["actions"], ends[:-1])
      return [
        Episode(str(t), int(s), o, a, bool(ok))
        for t, s, o, a, ok in zip(f["tasks"], f["seeds"], obs, acts, f["success"], strict=True)
      ]
  except FileNotFoundError:
    return None
  except Exception as e:  # A damaged cache is rebuilt (it is derived data), never trusted.
    log.warning("agent: planner demonstrations cache %s unreadable (%s); rebuilding", path, e)
    return None


def cache_dir(config) -> str:
  """Where a run keeps planner demonstrations: beside its prepared datasets (`data.data_dir`)."""
  from fulcrum.platform.data.text_corpus import resolve_data_dir  # noqa: PLC0415 (imports TFDS)

  return resolve_data_dir(config.data.data_dir)


def cached_episodes(tasks: Sequence[envs.Task], seeds: Sequence[int], cache_dir: str | None,
                    progress=None) -> list[Episode]:  # fmt: skip
  """`episodes(tasks, seeds)`, kept in `cache_dir/agent_demos/KEY.npz` (KEY: `_cache_key`, so a
  change to the world, the planner or a task makes new episodes, never reads stale ones); written
  atomically. `cache_dir` None plays them every time."""
  if not cache_dir:
    return episodes(tasks, seeds, progress)
  path = Path(cache_dir) / "agent_demos" / f"{_cache_key(tasks, seeds)}.npz"
  eps = _read_cached(path)
  if eps is not None:
    return eps
  eps = episodes(tasks, seeds, progress)
  buffer = io.BytesIO()
  np.savez(
    buffer,
    obs=np.concatenate([e.obs for e in eps]),
    actions=np.concatenate([e.actions for e in eps]),
    lengths=np.array([len(e.actions) for e in eps]),
    tasks=np.array([e.task for e in eps]),
    seeds=np.array([e.seed for e in eps]),
    success=np.array([e.success for e in eps]),
  )
  try:
    os.makedirs(path.parent, exist_ok=True)
    write_atomic(path, buffer.getvalue())
  except OSError as e:  # A read-only cache dir costs speed, not the run.
    log.warning("agent: could not cache planner demonstrations in %s (%s)", path.parent, e)
  return eps


def contexts(interface: Interface, episode: Episode) -> np.ndarray:
  """[T, context_len] int32: the tokens the agent reads before each of the episode's actions
  (`Interface.context` of each turn's history window: the lines of the actions before it)."""
  k, w = interface.history, interface.action_width
  lines = np.concatenate([np.full((k, w), SPACE, np.int32), interface.lines[episode.actions]])
  windows = np.stack([lines[t : t + k] for t in range(len(episode.actions))])  # [T, k, w]
  return np.asarray(interface.context(jnp.asarray(windows), jnp.asarray(episode.obs)))


def seq_len(interface: Interface) -> int:
  """Tokens per behaviour-cloning row: the context and the longest action."""
  return interface.context_len + interface.action_width - 1


def rows(interface: Interface, eps: Sequence[Episode]) -> dict[str, np.ndarray]:
  """Masked rows (inputs, targets, weights) of every turn: loss on the action's bytes only."""
  n = seq_len(interface)
  out: list[dict[str, np.ndarray]] = []
  for ep in eps:
    for ctx, action in zip(contexts(interface, ep), ep.actions, strict=True):
      text = np.frombuffer(interface.actions[action].encode(), np.uint8).astype(np.int32)
      out.append(masked_row(np.concatenate([ctx, text]), len(ctx), n))
  return {k: np.stack([r[k] for r in out]) for k in out[0]}
