"""The trainer: a pure jitted train step and the training loop.

`train(config, workdir)` builds data, model, optimizer and mesh from a recipe config, resumes
from the newest checkpoint in `workdir` if there is one, and trains to `train.steps`, writing
`config.json`, `metrics.jsonl`, TensorBoard events and orbax checkpoints into `workdir`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.optim import lora
from fulcrum.platform.training import init_from, sharding, telemetry
from fulcrum.platform.training.checkpoint import Checkpointer
from fulcrum.platform.training.experiment import (
  Experiment,
  TrainState,
  build_experiment,
  eval_summary,
  evaluate_params,
  global_batch,
  make_eval_step,
)
from fulcrum.platform.training.metrics import MetricsWriter, progress_bar

log = logging.getLogger("fulcrum")


def make_train_step(exp: Experiment):
  """The pure train step `(state, batch) -> (state, metrics)`: grads (accumulated over
  `train.grad_accum_steps` micro-batches), clipping + optimizer update, and a skipped update
  when the loss or gradients are not finite."""
  model, tx, schedule, task = exp.model, exp.tx, exp.schedule, exp.task
  accum = exp.config.train.grad_accum_steps

  lora_only = exp.config.model.lora_rank > 0

  def loss_fn(params, batch, rng):
    if lora_only:  # Frozen base weights: no gradient is computed for them (zeros), only adapters'.
      frozen = lambda p, train: p if train else jax.lax.stop_gradient(p)
      params = jax.tree.map(frozen, params, lora.trainable_mask(params))
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
    update_norm = optax.tree.norm(updates)
    # Which of loss, gradients, update (or the new parameters) went non-finite first.
    checks = (loss, grad_norm, update_norm + optax.tree.norm(params))
    cause = jnp.int32(0)
    for code, value in reversed(list(enumerate(checks, start=1))):
      cause = jnp.where(jnp.isfinite(value), cause, code)
    finite = cause == 0
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
      "update_norm": update_norm,
      "nonfinite_skipped": new_state.nonfinite_total,
      "nonfinite_run": new_state.nonfinite_run,
      "nonfinite_cause": cause,
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


class StopSignal:
  """Turns SIGTERM (preemption) and a first Ctrl-C into a stop that every host agrees on.

  The loop asks `agreed(step)` after each step; when it says yes, every host saves a checkpoint
  at that same step and returns. On one host that is the signal flag. On several, SIGTERM is
  left to JAX's preemption notifier, which tells every host through the coordination service,
  and `jax.experimental.multihost_utils.reached_preemption_sync_point` picks the common step;
  a Ctrl-C is forwarded to it as a SIGTERM. A second Ctrl-C exits at once (status 130).
  """

  def __init__(self):
    self.received: str | None = None
    self._old: dict[int, Any] = {}
    self._hosts = jax.process_count()

  def __enter__(self):
    signals = (signal.SIGINT,) if self._hosts > 1 else (signal.SIGTERM, signal.SIGINT)
    try:
      self._old = {sig: signal.signal(sig, self._handle) for sig in signals}
    except ValueError:  # Not the main thread: leave signals alone.
      self._old = {}
    return self

  def _handle(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      # Leave now, without unwinding through orbax's save threads (a traceback, or a crash at
      # interpreter exit). A save cut short is never committed: resume takes the last whole one.
      sys.stderr.write("fulcrum: interrupted again; stopped without saving (rerun to resume)\n")
      sys.stderr.flush()
      os._exit(130)
    self.received = signal.Signals(signum).name
    if self._hosts > 1:
      os.kill(os.getpid(), signal.SIGTERM)

  def agreed(self, step: int) -> bool:
    """Whether every host stops after `step`."""
    if self._hosts == 1:
      return self.received is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or "SIGTERM"
      return True
    return False

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _diverged(run: int, cause: int, step: int, config: ml_collections.ConfigDict) -> Exception:
  """The error for `run` consecutive skipped steps, naming what went non-finite."""
  opt = config.optimizer
  why = {
    1: "the loss was not finite; lower optimizer.learning_rate or use model.dtype=float32",
    2: "the gradients were not finite while the loss was; lower optimizer.learning_rate, "
    "set optimizer.clip_norm, or use model.dtype=float32",
    3: "the optimizer update was not finite while the loss and gradients were; check the "
    f"optimizer settings (optimizer.learning_rate={opt.learning_rate}, "
    f"optimizer.eps={opt.get('eps')})",
  }.get(cause, "a value was not finite")
  return FloatingPointError(f"{run} consecutive steps were skipped (at step {step}): {why}")


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir` up to `train.steps`; returns the last metrics.

  The workdir is locked for the run; config.json is written once the checkpoints are checked.
  """
  return run(config, workdir)[0]


