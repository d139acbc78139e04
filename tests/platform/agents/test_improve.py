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
from fulcrum.platform import launch
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import improve
from fulcrum.platform.selfplay import pairs as arrays_file
from fulcrum.platform.training.tasks.agent_policy_gradient import AgentImprove, policy_gradient_loss
from tests.platform.agents.test_rollout import TINY_AGENT, policy

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


def test_demonstration_rows_take_the_anchor_weight():
  config = _config(**{"improve.demo_weight": 0.5})
  logits, batch = _pg_batch()
  got, rows = AgentImprove(config).loss(logits, batch)
  want, _ = policy_gradient_loss(logits, batch, config.improve.clip, 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert rows == 4


def test_rollout_rows_are_the_actions_taken_weighted_by_advantage():
  m, params = policy("transformer")
  config = _config(**{"improve.episodes": 4})
  arrays, stats = improve.collect(m, params, config, 0)
  n = stats["improve/rows"]
  assert n == len(arrays["inputs"]) == len(arrays["advantage"]) > 0
  assert (arrays["advantage"] != 0).all() and (arrays["demo"] == 0).all()
  # The stored log-probs are θ_t's, as the loss computes them: the first step's ratio is 1.
  head = {k: v[:8] for k, v in arrays.items()}
  logits = m.apply({"params": params}, jnp.asarray(head["inputs"]))
  targets = jnp.asarray(head["targets"])[..., None]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets, -1)[..., 0]
  np.testing.assert_allclose((logp * head["weights"]).sum(-1), head["old_logp"], atol=1e-4)
  actions = set(improve.evaluation.interface(config).actions)
  for r in range(0, n, max(n // 20, 1)):
    w = arrays["weights"][r] > 0
    assert bytes(arrays["targets"][r][w].astype(np.uint8)).decode() in actions
  assert 0 <= stats["improve/rollout_success"] <= 1 and stats["improve/rollout_steps_per_s"] > 0


def test_improvement_rounds_end_to_end(agent_run, tmp_path, cli):
  workdir = tmp_path / "improve"
  config = _config(**{"improve.init_from": str(agent_run), "improve.demo_weight": 1.0,
                      "improve.demos_per_task": 1})  # fmt: skip
  result = launch.train(config, workdir)
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["iteration"] for r in rows] == [0, 1]
  for r in rows:
    assert 0 <= r["eval/success"] <= 1 and r["eval/success_ci95"] > 0 and r["improve/rows"] >= 0
  base = json.loads((workdir / "base.json").read_text())
  assert base["iteration"] == -1 and "eval/success" in base
  assert "| iteration 1 |" in result["table"] and "θ_0" in result["table"]
  arrays, meta = arrays_file.load(workdir / "iterations" / "0" / "rollouts.npz")
  assert arrays["demo"].sum() > 0 and meta["iteration"] == 0  # The anchor rows ride along.
  assert workdir_lib.checkpointed_run(workdir).name == "1"
  _, _, step = workdir_lib.load(workdir)
  assert step == 2
  # A rerun resumes: finished iterations are read back, nothing trains again.
  again = launch.train(config, workdir)
  assert again["rows"][1:] == result["rows"][1:]
  assert workdir_lib.load(workdir)[2] == 2
  code, out, err = cli("agent", "eval", "--workdir", workdir, "--episodes", 1, "--json")
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["episodes"] == 2  # After the runs' own lines.


def test_an_improvement_run_needs_its_source(cli, tmp_path):
  code, _, err = cli("train", "--recipe", "agent_improve", "--workdir", tmp_path / "w",
                     "--set", "improve.init_from=")  # fmt: skip
  assert code == 2 and "improve.init_from is empty" in err and "Traceback" not in err
  code, _, err = cli("train", "--recipe", "agent_improve", "--workdir", tmp_path / "w",
                     "--set", "improve.episodes=1")  # fmt: skip
  assert code == 2 and "improve.episodes must be >= 2" in err
