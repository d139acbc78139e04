"""Compiled rollouts: an LM policy and a batch of vmapped environments stepped together in one
`lax.scan` (observation → tokens → grammar-constrained decode with the model's cache → action →
environment step), and the same step driven from a Python loop (one compiled call per step, as
API-style harnesses run) for comparison.

The agent's text interface (bytes, token id == byte): each turn the model reads its last
`history` actions (one line each, `action_width` bytes, space-padded), then the observation
(which opens with the task in words), then the prompt mark `PROMPT`, and writes one action.
Every turn has the same length, so one compiled program serves every step of every episode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from fulcrum.platform.agents import grammar as grammar_lib
from fulcrum.platform.agents.environments import Environment
from fulcrum.platform.decode.loop import prefill
from fulcrum.platform.decode.sampling import Sampling

PROMPT = b"\n> "  # Between the observation and the action the model writes.
SPACE = ord(" ")
NEWLINE = ord("\n")


@dataclasses.dataclass(frozen=True)
class Interface:
  """How an agent's context is laid out and how its actions are read (hashable: static).

  Attributes:
    env: the environment (its actions' text and array forms, its observation length).
    history: past actions shown each turn.
  """

  env: Environment
  history: int = 4

  def __post_init__(self):
    if self.history < 0:
      raise ValueError(f"history must be >= 0, got {self.history}")

  @property
  def actions(self) -> tuple[str, ...]:
    return self.env.actions

  @functools.cached_property
  def action_width(self) -> int:
    """Bytes per history line: the longest action and a newline."""
    return max(len(a) for a in self.actions) + 1

  @functools.cached_property
  def grammar(self) -> grammar_lib.Grammar:
    return grammar_lib.build([list(a.encode()) for a in self.actions], 256)

  @functools.cached_property
  def lines(self) -> np.ndarray:
    """[n, action_width] int32: each action as its history line (text, newline, spaces)."""
    out = np.full((len(self.actions), self.action_width), SPACE, np.int32)
    for i, a in enumerate(self.actions):
      data = a.encode() + b"\n"
      out[i, : len(data)] = np.frombuffer(data, np.uint8)
    return out

  @property
  def context_len(self) -> int:
    """Tokens the model reads each turn."""
    return self.history * self.action_width + self.env.obs_len + len(PROMPT)

  def empty_history(self, batch: int) -> Int[Array, "b k w"]:
    return jnp.full((batch, self.history, self.action_width), SPACE, jnp.int32)

  def context(self, history: Int[Array, "b k w"], obs: Array) -> Int[Array, "b t"]:
    """[b, t] tokens the model reads this turn."""
    b = obs.shape[0]
    mark = jnp.broadcast_to(jnp.asarray(np.frombuffer(PROMPT, np.uint8), jnp.int32), (b, 3))
    return jnp.concatenate([history.reshape(b, -1), obs.astype(jnp.int32), mark], axis=1)

  def remember(self, history: Int[Array, "b k w"], action: Int[Array, " b"]) -> Array:
    """The history with `action` appended (the oldest line drops out)."""
    if self.history == 0:
      return history
    line = jnp.asarray(self.lines)[action]
    return jnp.concatenate([history[:, 1:], line[:, None]], axis=1)


class Turn(NamedTuple):
  """What one rollout step records per environment (stacked over steps: [T, b, ...])."""

  context: Int[Array, "b t"]  # The tokens the model read.
  action: Int[Array, " b"]  # Vocabulary index of the action written.
  reward: Array  # [b] float32.
  done: Array  # [b] bool, after this step.
  live: Array  # [b] bool: the episode was running when this step was taken.
  info: dict  # The environment's info arrays.


def policy_step(
  model, params, interface: Interface, sampling: Sampling, history, obs, key
) -> tuple[Int[Array, " b"], Int[Array, "b t"]]:
  """One turn of the policy for a batch: (action indices, the context it read)."""
  ctx = interface.context(history, obs)
  b, t = ctx.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  g = interface.grammar
  last, cache = prefill(model, params, ctx, positions, t + g.max_len, 1)
  action, _, _, _, _ = grammar_lib.decode_action(
    model, params, last, cache, jnp.full((b,), t, jnp.int32), g, key, sampling
  )
  return action, ctx


def _env_turn(interface: Interface, carry, action, ctx):
  """The environments take `action` (vocabulary indices); the turn's record."""
  state, obs, history, done = carry
  encoded = jnp.asarray(interface.env.encoded())[action]
  state, obs, reward, new_done, info = jax.vmap(interface.env.step)(state, encoded)
  history = interface.remember(history, action)
  record = Turn(ctx, action, reward, new_done, ~done, info)
  return (state, obs, history, new_done | done), record


def turn(model, interface: Interface, sampling: Sampling, params, carry, key):
  """One step of every environment: the policy acts, the environments step."""
  action, ctx = policy_step(model, params, interface, sampling, carry[2], carry[1], key)
  return _env_turn(interface, carry, action, ctx)


def _start(interface: Interface, tasks, seeds):
  state, obs = jax.vmap(interface.env.reset)(jax.vmap(jax.random.PRNGKey)(seeds), tasks)
  b = seeds.shape[0]
  return (state, obs, interface.empty_history(b), jnp.zeros((b,), bool))


@functools.partial(jax.jit, static_argnames=("interface", "steps"))
def random_rollout(interface: Interface, steps: int, tasks, seeds, key) -> tuple[Turn, Any]:
  """`steps` turns of a batch of episodes with actions drawn uniformly from the vocabulary (the
  random agent; the environment's own speed). Contexts are not built: `context` is empty."""
  carry = _start(interface, tasks, seeds)
  b, n = seeds.shape[0], len(interface.actions)

  def body(carry, i):
    action = jax.random.randint(jax.random.fold_in(key, i), (b,), 0, n, jnp.int32)
    return _env_turn(interface, carry, action, jnp.zeros((b, 0), jnp.int32))

  (state, *_), turns = jax.lax.scan(body, carry, jnp.arange(steps))
  return turns, state


@functools.partial(jax.jit, static_argnames=("model", "interface", "sampling", "steps"))
def rollout(model, interface: Interface, sampling: Sampling, steps: int, params, tasks, seeds,
            key) -> tuple[Turn, Any]:  # fmt: skip
  """`steps` turns of a batch of episodes (one per task row) in one compiled scan.

  Args:
    model: the policy `LM`; interface: the environment and the text interface;
    sampling: greedy or sampled actions; steps: turns per episode (episodes that end early stay
      done: the environment leaves a finished state unchanged).
    params: the policy's parameters; tasks: a batch of the environment's task arrays;
    seeds: [b] int32 environment seeds (`reset` gets `PRNGKey(seed)`, as the planner's episodes);
    key: PRNG key of the action sampling.

  Returns:
    (the turns stacked [steps, b, ...], the final environment states).
  """
  carry = _start(interface, tasks, seeds)

  def act(carry, i):
    return turn(model, interface, sampling, params, carry, jax.random.fold_in(key, i))

  def body(carry, i):
    # Once every episode is over, the remaining steps skip the model and the environments.
    shapes = jax.eval_shape(act, carry, i)
    idle = lambda carry, i: (carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1]))  # noqa: E731
    return jax.lax.cond(carry[3].all(), idle, act, carry, i)

  (state, *_), turns = jax.lax.scan(body, carry, jnp.arange(steps))
  return turns, state


def python_loop_rollout(model, interface: Interface, sampling: Sampling, steps: int, params,
                        tasks, seeds, key) -> tuple[Turn, Any]:  # fmt: skip
  """The same rollout driven from Python: one compiled call per step (reset and step jitted),
  as a harness that queries a model API each step runs. Equals `rollout` step for step."""
  step = _compiled_turn(model, interface, sampling)
  carry = jax.jit(_start, static_argnums=0)(interface, tasks, seeds)
  records = []
  for i in range(steps):
    carry, record = step(params, carry, jax.random.fold_in(key, i))
    records.append(record)
  turns = jax.tree.map(lambda *x: jnp.stack(x), *records)
  return turns, carry[0]


@functools.lru_cache(maxsize=8)
def _compiled_turn(model, interface, sampling):
  return jax.jit(functools.partial(turn, model, interface, sampling))
