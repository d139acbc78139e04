"""Policy-gradient improvement of an agent: the RLOO advantages, the loss's gradient against the
REINFORCE formula, the rollout rows, and the rounds end to end (files, table, resume, eval, bad
input)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import improve
from fulcrum.platform.selfplay import pairs as arrays_file
from fulcrum.platform.training.tasks.agent_policy_gradient import AgentImprove, policy_gradient_loss
from tests.platform.agents.test_rollout import TINY_AGENT

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def _config(**extra):
  config = recipes.get("agent_improve")
  settings = {**TINY_AGENT, "improve.episodes": 3, "improve.steps": 2, "improve.iterations": 2,
              "train.log_every": 1, **extra}  # fmt: skip
  config_lib.apply_overrides(config, [f"{k}={v}" for k, v in settings.items()])
  return config


def test_leave_one_out_advantages():
  returns = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.5, 0.0, 0.0, 0.0]])
  adv = improve.advantages(returns)
  np.testing.assert_allclose(adv[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
  np.testing.assert_array_equal(adv[1], 0.0)  # A task always solved teaches nothing.
  np.testing.assert_allclose(adv[2], [0.5, -0.5 / 3, -0.5 / 3, -0.5 / 3])
  np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-12)


def _pg_batch(old_shift=0.0):
  k = jax.random.split(jax.random.key(0), 2)
  logits = jax.random.normal(k[0], (4, 5, 7))
  targets = jax.random.randint(k[1], (4, 5), 0, 7)
  weights = jnp.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [0, 1, 1, 1, 0]],
                      jnp.float32)  # fmt: skip
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  batch = {
    "targets": targets,
    "weights": weights,
    "advantage": jnp.array([0.7, -1.3, 0.0, 0.0]),
    "demo": jnp.array([0.0, 0.0, 0.0, 1.0]),
    "old_logp": (logp * weights).sum(-1) + old_shift,
  }
  return logits, batch


def _reinforce_grad(logits, batch, rows, demo_weight):
  """Naive: ∂/∂logits of −A·log p(action) per rollout row / rows, plus the demonstration row's
  token NLL × demo_weight / its tokens."""
  p = np.asarray(jax.nn.softmax(logits))
  onehot = np.eye(7)[np.asarray(batch["targets"])]
  w = np.asarray(batch["weights"])[..., None]
  demo = np.asarray(batch["demo"])[:, None, None]
  coef = np.where(demo > 0, demo_weight / np.asarray(batch["weights"])[3].sum(),
                  np.asarray(batch["advantage"])[:, None, None] / rows)  # fmt: skip
  return coef * w * (p - onehot)


def test_policy_gradient_loss_is_reinforce_at_the_rollout_policy():
  logits, batch = _pg_batch()
  grad = jax.grad(lambda x: policy_gradient_loss(x, batch, 0.2, 0.5)[0])(logits)
  np.testing.assert_allclose(grad, _reinforce_grad(logits, batch, 3, 0.5), atol=1e-6)


@pytest.mark.parametrize("shift", [-0.5, 0.5])
def test_policy_gradient_loss_clips_moves_past_the_trust_region(shift):
  """Once an action's probability has moved past 1 ± ε times θ_t's in its advantage's direction,
  its row stops pulling; the other row and the demonstration row still pull."""
  logits, batch = _pg_batch(old_shift=shift)  # ratio e^{0.5} > 1.2 or e^{-0.5} < 0.8
  grad = np.asarray(jax.grad(lambda x: policy_gradient_loss(x, batch, 0.2, 0.5)[0])(logits))
  clipped, free = (0, 1) if shift < 0 else (1, 0)  # Row 0 has A > 0, row 1 has A < 0.
  assert np.abs(grad[clipped]).max() == 0 and np.abs(grad[free]).max() > 0
  np.testing.assert_allclose(grad[3], _reinforce_grad(logits, batch, 3, 0.5)[3], atol=1e-6)


@pytest.mark.parametrize("pg_weight", [0.0, 2.5])
def test_the_policy_gradient_term_scales_with_pg_weight(pg_weight):
  logits, batch = _pg_batch()
  grad = jax.grad(lambda x: policy_gradient_loss(x, batch, 0.2, 0.5, pg_weight)[0])(logits)
  want = _reinforce_grad(logits, batch, 3, 0.5)
  want[:3] *= pg_weight  # Rows 0-2 are rollout rows; row 3, the demonstration, keeps its pull.
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_the_task_loss_takes_the_anchor_and_policy_gradient_weights():
  config = _config(**{"improve.demo_weight": 0.5, "improve.pg_weight": 0.7})
  logits, batch = _pg_batch()
  got, rows = AgentImprove(config).loss(logits, batch)
  want, _ = policy_gradient_loss(logits, batch, config.improve.clip, 0.5, 0.7)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert rows == 4


def test_bench_agents_and_the_improvement_rounds_end_to_end(tmp_path, monkeypatch, cli):
  """`bench agents --quick` (a tiny cloned agent, one improvement round from it, speeds, success
  of every agent), then the round's files: rollout rows spell the actions taken with θ_0's
  log-probs as the loss computes them, a rerun resumes without training, `agent eval` reads it."""
  from fulcrum.benchmarks import bench_agents

  monkeypatch.setattr(bench_agents, "RUNS", tmp_path)
  r = bench_agents.run(quick=True)
  for key in ("env_steps_per_s", "rollout_steps_per_s", "python_loop_steps_per_s"):
    assert r[key] > 0, key
  assert set(r["success"]) == {"random", "behaviour_cloned", "improved", "planner"}
  assert -1 <= r["improvement"] <= 1 and r["improvement_ci95"] >= 0
  for agent, rates in r["success"].items():
    assert set(rates) == {"farming", "exploration", "overall"}, agent
    assert all(0.0 <= x <= 1.0 for x in rates.values())
    assert set(r["success_ci95"][agent]) == set(rates)
  assert r["success"]["planner"]["overall"] == 1.0  # The oracle solves held-out seeds too.
  assert r["invalid_action_rate"]["behaviour_cloned"] == 0.0  # Constrained decoding.
  assert "| planner |" in r["markdown"] and "| iteration 0 |" in r["markdown"]

  workdir = tmp_path / "quick_improved"
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["iteration"] for row in rows] == [0]
  assert 0 <= rows[0]["eval/success"] <= 1 and rows[0]["eval/success_ci95"] > 0
  assert json.loads((workdir / "base.json").read_text())["iteration"] == -1
  assert workdir_lib.checkpointed_run(workdir).name == "0"
  arrays, meta = arrays_file.load(workdir / "iterations" / "0" / "rollouts.npz")
  assert meta["iteration"] == 0 and arrays["demo"].sum() > 0  # The anchor rows ride along.
  # DAgger (the recipe's improve.relabel): a planner-labelled row for every turn played, sampled
  # and greedy (improve.relabel_greedy), beside the planner's own demonstrations.
  planner_rows = len(arrays_file.load(workdir / "demos.npz")[0]["inputs"])
  assert arrays["demo"].sum() == planner_rows + meta["improve/relabelled"]
  assert meta["improve/relabelled"] > meta["improve/turns"] > 0
  for key in ("improve/planner_agreement", "improve/planner_agreement_greedy",
              "improve/greedy_success"):  # fmt: skip
    assert 0.0 <= meta[key] <= 1.0, key
  own = {k: v[arrays["demo"] == 0] for k, v in arrays.items()}
  assert len(own["inputs"]) == meta["improve/rows"] > 0 and (own["advantage"] != 0).all()
  exp, bc, _ = workdir_lib.load(tmp_path / "quick")  # θ_0.
  logits = exp.model.apply({"params": bc.params}, jnp.asarray(own["inputs"][:8]))
  targets = jnp.asarray(own["targets"][:8])[..., None]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets, -1)[..., 0]
  np.testing.assert_allclose((logp * own["weights"][:8]).sum(-1), own["old_logp"][:8], atol=1e-4)
  actions = set(improve.evaluation.interface(exp.config).actions)
  for row in range(len(own["inputs"])):
    w = own["weights"][row] > 0
    assert bytes(own["targets"][row][w].astype(np.uint8)).decode() in actions
  # A rerun resumes: the finished round is read back, nothing trains again.
  _, again = bench_agents._improved(True, tmp_path / "quick")
  assert again["rows"][1:] == rows and workdir_lib.load(workdir)[2] == 1
  # A finished run still evaluates once moved (its iterations' stored rollout paths are stale).
  moved = workdir.rename(tmp_path / "moved")
  code, out, err = cli("agent", "eval", "--workdir", moved, "--episodes", 1, "--json")
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["episodes"] == 2  # After the runs' own lines.


def test_an_improvement_run_needs_its_source(cli, tmp_path):
  code, _, err = cli("train", "--recipe", "agent_improve", "--workdir", tmp_path / "w",
                     "--set", "improve.init_from=")  # fmt: skip
  assert code == 2 and "improve.init_from is empty" in err and "Traceback" not in err
  code, _, err = cli("train", "--recipe", "agent_improve", "--workdir", tmp_path / "w",
                     "--set", "improve.episodes=1")  # fmt: skip
  assert code == 2 and "improve.episodes must be >= 2" in err
  (tmp_path / "lm").mkdir()
  (tmp_path / "lm" / "config.json").write_text(json.dumps({"task": "lm"}))
  code, _, err = cli("train", "--recipe", "agent_improve", "--workdir", tmp_path / "w",
                     "--set", f"improve.init_from={tmp_path / 'lm'}")  # fmt: skip
  assert code == 2 and "not an agent" in err and len(err.strip().splitlines()) == 1
