"""DAgger's relabelling: the planner's action in each state a rollout reached, found by replaying
the rollout (checked against the observations the agent read)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.platform.agents import demos, envs, relabel, rollout
from fulcrum.platform.agents.environments import FARM
from fulcrum.platform.errors import UserError


def _turns(interface, episodes):
  """The planner's episodes (equal lengths) as a rollout's turns, [T, b]."""
  ctx = np.stack([demos.contexts(interface, ep) for ep in episodes], 1)
  actions = np.stack([ep.actions for ep in episodes], 1)
  live = np.ones(actions.shape, bool)
  return rollout.Turn(ctx, actions, np.zeros(actions.shape), ~live, live, {})


@pytest.fixture(scope="module")
def planner_turns():
  interface = rollout.Interface(FARM)
  task = next(t for t in envs.load() if t.id == "farming_harvest_3_parsnips_easy")
  eps = [demos.planner_episode(task, seed) for seed in (3, 4)]
  n = min(len(ep.actions) for ep in eps)  # Cut to one length: the rest is still a valid prefix.
  eps = [dataclasses.replace(ep, obs=ep.obs[:n], actions=ep.actions[:n]) for ep in eps]
  tasks = envs.stack([envs.to_arrays(task)] * 2)
  return interface, tasks, jnp.asarray([3, 4], jnp.int32), _turns(interface, eps)


def test_the_planner_relabels_its_own_episodes_with_its_own_actions(planner_turns):
  interface, tasks, seeds, turns = planner_turns
  labels = relabel.oracle_actions(interface, tasks, seeds, turns)
  np.testing.assert_array_equal(labels, turns.action)  # Reactive and deterministic.


def test_relabelling_labels_only_live_turns_and_follows_the_agents_actions(planner_turns):
  interface, tasks, seeds, turns = planner_turns
  live = turns.live.copy()
  live[len(live) // 2 :, 1] = False  # Episode 1 ended halfway.
  labels = relabel.oracle_actions(interface, tasks, seeds, turns._replace(live=live))
  assert (labels[~live] == -1).all() and (labels[live] >= 0).all()


def test_a_replay_that_diverges_from_what_the_agent_read_is_an_error(planner_turns):
  interface, tasks, seeds, turns = planner_turns
  context = turns.context.copy()
  start = interface.history * interface.action_width
  context[2, 0, start + 5] ^= 1  # Turn 2 read an observation the replay does not reach.
  with pytest.raises(RuntimeError, match="diverged at turn 2"):
    relabel.oracle_actions(interface, tasks, seeds, turns._replace(context=context))


def test_an_environment_without_an_oracle_is_refused_in_one_line(planner_turns):
  interface, tasks, seeds, turns = planner_turns
  bare = rollout.Interface(dataclasses.replace(FARM, oracle=None))
  with pytest.raises(UserError, match="no oracle"):
    relabel.oracle_actions(bare, tasks, seeds, turns)


def test_relabel_needs_a_demonstration_weight():
  from fulcrum.platform.agents import improve_config

  c = improve_config.config_defaults()
  c.relabel, c.demo_weight = True, 0.0
  with pytest.raises(ValueError, match="demo_weight"):
    improve_config.validate_config(c)


def test_planner_demonstrations_are_cached_by_what_they_depend_on(tmp_path, monkeypatch):
  task = next(t for t in envs.load() if t.id == "farming_till_3")
  first = demos.cached_episodes([task], [0, 1], str(tmp_path))
  (path,) = (tmp_path / "agent_demos").glob("*.npz")

  def played(*_):
    raise AssertionError("played again instead of read from the cache")

  monkeypatch.setattr(demos, "episodes", played)
  again = demos.cached_episodes([task], [0, 1], str(tmp_path))
  assert [dataclasses.astuple(e)[:2] for e in again] == [dataclasses.astuple(e)[:2] for e in first]
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.success == b.success
  # Other seeds, another task spec, changed world code: other keys, never the stale file.
  key = demos._cache_key([task], [0, 1])
  assert demos._cache_key([task], [0, 2]) != key
  assert demos._cache_key([dataclasses.replace(task, quantity=4)], [0, 1]) != key
  monkeypatch.setattr(demos.Path, "read_bytes", lambda p: b"edited " + p.name.encode())
  assert demos._cache_key([task], [0, 1]) != key
  monkeypatch.undo()
  path.write_bytes(b"truncated")  # A damaged cache file is rebuilt, not trusted.
  rebuilt = demos.cached_episodes([task], [0, 1], str(tmp_path))
  np.testing.assert_array_equal(rebuilt[1].actions, first[1].actions)
  assert demos._read_cached(path) is not None


def _rows(n: int, value: int, demo: float) -> dict[str, np.ndarray]:
  """n synthetic rows whose inputs are all `value` (to tell where each row came from)."""
  ones = np.ones(n, np.float32)
  return {
    "inputs": np.full((n, 4), value, np.int32),
    "targets": np.full((n, 4), value, np.int32),
    "weights": np.ones((n, 4), np.float32),
    "advantage": (1 - demo) * ones,
    "demo": demo * ones,
    "old_logp": np.zeros(n, np.float32),
  }


@pytest.mark.parametrize("aggregate", [False, True])
def test_a_round_trains_on_its_labels_and_with_aggregate_on_earlier_ones(tmp_path, aggregate):
  from fulcrum import recipes
  from fulcrum.platform.agents import improve
  from fulcrum.platform.selfplay import pairs as arrays_file

  config = recipes.get("agent_improve")
  with config.unlocked():
    config.improve.aggregate = aggregate
  arrays_file.save(tmp_path / "demos.npz", _rows(5, 9, 1.0), {})  # The planner's episodes.
  got = []
  for t in range(3):  # Round t: 2 policy-gradient rows, 3 + t labelled states.
    arrays, stats = improve.training_rows(config, tmp_path, t, _rows(2, 100 + t, 0.0),
                                          _rows(3 + t, t, 1.0), {"improve/rows": 2})  # fmt: skip
    got.append(arrays)
    labelled = sum(3 + s for s in range(t + 1)) if aggregate else 3 + t
    assert stats == {"improve/rows": 2, "improve/relabelled_total": labelled}
  sources = [sorted(set(a["inputs"][:, 0].tolist())) for a in got]
  if aggregate:
    assert sources == [[0, 9, 100], [0, 1, 9, 101], [0, 1, 2, 9, 102]]
  else:
    assert sources == [[0, 9, 100], [1, 9, 101], [2, 9, 102]]
  last = got[2]
  assert (last["demo"][last["inputs"][:, 0] < 100] == 1).all()  # Labels train as demonstrations.
  assert len(last["inputs"]) == 2 + 5 + (3 + 4 + 5 if aggregate else 5)


def test_aggregating_without_an_earlier_rounds_labels_is_refused(tmp_path):
  from fulcrum import recipes
  from fulcrum.platform.agents import improve

  config = recipes.get("agent_improve")
  with config.unlocked():
    config.improve.aggregate, config.improve.demo_weight = True, 0.0
  with pytest.raises(UserError, match="relabelled.npz is missing"):
    improve.training_rows(config, tmp_path, 1, _rows(1, 1, 0.0), _rows(1, 1, 1.0), {})


@pytest.mark.parametrize(
  "settings,message",
  [
    ({"aggregate": True, "relabel": False}, "set improve.relabel=true"),
    ({"pg_weight": -1.0}, "pg_weight must be >= 0"),
    ({"pg_weight": 0.0, "demo_weight": 0.0, "relabel": False}, "nothing to train on"),
  ],
)
def test_bad_dagger_settings_are_refused(settings, message):
  from fulcrum.platform.agents import improve_config

  c = improve_config.config_defaults()
  c.update(settings)
  with pytest.raises(ValueError, match=message):
    improve_config.validate_config(c)
