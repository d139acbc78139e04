"""Policy-gradient improvement of an LM agent (`task = agent_improve`): one iteration's rollouts.

An improvement run (`fulcrum.platform.agents.improve`) trains each iteration as an ordinary run of
this task in `WORKDIR/iterations/T/`, whose `improve.rollouts` names the file the driver wrote
there: one row per turn of the agent's own sampled episodes (the context it read → the action it
wrote) with that episode's advantage, and optionally planner demonstrations as an anchor.

The loss is the policy gradient with a leave-one-out baseline on the action tokens, with PPO's
clipped ratio so that the several optimizer steps an iteration takes on one batch of rollouts
stay near the policy that played them (plain REINFORCE on negative advantages drives their
log-probabilities down without bound: measured, it collapsed the agent to 0 success):
  r = exp(log p_θ(action) − log p_θt(action)),  L = −mean_rows min(r·A, clip(r, 1 ± ε)·A),
A being the episode's return minus its task group's leave-one-out mean. At θ = θ_t the gradient
is REINFORCE's, −A ∇ log p_θ(action). Demonstration rows (planner episodes, and with
`improve.relabel` the planner's action in each state the rollouts reached) add
`improve.demo_weight` × their mean token NLL; the policy-gradient term is scaled by
`improve.pg_weight` (0: DAgger and demonstrations alone). Evaluation is behaviour cloning's
(`eval/success` on held-out seeds, action loss on held-out demonstrations).
"""

from __future__ import annotations

import grain
import jax.numpy as jnp
import optax

from fulcrum.platform.data import instruct_pipeline
from fulcrum.platform.selfplay import pairs as arrays_file
from fulcrum.platform.training.tasks.agent_cloning import AgentCloning


def policy_gradient_loss(logits, batch, clip: float, demo_weight: float, pg_weight: float = 1.0):
  """The clipped policy-gradient loss of a batch of rollout and demonstration rows (float32)
  and the rows it averages over. `batch` holds targets, weights (1 on the action's tokens),
  advantage, old_logp (θ_t's log-prob of the action) and demo (1 for demonstration rows)."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                        batch["targets"])  # fmt: skip
  weights = batch["weights"].astype(jnp.float32)
  logp = -(weights * nll).sum(-1)
  demo = batch["demo"] > 0
  ratio = jnp.exp(logp - batch["old_logp"])
  adv = batch["advantage"]
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
  rollout_rows = jnp.maximum((~demo).sum(), 1)
  pg = -jnp.where(demo, 0.0, surrogate).sum() / rollout_rows
  demo_tokens = jnp.maximum(jnp.where(demo[:, None], weights, 0.0).sum(), 1.0)
  anchor = jnp.where(demo[:, None], weights * nll, 0.0).sum() / demo_tokens
  return pg_weight * pg + demo_weight * anchor, jnp.asarray(logits.shape[0], jnp.float32)


class AgentImprove(AgentCloning):
  """Trains the agent on its own rollouts, weighted by advantage (see the module docstring)."""

  name = "agent_improve"

  def train_iterator(self, process_index, process_count):
    arrays = arrays_file.load_iteration_rows(
      self.config.improve.rollouts, "improve.rollouts", "an improvement", "agent_improve"
    )
    t = self.config.train
    source = grain.MapDataset.source(instruct_pipeline.ArrayRows(arrays))
    fingerprint = {"source": f"rollouts {self.config.improve.rollouts}", "rows": len(source)}
    fingerprint["seq_len"] = t.seq_len
    return instruct_pipeline.shuffled_batches(
      source, fingerprint, t.batch_size, t.seed, process_index, process_count
    )

  def loss(self, outputs, batch):
    if "advantage" not in batch:  # Evaluation's demonstration batches.
      return super().loss(outputs, batch)
    i = self.config.improve
    return policy_gradient_loss(outputs, batch, i.clip, i.demo_weight, i.pg_weight)

  def summary(self):
    i = self.config.improve
    return f"agent policy gradient ({self.config.agent.tasks}): rollouts {i.rollouts or '-'}"


TASK = AgentImprove