def run(
  config: ml_collections.ConfigDict, workdir: str | Path, *, initial_params: Any = None
) -> tuple[dict[str, Any], TrainState]:
  """`train`, returning the final train state too (SPIN generates from it next).

  Args:
    initial_params: parameters (in memory, e.g. the previous SPIN iteration's) that a run with
      no checkpoint yet starts from, instead of a fresh init; a resumed run ignores them.
  """
  config = init_from.resolve_config(config, workdir)  # model.* of train.init_from's source.
  sections.validate(config)
  sharding.maybe_initialize_distributed()
  workdir = workdir_lib.prepare(workdir, config)
  with workdir_lib.Lock(workdir):
    return _run(config, workdir, initial_params)


def _run(config: ml_collections.ConfigDict, workdir, initial_params) -> tuple[dict, TrainState]:
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
  log.info("devices: %s", telemetry.describe_devices())
  log.info("data: %s", exp.task.summary())

  ckpt = Checkpointer(
    workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing
  )
  try:
    restored = ckpt.restore_latest(exp.abstract_state)
    if restored is None:
      state, start = exp.init_state(), 0
      if initial_params is not None:
        # The optimizer state stays as initialised: it depends on shapes only (zero moments).
        params = init_from.with_fresh_adapters(
          initial_params, state.params, exp.abstract_state.params, "the given parameters"
        )
        state = state.replace(params=jax.device_put(params, exp.state_sharding.params))
      else:
        state = init_from.initial_state(config, exp, state)  # train.init_from's params, if any.
    else:
      start, state, data_state = restored
      if data_state is not None:  # None: a checkpoint from before per-process data states.
        train_iter.set_state(data_state)
      ckpt.last_saved = start
      log.info("resumed from step %d in %s", start, ckpt.directory)
    workdir_lib.accept(workdir, config)
    writer = MetricsWriter(workdir, resume_step=start, config=config)
  except BaseException:
    ckpt.close()
    raise

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  trained = f" ({lora.adapter_count(state.params) / 1e6:.3f}M LoRA adapters trained)"
  log.info(
    "model: %s, %.2fM parameters%s; mesh %s",
    config.model.arch,
    n_params / 1e6,
    trained if config.model.lora_rank else "",
    dict(exp.mesh.shape),
  )
  train_step = jit_train_step(exp)
  eval_step = jax.jit(make_eval_step(exp))
  tokens_per_step = t.batch_size * t.seq_len
  last: dict[str, Any] = {}
  bar = progress_bar(t.steps, start, t.progress)
  interval_start, interval_steps = time.perf_counter(), 0
  loss_mean, utilisation = telemetry.IntervalMean(), telemetry.Utilisation()
  profiler = telemetry.Profiler(t.profile_steps, workdir / "profile")
  profiler.at(start, state)
  pending_check = None
  step = start
  try:
    with StopSignal() as stop:
      while step < t.steps:
        batch = global_batch(exp, next(train_iter))
        with exp.activate():
          state, metrics = train_step(state, batch)
        step += 1
        interval_steps += 1
        loss_mean.add(metrics["loss"])
        profiler.at(step, state)
        # Check the previous step's counter, so the host never waits on the step in flight.
        if pending_check is not None and int(pending_check[0]) >= t.max_nan_steps:
          raise _diverged(int(pending_check[0]), int(pending_check[1]), step - 1, config)
        pending_check = (metrics.pop("nonfinite_run"), metrics.pop("nonfinite_cause"))
        if step % t.log_every == 0 or step == t.steps:
          metrics = jax.device_get(metrics)
          metrics["loss"] = loss_mean.pop()  # The interval's mean, not its last step's.
          elapsed = time.perf_counter() - interval_start
          metrics["tokens_per_s"] = interval_steps * tokens_per_step / max(elapsed, 1e-9)
          metrics["step_time_s"] = elapsed / interval_steps
          with exp.activate():
            metrics.update(utilisation.row(interval_steps, elapsed, train_step, state, batch))
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
        stopping = stop.agreed(step)
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
          ckpt.save(step, state, train_iter.get_state(), force=True)
        if stopping:
          ckpt.wait()
          log.warning(
            "%s: saved a checkpoint at step %d; rerun the same command to resume",
            stop.received,
            step,
          )
          last["preempted"] = True
          break
      ckpt.wait()  # A failed background save stops the run here, not silently.
  finally:
    profiler.close()
    bar.close()
    ckpt.close()
    writer.close()
  if pending_check is not None and int(pending_check[0]) >= t.max_nan_steps:
    raise _diverged(int(pending_check[0]), int(pending_check[1]), step, config)
  if step == start and not last:  # Already trained to train.steps: report where it stands.
    log.info(
      "%s is already trained to step %d (train.steps); raise train.steps to continue", workdir, step
    )
    last.update(evaluate_params(exp, state.params, eval_batches, eval_step))
  last["step"] = step
  last["workdir"] = str(workdir)
  return last, state
