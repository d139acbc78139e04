"""Expert labels for the states an agent visits (DAgger's relabelling, `improve.relabel`).

Behaviour cloning only sees the states the planner's own episodes pass through; once the cloned
agent errs it reaches states no demonstration covers and repeats itself (measured: greedy cloned
agents spend most failed turns on no-ops). Relabelling asks the environment's oracle (the farm's
reactive planner) what it would do in each state the agent actually reached, so the next round
trains on the agent's own state distribution.

The rollout keeps no states, so they are replayed: the environments are deterministic given the
reset seed and the actions, and the replay checks that every live turn's observation equals the
one the agent read (a divergence is an error, never a silent mislabel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents import rollout
from fulcrum.platform.agents.environments import Environment
from fulcrum.platform.errors import UserError


@functools.cache
def _batched(env: Environment):
  return jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step))


def oracle_actions(interface: rollout.Interface, tasks, seeds, turns: rollout.Turn) -> np.ndarray:
  """[T, b] int32: the oracle's action (vocabulary index) in the state before each live turn of
  a rollout (`rollout.rollout` of `tasks` from `seeds`), −1 on turns that were not played."""
  env = interface.env
  if env.oracle is None:
    raise UserError(
      f"agent.env={env.name} has no oracle to relabel with; set improve.relabel=false"
    )
  encoded = np.asarray(env.encoded())
  index = {tuple(a.reshape(-1).tolist()): i for i, a in enumerate(encoded)}
  actions = np.asarray(turns.action)
  contexts = np.asarray(turns.context)
  live = np.asarray(turns.live)
  start = interface.history * interface.action_width
  labels = np.full(actions.shape, -1, np.int32)
  reset, step = _batched(env)
  state, obs = reset(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)), tasks)
  for t in range(actions.shape[0]):
    rows = np.nonzero(live[t])[0]
    if not len(rows):
      break
    host, seen = jax.device_get((state, obs))
    if not np.array_equal(seen[rows], contexts[t, rows, start : start + env.obs_len]):
      raise RuntimeError(f"replaying the rollout diverged at turn {t}: the environment is not "
                         "deterministic given its seed and actions")  # fmt: skip
    for b in rows:
      expert = env.oracle(jax.tree.map(lambda x, b=b: x[b], host))
      labels[t, b] = index[tuple(np.asarray(expert).reshape(-1).tolist())]
    # The rollout indexes the vocabulary the same way (a −1 wraps alike in numpy and jnp).
    state, obs, *_ = step(state, jnp.asarray(encoded[actions[t]]))
  return labels
