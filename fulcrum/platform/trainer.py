"""The trainer: train state, a pure jitted train step, the eval loop and the training loop.

`train(config, workdir)` builds data, model, optimizer and mesh from a recipe config, resumes
from the newest checkpoint in `workdir` if there is one, and trains to `train.steps`, writing
`config.json`, `metrics.jsonl`, TensorBoard events and orbax checkpoints into `workdir`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from fulcrum import modules
from fulcrum.platform import config as config_lib
from fulcrum.platform import sharding
from fulcrum.platform.checkpoint import Checkpointer
from fulcrum.platform.errors import UserError
from fulcrum.platform.metrics import MetricsWriter, progress_bar
from fulcrum.platform.optim import make_optimizer
from fulcrum.platform.tasks import Task, get_task

log = logging.getLogger("fulcrum")
LN2 = math.log(2.0)


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
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh(config.mesh, devices)
  boxed = jax.eval_shape(_state_init_fn(model, tx, task), jax.random.PRNGKey(0))
  state_sharding = sharding.logical_sharding(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.unbox(boxed),
    state_sharding,
  )
  return Experiment(config, task, model, tx, schedule, mesh, abstract, state_sharding)


def make_train_step(exp: Experiment):
  """The pure train step `(state, batch) -> (state, metrics)`: grads (accumulated over
  `train.grad_accum_steps` micro-batches), clipping + optimizer update, and a skipped update
  when the loss or gradients are not finite."""
  model, tx, schedule, task = exp.model, exp.tx, exp.schedule, exp.task
  accum = exp.config.train.grad_accum_steps

  def loss_fn(params, batch, rng):
    outputs = model.apply({"params": params}, *task.model_inputs(batch), rngs={"dropout": rng})
    return task.loss(outputs, batch)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      (loss, _), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
      micro = jax.lax.with_sharding_constraint(
        micro, jax.sharding.PartitionSpec(None, ("data", "fsdp"))
      )

      def body(carry, mb):
        (loss, _), g = grad_fn(state.params, mb, rng)
        return jax.tree.map(jnp.add, carry, (loss, g)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zeros, micro)
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state.step),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(state.params),
      "update_norm": optax.tree.norm(updates),
      "nonfinite_skipped": new_state.nonfinite_total,
      "nonfinite_run": new_state.nonfinite_run,
    }
    return new_state, metrics

  return train_step


def jit_train_step(exp: Experiment):
  """The train step jitted with the state donated and its shardings fixed (no recompiles)."""
  return jax.jit(
    make_train_step(exp),
    in_shardings=(exp.state_sharding, sharding.batch_sharding(exp.mesh)),
    out_shardings=(exp.state_sharding, None),
    donate_argnums=(0,),
  )


def make_eval_step(exp: Experiment):
  """`(params, batch) -> additive statistics` (the task's `eval_sums`)."""

  def eval_step(params, batch):
    outputs = exp.model.apply({"params": params}, *exp.task.model_inputs(batch))
    return exp.task.eval_sums(outputs, batch)

  return eval_step


def _global_batch(exp: Experiment, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
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
        for key, value in jax.device_get(step(params, _global_batch(exp, batch))).items():
          sums[key] = sums.get(key, 0.0) + float(value)
      suffix = f"_{set_name}" if set_name else ""
      for key, value in exp.task.eval_metrics(sums).items():
        out[f"eval/{key}{suffix}"] = value
  return out


def eval_summary(metrics: dict[str, Any]) -> str:
  """A one-line rendering of the `eval/` metrics."""
  return ", ".join(
    f"{k.removeprefix('eval/')} {v:.4g}"
    for k, v in metrics.items()
    if k.startswith("eval/") and isinstance(v, float)
  )


# Settings that change the optimizer state's shapes: a run's checkpoints cannot resume under
# other values (the learning rate, weight decay or GaLore's gap and scale may change).
OPTIMIZER_STATE_KEYS = (
  "optimizer.name",
  "optimizer.galore.rank",
  "optimizer.galore.side",
  "optimizer.quant.block_size",
  "optimizer.quant.min_size",
)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict) -> Path:
  """Creates `workdir`, checks it is writable and consistent with `config`, writes config.json."""
  workdir = Path(workdir).expanduser().absolute()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write-test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(
      f"workdir {workdir} is not writable ({e.strerror}); pass another --workdir"
    ) from None
  path = workdir / "config.json"
  if path.exists():
    old = config_lib.from_json(path.read_text())
    changed = [
      f"model.{k}: {old.model[k]!r} -> {config.model[k]!r}"
      for k in config.model
      if k in old.model and old.model[k] != config.model[k]
    ]
    if changed:
      raise UserError(
        f"{workdir} holds a run with a different model ({'; '.join(changed)}); "
        "use a new --workdir or the original settings"
      )
    changed = [
      f"{key}: {_get(old, key)!r} -> {_get(config, key)!r}"
      for key in OPTIMIZER_STATE_KEYS
      if _get(old, key) is not None and _get(old, key) != _get(config, key)
    ]
    if changed:
      raise UserError(
        f"{workdir} holds a run whose optimizer state has another layout ({'; '.join(changed)});"
        " use a new --workdir or the original settings"
      )
  if jax.process_index() == 0:
    path.write_text(config_lib.to_json(config))
  return workdir


class _StopSignal:
  """Turns SIGTERM (preemption) and a first Ctrl-C into a flag checked between steps.

  The loop then saves a checkpoint and returns; a second Ctrl-C interrupts at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    try:
      self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    except ValueError:  # Not the main thread: leave signals alone.
      self._old = {}
    return self

  def _handle(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir` up to `train.steps`; returns the last metrics."""
  config_lib.validate(config)
  sharding.maybe_initialize_distributed()
  workdir = prepare_workdir(workdir, config)
  t = config.train
  exp = build_experiment(config)
  dp = sharding.data_parallel_size(exp.mesh)
  if t.batch_size % dp:
    raise UserError(
      f"train.batch_size={t.batch_size} must divide by the {dp} data-parallel "
      "devices; change the batch size or mesh.*"
    )

  hosts = (jax.process_index(), jax.process_count())
  train_iter = exp.task.train_iterator(*hosts)
  eval_batches = exp.task.eval_sets(*hosts)
  log.info("data: %s", exp.task.summary())

  ckpt = Checkpointer(
    workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing
  )
  restored = ckpt.restore_latest(exp.abstract_state)
  if restored is None:
    state, start = exp.init_state(), 0
  else:
    start, state, data_state = restored
    if data_state:
      train_iter.set_state(data_state)
    log.info("resumed from step %d in %s", start, ckpt.directory)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info(
    "model: %s, %.2fM parameters; mesh %s", config.model.arch, n_params / 1e6, dict(exp.mesh.shape)
  )
  writer = MetricsWriter(workdir, resume_step=start)
  train_step = jit_train_step(exp)
  eval_step = jax.jit(make_eval_step(exp))
  tokens_per_step = t.batch_size * t.seq_len
  last: dict[str, Any] = {}
  bar = progress_bar(t.steps, start, t.progress)
  interval_start, interval_steps = time.perf_counter(), 0
  pending_check = None
  step = start
  try:
    with _StopSignal() as stop:
      while step < t.steps:
        batch = _global_batch(exp, next(train_iter))
        with exp.activate():
          state, metrics = train_step(state, batch)
        step += 1
        interval_steps += 1
        # Check the previous step's counter, so the host never waits on the step in flight.
        if pending_check is not None and int(pending_check) >= t.max_nan_steps:
          raise FloatingPointError(
            f"{int(pending_check)} consecutive steps had a non-finite loss or gradient "
            f"(at step {step - 1}); lower optimizer.learning_rate or use model.dtype=float32"
          )
        pending_check = metrics.pop("nonfinite_run")
        if step % t.log_every == 0 or step == t.steps:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - interval_start
          metrics["tokens_per_s"] = interval_steps * tokens_per_step / max(elapsed, 1e-9)
          metrics["step_time_s"] = elapsed / interval_steps
          writer.write(step, metrics)
          bar.set_postfix(
            loss=f"{float(metrics['loss']):.3f}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            refresh=False,
          )
          last.update(metrics)
          interval_start, interval_steps = time.perf_counter(), 0
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          ev = evaluate_params(exp, state.params, eval_batches, eval_step)
          writer.write(step, ev)
          last.update(ev)
          bar.write(f"step {step}: {eval_summary(ev)}")
          interval_start = time.perf_counter()
        bar.update(1)
        if step % t.checkpoint_every == 0 or step == t.steps or stop.received:
          ckpt.save(step, state, train_iter.get_state(), force=True)
        if stop.received:
          ckpt.wait()
          log.warning(
            "%s: saved a checkpoint at step %d; rerun the same command to resume",
            stop.received,
            step,
          )
          last["preempted"] = True
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  if pending_check is not None and int(pending_check) >= t.max_nan_steps:
    raise FloatingPointError(
      f"{int(pending_check)} consecutive non-finite steps at the end "
      "of training; lower optimizer.learning_rate"
    )
  if step == start and not last:  # Already trained to train.steps: report where it stands.
    log.info(
      "%s is already trained to step %d (train.steps); raise train.steps to continue", workdir, step
    )
    last.update(evaluate_params(exp, state.params, eval_batches, eval_step))
  last["step"] = step
  last["workdir"] = str(workdir)
  return last


def load_workdir(workdir: str | Path, devices=None) -> tuple[Experiment, TrainState, int]:
  """The experiment and newest train state saved in a training workdir."""
  workdir = Path(workdir).expanduser().absolute()
  path = workdir / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} has no config.json; pass the --workdir of a `fulcrum train` run")
  config = config_lib.from_json(path.read_text())
  exp = build_experiment(config, devices)
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    restored = ckpt.restore_latest(exp.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint; train first")
  step, state, _ = restored
  return exp, state, step


def evaluate(workdir: str | Path) -> dict[str, float]:
  """Validation metrics of the newest checkpoint in a training workdir."""
  exp, state, step = load_workdir(workdir)
  eval_sets = exp.task.eval_sets(jax.process_index(), jax.process_count())
  return {"step": step, **evaluate_params(exp, state.params, eval_sets)}
