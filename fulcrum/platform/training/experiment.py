"""An experiment: the task, model, optimizer, mesh and sharded train state a config describes.

`build_experiment(config)` is what training, evaluation, decoding and attribution share; the
trainer (`trainer.py`) runs its train step, `fulcrum.platform.workdir` restores it from a
workdir. `evaluate_params` runs the task's metrics over eval batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from fulcrum import modules
from fulcrum.platform.optim import lora, make_optimizer
from fulcrum.platform.training import sharding
from fulcrum.platform.training.tasks import Task, get_task


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 []: optimizer steps taken (skipped non-finite ones included).
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2]: base key; step keys are fold_in(rng, step).
  nonfinite_run: jax.Array  # int32 []: consecutive skipped (non-finite) updates.
  nonfinite_total: jax.Array  # int32 []: all skipped updates.


@dataclasses.dataclass
class Experiment:
  """Everything built from a config that train, eval and decode share."""

  config: ml_collections.ConfigDict
  task: Task
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # ShapeDtypeStructs with shardings attached.
  state_sharding: TrainState

  def init_state(self) -> TrainState:
    """Fresh parameters and optimizer state, created already sharded."""
    init = _state_init_fn(self.model, self.tx, self.task)
    with self.activate():
      return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=self.state_sharding)(
        jax.random.PRNGKey(self.config.train.seed)
      )

  def activate(self):
    """Context under which modules' logical constraints resolve against this mesh."""
    return _MeshContext(self.mesh)


class _MeshContext:
  def __init__(self, mesh):
    self.mesh = mesh

  def __enter__(self):
    self._stack = [jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES)]
    for ctx in self._stack:
      ctx.__enter__()

  def __exit__(self, *exc):
    for ctx in reversed(self._stack):
      ctx.__exit__(*exc)


def _state_init_fn(model, tx, task: Task):
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, *task.example_inputs())["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
      nonfinite_run=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
    )

  return init


def build_experiment(config: ml_collections.ConfigDict, devices=None) -> Experiment:
  """Model, optimizer, mesh and the abstract (sharded) train state for a validated config."""
  task = get_task(config)
  model = modules.build(config.model)
  trainable = lora.trainable_mask if config.model.lora_rank else None  # LoRA: adapters only.
  tx, schedule = make_optimizer(config.optimizer, config.train.steps, trainable)
  mesh = sharding.make_mesh(config.mesh, devices)
  boxed = jax.eval_shape(_state_init_fn(model, tx, task), jax.random.PRNGKey(0))
  state_sharding = sharding.logical_sharding(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.unbox(boxed),
    state_sharding,
  )
  return Experiment(config, task, model, tx, schedule, mesh, abstract, state_sharding)


def make_eval_step(exp: Experiment):
  """`(params, batch) -> additive statistics` (the task's `eval_sums`)."""

  def eval_step(params, batch):
    outputs = exp.model.apply({"params": params}, *exp.task.model_inputs(batch))
    return exp.task.eval_sums(outputs, batch)

  return eval_step


def global_batch(exp: Experiment, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local numpy batches → one global array per key, sharded over data and fsdp."""
  spec = sharding.batch_sharding(exp.mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(v)) for k, v in local.items()}


def evaluate_params(exp: Experiment, params, eval_sets, eval_step=None) -> dict[str, float]:
  """The task's eval metrics over each named eval set, as `eval/NAME[_SET]` keys."""
  step = eval_step or jax.jit(make_eval_step(exp))
  out: dict[str, float] = {}
  with exp.activate():
    for set_name, batches in eval_sets.items():
      sums: dict[str, float] = {}
      for batch in batches:
        for key, value in jax.device_get(step(params, global_batch(exp, batch))).items():
          sums[key] = sums.get(key, 0.0) + float(value)
      suffix = f"_{set_name}" if set_name else ""
      for key, value in exp.task.eval_metrics(sums).items():
        out[f"eval/{key}{suffix}"] = value
    for key, value in exp.task.generative_metrics(exp.model, params).items():
      out[f"eval/{key}"] = value
  return out


def eval_summary(metrics: dict[str, Any]) -> str:
  """A one-line rendering of the `eval/` metrics."""
  return ", ".join(
    f"{k.removeprefix('eval/')} {v:.4g}"
    for k, v in metrics.items()
    if k.startswith("eval/") and isinstance(v, float)
  )
