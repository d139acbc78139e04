"""Environments as values: each a frozen `Environment` of pure functions (hashable, so a compiled
rollout takes it as a static argument), found by name (`agent.env`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fulcrum.platform.agents import envs
from fulcrum.platform.agents.envs import planner


@dataclasses.dataclass(frozen=True)
class Environment:
  """An environment through the protocol rollouts use.

  Attributes:
    name: what `agent.env` calls it.
    obs_len: bytes in the text observation `reset` and `step` return.
    reset: (key, task arrays) -> (state, obs uint8[obs_len]).
    step: (state, int32 action) -> (state, obs, reward, done, info dict).
    actions: the action vocabulary's text, in the order of `encoded`.
    encoded: () -> int32[n, ...] array form of each action, as `step` takes it.
    oracle: (one unbatched state) -> an expert's next action in `step`'s array form (the
      farm's scripted planner: it labels the states an agent visits, `improve.relabel`), or None.
  """

  name: str
  obs_len: int
  reset: Callable[..., Any]
  step: Callable[..., Any]
  actions: tuple[str, ...]
  encoded: Callable[[], Any]
  oracle: Callable[[Any], Any] | None = None


FARM = Environment(
  name="farm",
  obs_len=envs.OBS_LEN,
  reset=envs.reset,
  step=envs.step,
  actions=tuple(envs.vocabulary()),
  encoded=envs.encoded_vocabulary,
  oracle=planner.act,
)
ENVIRONMENTS = {e.name: e for e in (FARM,)}
