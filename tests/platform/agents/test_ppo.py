"""PPO on Craftax-Classic: GAE and the clipped loss against naive references, the adapter's
protocol (a finished episode stays finished; restarts from the pool), and a tiny run end to end
with an exact resume. Craftax compiles slowly on CPU (~40 s): the tests that step it are few and
marked `craftax`."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.benchmarks import bench_craftax
from fulcrum.platform import launch
from fulcrum.platform.agents import policies, ppo
from fulcrum.platform.agents.envs import craftax
from fulcrum.platform.training import trainer

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def test_gae_matches_the_recursion():
  rng = np.random.default_rng(0)
  t, n, gamma, lam = 7, 3, 0.9, 0.8
  rewards, values = rng.normal(size=(t, n)), rng.normal(size=(t, n))
  ended = rng.random((t, n)) < 0.3
  last = rng.normal(size=n)
  adv, target = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(ended),
                        jnp.asarray(last), gamma, lam)  # fmt: skip
  want = np.zeros((t, n))
  for j in range(n):
    running, next_value = 0.0, last[j]
    for i in reversed(range(t)):
      keep = 0.0 if ended[i, j] else 1.0
      delta = rewards[i, j] + gamma * next_value * keep - values[i, j]
      running = delta + gamma * lam * keep * running
      want[i, j], next_value = running, values[i, j]
  np.testing.assert_allclose(adv, want, atol=1e-5)
  np.testing.assert_allclose(target, want + values, atol=1e-5)


def test_ppo_loss_matches_a_naive_computation():
  config = recipes.get("craftax_ppo")
  p = config.ppo
  net = policies.ActorCritic(5, 8, 1)
  rng = np.random.default_rng(1)
  obs = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  params = net.init(jax.random.key(0), obs)["params"]
  batch = {
    "obs": obs,
    "action": jnp.asarray(rng.integers(0, 5, 6)),
    "logp": jnp.asarray(rng.normal(-1.6, 0.3, 6), jnp.float32),
    "value": jnp.asarray(rng.normal(size=6), jnp.float32),
    "adv": jnp.asarray(rng.normal(size=6), jnp.float32),
    "target": jnp.asarray(rng.normal(size=6), jnp.float32),
  }
  total, stats = ppo.ppo_loss(params, lambda q, b: net.apply({"params": q}, b["obs"])[:2], batch, p)
  logits, value = (np.asarray(x, np.float64) for x in net.apply({"params": params}, obs)[:2])
  logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  ratio = np.exp(logp_all[np.arange(6), b["action"].astype(int)] - b["logp"])
  adv = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)
  policy = -np.minimum(ratio * adv, np.clip(ratio, 1 - p.clip, 1 + p.clip) * adv).mean()
  clipped = b["value"] + np.clip(value - b["value"], -p.clip, p.clip)
  vloss = 0.5 * np.maximum((value - b["target"]) ** 2, (clipped - b["target"]) ** 2).mean()
  entropy = -(np.exp(logp_all) * logp_all).sum(-1).mean()
  np.testing.assert_allclose(total, policy + p.vf_coef * vloss - p.ent_coef * entropy, rtol=1e-5)
  np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-5)


@pytest.mark.parametrize("backbone", policies.RECURRENT)
def test_a_recurrent_policy_stepped_as_the_rollout_equals_its_sequence_in_the_update(backbone):
  """The rollout steps the network one observation at a time, carrying its memory; the update
  runs each environment's whole sequence from the memory the rollout started with. They must
  agree (PPO's ratio is 1 at the policy that acted), the memory must matter, and an episode that
  opens mid-sequence must start from the empty memory."""
  net = policies.build(backbone, 5, 16, 2)
  n, t = 3, 7
  obs = jax.random.normal(jax.random.key(0), (n, t, 11))
  first = np.zeros((n, t), bool)
  first[:, 0], first[1, 4] = True, True  # Environment 1's second episode opens at step 4.
  first = jnp.asarray(first)
  start = net.initial_memory(n)
  params = jax.jit(net.init)(jax.random.key(1), obs[:, :1], first[:, :1], start)["params"]
  apply = jax.jit(net.apply)  # One compile per shape, not op-by-op dispatch.
  logits, value, _ = apply({"params": params}, obs, first, start)
  memory, stepped = start, []
  for i in range(t):
    out, v, memory = apply({"params": params}, obs[:, i : i + 1], first[:, i : i + 1], memory)
    stepped.append((out[:, 0], v[:, 0]))
  np.testing.assert_allclose(jnp.stack([s[0] for s in stepped], 1), logits, atol=1e-5)
  np.testing.assert_allclose(jnp.stack([s[1] for s in stepped], 1), value, atol=1e-5)
  fresh, _, _ = apply({"params": params}, obs[1:2, 4:], first[1:2, 4:], net.initial_memory(1))
  np.testing.assert_allclose(fresh[0], logits[1, 4:], atol=1e-5)
  # Carrying environment 1's end-of-sequence memory instead changes the value (the policy head
  # starts near zero: its logits are too small to show it).
  _, carried, _ = apply({"params": params}, obs[1:2, 4:], jnp.zeros((1, 3), bool),
                        jax.tree.map(lambda m: m[1:2], memory))  # fmt: skip
  assert float(jnp.abs(carried[0] - value[1, 4:]).max()) > 1e-3
  zeroed = ppo.uniform_policy(params)
  uniform, _, _ = apply({"params": zeroed}, obs, first, start)
  np.testing.assert_allclose(uniform, 0.0, atol=1e-6)


def test_crafter_score():
  assert ppo.crafter_score(dict.fromkeys(craftax.ACHIEVEMENTS, 0.0)) == pytest.approx(0.0)
  assert ppo.crafter_score(dict.fromkeys(craftax.ACHIEVEMENTS, 1.0)) == pytest.approx(100.0)


@functools.cache
def _protocol_run():
  """One compiled program: reset two worlds, step them with env 0 already finished, then one
  batched auto-reset step with env 0 dying (health 0)."""

  def run():
    state, obs = jax.vmap(craftax.reset)(jax.random.split(jax.random.PRNGKey(0), 2))
    over = state._replace(done=jnp.array([True, False]))
    stepped = jax.vmap(craftax.step)(over, jnp.array([5, 5]))
    health = jnp.array([0, 9], state.env.player_health.dtype)
    dying = state._replace(env=state.env.replace(player_health=health))
    pool = craftax.world_pool(jax.random.PRNGKey(3), 4)
    restarted = craftax.auto_reset_batch(dying, jnp.array([0, 0]), pool)
    return state, obs, stepped, pool, restarted

  return jax.jit(run)()


@pytest.mark.craftax
def test_craftax_adapter_protocol():
  """reset/step under jit and vmap; a finished episode stays as it ended; the batched
  auto-reset restarts an ended episode from the pool and reports the one that ended."""
  state, obs, stepped, pool, restarted = _protocol_run()
  assert obs.shape == (2, craftax.OBS_SIZE) and obs.dtype == jnp.float32
  new, obs2, reward, done, info = stepped
  np.testing.assert_array_equal(done, [True, False])
  assert float(reward[0]) == 0.0 and int(new.episode_length[0]) == 0
  np.testing.assert_array_equal(new.env.map[0], state.env.map[0])
  np.testing.assert_array_equal(obs2[0], obs[0])
  assert int(new.episode_length[1]) == 1 and info["achievements"].shape == (2, 22)
  fresh, obs3, _, ended, info, pool2 = restarted
  np.testing.assert_array_equal(ended, [True, False])
  assert int(info["episode_length"][0]) == 1 and int(fresh.episode_length[0]) == 0
  assert not bool(fresh.done[0]) and int(fresh.episode_length[1]) == 1
  drawn = [
    i for i, m in enumerate(np.asarray(pool.worlds.env.map)) if np.array_equal(fresh.env.map[0], m)
  ]
  assert drawn and any(np.array_equal(obs3[0], pool.obs[i]) for i in drawn)
  assert int(pool2.step) == 1


@pytest.mark.craftax
def test_ppo_trains_reports_and_resumes_exactly(tmp_path, cli, monkeypatch):
  """`bench craftax --quick` (a 4-update PPO run, then its policy and the random agent on fresh
  worlds), then the same run stopped by SIGTERM after update 2 and rerun: it resumes exactly."""
  monkeypatch.setattr(bench_craftax, "RUNS", tmp_path)
  r = bench_craftax.run(quick=True)
  assert set(r["success"]) == {"ppo", "ppo_fresh", "random"}
  for agent, rates in r["success"].items():
    assert set(rates) == set(craftax.ACHIEVEMENTS) and all(0 <= x <= 1 for x in rates.values())
    assert 0 <= r["score"][agent] <= 100, agent
  assert r["env_steps_per_s"] > 0 and r["train_steps_per_s"] > 0
  assert "| **Crafter score (%)** |" in r["markdown"]
  whole = tmp_path / "quick"
  report = json.loads((whole / "achievements.json").read_text())
  assert report["success_rates"] == r["success"]["ppo"]
  rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
  assert [r["update"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["policy_loss"]) and r["steps_per_s"] > 0 for r in rows)

  config = bench_craftax._config(quick=True)
  original = trainer.StopSignal.agreed
  monkeypatch.setattr(trainer.StopSignal, "agreed", lambda self, step: step == 2)
  half = launch.train(config, tmp_path / "split")
  assert half["preempted"] and half["update"] == 2
  monkeypatch.setattr(trainer.StopSignal, "agreed", original)
  resumed = launch.train(config, tmp_path / "split")
  split_rows = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["policy_loss"] for x in split_rows] == [r["policy_loss"] for r in rows]
  assert resumed["report"] == report
  bad = cli("train", "--recipe", "craftax_ppo", "--workdir", tmp_path / "bad",
            "--set", "ppo.minibatches=3")  # fmt: skip
  assert bad[0] == 2 and "ppo.minibatches=3 must divide" in bad[2]


@pytest.mark.craftax
def test_a_recurrent_ppo_run_resumes_exactly_with_its_memory(tmp_path, monkeypatch):
  """A Hawk-backbone PPO run stopped after update 1 and rerun equals an uninterrupted one: the
  checkpoint holds each environment's memory and episode-start flags."""
  config = recipes.get("craftax_ppo")
  with config.unlocked():
    config.train.progress = False
    for key, value in {"backbone": "hawk", "num_envs": 4, "num_steps": 8, "total_steps": 96,
                       "minibatches": 2, "width": 16, "depth": 1, "pool": 2,
                       "log_every": 1}.items():  # fmt: skip
      config.ppo[key] = value
  whole = launch.train(config, tmp_path / "whole")
  original = trainer.StopSignal.agreed
  monkeypatch.setattr(trainer.StopSignal, "agreed", lambda self, step: step == 1)
  assert launch.train(config, tmp_path / "split")["preempted"]
  monkeypatch.setattr(trainer.StopSignal, "agreed", original)
  resumed = launch.train(config, tmp_path / "split")
  losses = [
    [(r["policy_loss"], r["value_loss"], r["entropy"]) for r in map(json.loads, lines)]
    for lines in ((tmp_path / d / "metrics.jsonl").read_text().splitlines()
                  for d in ("whole", "split"))
  ]  # fmt: skip
  assert len(losses[0]) == 3 and losses[1] == losses[0]
  assert resumed["report"] == whole["report"]
