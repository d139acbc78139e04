"""Behaviour cloning of an LM agent (`task = agent`): the planner's demonstrations as masked rows
(each turn's context → the planner's action), evaluated by the cloning loss and by playing the
tasks (`eval/success`, per domain, with compiled rollouts on held-out seeds).
"""

from __future__ import annotations

import functools
import sys

import grain
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.agents import demos, evaluation
from fulcrum.platform.agents.rollout import Interface
from fulcrum.platform.data import instruct_pipeline
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Task, cross_entropy


class AgentCloning(Task):
  """Trains an LM to write the planner's action for the context the agent reads."""

  name = "agent"

  @classmethod
  def check_config(cls, config):
    interface = evaluation.interface(config)
    need = demos.seq_len(interface)
    if config.train.seq_len < need:
      raise UserError(
        f"train.seq_len={config.train.seq_len} cannot hold an agent turn of {need} tokens "
        f"(agent.history={config.agent.history}); set train.seq_len={need}"
      )
    if config.model.vocab_size < 256:
      raise UserError(
        f"model.vocab_size={config.model.vocab_size}: the agent reads and writes bytes; set "
        "model.vocab_size=256 or more"
      )
    evaluation.selected_tasks(config)  # Unknown task ids are refused before any training.

  @functools.cached_property
  def interface(self) -> Interface:
    return evaluation.interface(self.config)

  def _demos(self, seeds) -> dict[str, np.ndarray]:
    tasks = evaluation.selected_tasks(self.config)
    print(f"fulcrum: agent: planner demonstrations of {len(tasks)} tasks x {len(seeds)} seeds",
          file=sys.stderr)  # fmt: skip
    eps = demos.cached_episodes(tasks, seeds, demos.cache_dir(self.config))
    failed = [f"{e.task}@{e.seed}" for e in eps if not e.success]
    if failed:
      raise RuntimeError(f"the planner failed {failed[:5]}: its demonstrations would be wrong")
    arrays = demos.rows(self.interface, eps)
    arrays.pop("prompt_len", None)
    return arrays

  def example_inputs(self):
    return (jnp.zeros((1, 8), jnp.int32),)

  def train_iterator(self, process_index, process_count):
    t, a = self.config.train, self.config.agent
    arrays = self._demos(range(a.demos_per_task))
    source = grain.MapDataset.source(instruct_pipeline.ArrayRows(arrays))
    fingerprint = {
      "source": f"planner demos {a.env} {a.tasks} x {a.demos_per_task}",
      "history": a.history,
      "rows": len(source),
      "seq_len": t.seq_len,
    }
    return instruct_pipeline.shuffled_batches(
      source, fingerprint, t.batch_size, t.seed, process_index, process_count
    )

  def eval_sets(self, process_index, process_count):
    arrays = self._demos([evaluation.EVAL_SEED])
    b = self.config.train.batch_size
    n = len(arrays["inputs"])
    # Whole batches: the last is filled with repeated rows whose weights are zero.
    rows = np.arange(((n + b - 1) // b) * b)
    arrays["real"] = (rows < n).astype(np.float32)
    arrays = {k: (v if k == "real" else v[rows % n]) for k, v in arrays.items()}
    arrays["weights"] = arrays["weights"] * arrays["real"][:, None]
    batches = [{k: v[i : i + b] for k, v in arrays.items()} for i in range(0, len(rows), b)]
    per_host = b // process_count
    sl = slice(process_index * per_host, (process_index + 1) * per_host)
    return {"": [{k: v[sl] for k, v in batch.items()} for batch in batches]}

  def summary(self):
    a = self.config.agent
    return f"agent ({a.env}, tasks {a.tasks}): planner demos x {a.demos_per_task} seeds"

  def loss(self, outputs, batch):
    return cross_entropy(outputs, batch["targets"], batch["weights"])

  def eval_sums(self, outputs, batch):
    loss, count = cross_entropy(outputs, batch["targets"], batch["weights"])
    right = (jnp.argmax(outputs, -1) == batch["targets"]) | (batch["weights"] == 0)
    return {
      "loss": loss * count,
      "count": count,
      "actions": batch["real"].sum(),
      "actions_right": (right.all(-1) * batch["real"]).sum(),
    }

  def eval_metrics(self, sums):
    return {
      "action_loss": sums["loss"] / max(sums["count"], 1.0),
      "action_accuracy": sums["actions_right"] / max(sums["actions"], 1.0),
    }

  def generative_metrics(self, model, params):
    result = evaluation.evaluate(model, params, self.config)
    out = {"success": result["success"]["overall"], "progress": result["progress"]}
    out["invalid_action_rate"] = result["invalid_action_rate"]
    out["noop_action_rate"] = result["noop_action_rate"]
    for domain, rate in result["success"].items():
      if domain != "overall":
        out[f"success_{domain}"] = rate
    return out


TASK = AgentCloning
