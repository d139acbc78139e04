"""Compiled rollouts: the one-scan rollout equals the Python loop step for step (attention and
recurrent policies), every action the agent writes is valid, demonstrations show the agent the
context a rollout shows it, and an agent trains and evaluates end to end through the CLI."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.benchmarks import bench_agents
from fulcrum.modules import build
from fulcrum.platform.agents import demos, envs, evaluation, rollout
from fulcrum.platform.agents.environments import FARM
from fulcrum.platform.decode import Sampling
from tests.conftest import random_params

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

TASKS = ["farming_till_3", "crafting_torch", "combat_defeat_1_slime_easy"]
STEPS = 4
# A tiny `agent_bc` run (tests and the notebook test): two tasks, history 2, one episode each.
TINY_AGENT = {**bench_agents.TINY, "train.progress": False}  # The bench's --quick agent.
CONFIGS = {
  "transformer": dict(arch="transformer", d_model=32, num_layers=1, num_heads=2),
  "mamba": dict(arch="mamba", d_model=16, num_layers=1),
}


@functools.cache
def policy(name: str):
  m = build(dict(vocab_size=256, **CONFIGS[name]))
  return m, random_params(m, 0)


def _batch():
  chosen = envs.select(envs.load(), TASKS)
  return envs.stack([envs.to_arrays(t) for t in chosen]), jnp.arange(len(chosen), dtype=jnp.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_rollout_equals_the_python_loop(name):
  m, params = policy(name)
  interface = rollout.Interface(FARM, history=2)
  tasks, seeds = _batch()
  sampling = Sampling(temperature=1.0)  # Sampled: the agents act differently every step.
  key = jax.random.key(3)
  scanned, final = rollout.rollout(m, interface, sampling, STEPS, params, tasks, seeds, key)
  looped, final_loop = rollout.python_loop_rollout(
    m, interface, sampling, STEPS, params, tasks, seeds, key
  )
  for field in ("context", "action", "reward", "done", "live"):
    np.testing.assert_array_equal(getattr(scanned, field), getattr(looped, field), err_msg=field)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(final_loop), strict=True):
    np.testing.assert_array_equal(a, b)
  actions = np.asarray(scanned.action)
  assert (actions >= 0).all() and (actions < len(interface.actions)).all()
  assert len({int(a) for a in actions.ravel()}) > 2, "a random policy should vary its actions"
  # Each turn's context is the previous actions' lines, the observation and the prompt mark.
  ctx = np.asarray(scanned.context)
  w = interface.action_width
  for t in range(1, STEPS):
    prev = interface.actions[actions[t - 1, 0]]
    line = bytes(ctx[t, 0, w : 2 * w].astype(np.uint8)).decode()
    assert line == (prev + "\n").ljust(w)
  assert bytes(ctx[0, 0, -3:].astype(np.uint8)) == rollout.PROMPT


def test_rollout_skips_steps_once_every_episode_is_over():
  m, params = policy("transformer")
  interface = rollout.Interface(FARM, history=1)
  tasks, seeds = _batch()
  long, _ = rollout.rollout(m, interface, Sampling(), 40, params, tasks, seeds, jax.random.key(0))
  live = np.asarray(long.live)
  # The rows after every episode ended are zeros (skipped), never a live turn.
  over = ~live.any(1)
  if over.any():
    first = int(np.argmax(over))
    assert not live[first:].any() and (np.asarray(long.action)[first:] == 0).all()
  assert (np.asarray(long.done)[live.sum(0) - 1, np.arange(3)] | (live.sum(0) == 40)).all()


def test_demonstration_contexts_are_what_the_rollout_shows():
  interface = rollout.Interface(FARM, history=3)
  task = envs.select(envs.load(), ["combat_defeat_2_slimes"])[0]
  ep = demos.planner_episode(task, 0)
  assert ep.success and len(ep.actions) >= 3
  got = demos.contexts(interface, ep)
  history = interface.empty_history(1)
  for t, (obs, action) in enumerate(zip(ep.obs, ep.actions, strict=True)):
    want = interface.context(history, jnp.asarray(obs[None]))
    np.testing.assert_array_equal(got[t], np.asarray(want[0]))
    history = interface.remember(history, jnp.asarray([action]))
  rows = demos.rows(interface, [ep])
  # Loss only on the action's bytes: the weighted targets spell the planner's action.
  for r, action in enumerate(ep.actions):
    w = rows["weights"][r] > 0
    assert bytes(rows["targets"][r][w].astype(np.uint8)).decode() == interface.actions[action]


def test_summary_rates_and_intervals():
  chosen = envs.select(envs.load(), TASKS)
  played = [t for t in chosen for _ in range(2)]
  outcomes = {
    "success": np.array([1, 1, 0, 1, 0, 0], bool),
    "progress": np.array([1, 1, 0.5, 1, 0, 0.25]),
    "turns": 20,
    "malformed": 0,
    "noops": 5,
  }
  out = evaluation.summarize(played, outcomes)
  assert out["success"] == {"combat": 0.0, "crafting": 0.5, "farming": 1.0, "overall": 0.5}
  assert out["noop_action_rate"] == 0.25 and out["invalid_action_rate"] == 0.0
  # Wilson: a rate of 1 over 2 episodes is not certain.
  assert 0.2 < out["success_ci95"]["farming"] < 0.5
  assert out["success_ci95"]["overall"] < out["success_ci95"]["farming"]


def test_agent_trains_and_evaluates(agent_run, cli, tmp_path):
  rows = [json.loads(x) for x in (agent_run / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "eval/success" in r][-1]
  for key in ("eval/action_loss", "eval/action_accuracy", "eval/success", "eval/progress",
              "eval/success_farming", "eval/success_exploration"):  # fmt: skip
    assert 0 <= final[key] < 10, key
  assert final["eval/invalid_action_rate"] == 0.0
  # One episode a task: the shapes training's evaluation compiled (the same program runs).
  code, out, err = cli(
    "agent", "eval", "--workdir", agent_run, "--episodes", 1, "--json", "--record", tmp_path / "ep"
  )
  assert code == 0, err
  result = json.loads(out)
  assert result["episodes"] == 2 and set(result["success"]) == {"farming", "exploration", "overall"}
  text = (tmp_path / "ep.txt").read_text()
  assert "Till 3 tiles." in text and "> " in text
  assert (tmp_path / "ep.gif").stat().st_size > 0


@pytest.mark.parametrize(
  "args,fragment",
  [
    (["--tasks", "no_such_task"], "unknown task id 'no_such_task'"),
    (["--episodes", "0"], "--episodes must be >= 1"),
  ],
)
def test_agent_eval_bad_input_is_one_line(agent_run, cli, args, fragment):
  code, _, err = cli("agent", "eval", "--workdir", agent_run, *args)
  assert code == 2 and fragment in err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_agent_eval_refuses_a_workdir_that_is_not_an_agent(cli, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "lm"}))
  code, _, err = cli("agent", "eval", "--workdir", tmp_path)
  assert code == 2 and "not an agent" in err
