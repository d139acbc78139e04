"""A run's workdir: prepare and lock it for training, load its newest checkpoint, evaluate it,
and find the KV-cache calibration `fulcrum calibrate` saved for it.

A workdir is a local directory or any `etils.epath` URL (`gs://bucket/run`, ...).

  DIR/config.json        the resolved config (written atomically once a run is accepted;
                         checked on every resume)
  DIR/train.lock         held by the running `fulcrum train` (one writer per workdir)
  DIR/metrics.jsonl      one JSON object per logged step (`training/metrics.py`)
  DIR/checkpoints/       orbax checkpoints (`training/checkpoint.py`)
  DIR/kvquant/step_S/    calibrated KV-cache specs (`decode/kv_calibration.py`)
  DIR/attribution/       attribution reports (`attribution/explain.py`)

Decoding, calibration and attribution read a workdir through this module and never import
the trainer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.decode import kv_calibration
from fulcrum.platform.errors import UserError
from fulcrum.platform.files import is_local, write_atomic
from fulcrum.platform.optim.factory import STATE_LAYOUT_KEYS
from fulcrum.platform.training.checkpoint import Checkpointer
from fulcrum.platform.training.experiment import (
  Experiment,
  TrainState,
  build_experiment,
  evaluate_params,
)

log = logging.getLogger("fulcrum")


def resolve(workdir: str | epath.PathLike) -> epath.Path:
  """`workdir` as an absolute epath (local paths expanded; `gs://...` and other URLs kept)."""
  text = os.fspath(workdir).strip() if not isinstance(workdir, epath.Path) else os.fspath(workdir)
  if not text:
    raise UserError("--workdir is empty; pass a directory, e.g. --workdir runs/my_run")
  if "://" in text:
    return epath.Path(text)
  return epath.Path(Path(text).expanduser().absolute())


def read_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
  """The resolved config of a training workdir (UserError when missing or unreadable)."""
  path = resolve(workdir) / "config.json"
  if not path.exists():
    raise UserError(
      f"{path.parent} has no config.json; pass the --workdir of a `fulcrum train` run"
    )
  try:
    text = path.read_text()
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
  try:
    return sections.from_json(text)
  except UserError as e:
    raise UserError(f"{path} is not a usable config ({e})") from None
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    what = "empty" if not text.strip() else f"not valid JSON ({type(e).__name__}: {e})"
    raise UserError(
      f"{path} is {what}; restore it from a backup, or pass the recipe again to `fulcrum train`"
      " (it is rewritten once the checkpoints are checked)"
    ) from None


def _probe_writable(directory: epath.Path) -> None:
  try:
    directory.mkdir(parents=True, exist_ok=True)
    if is_local(directory):  # Unique per process: hosts of one run probe at the same time.
      probe = directory / f".write-test-{socket.gethostname()}-{os.getpid()}"
      probe.write_text("ok")
      probe.unlink()
  except OSError as e:
    raise UserError(
      f"{directory} is not writable ({e.strerror or e}); pass another --workdir"
    ) from None


def prepare(workdir: str | epath.PathLike, config: ml_collections.ConfigDict) -> epath.Path:
  """Creates `workdir` (on every process), checks it is writable and that `config` may run in it.

  Nothing is written that a refused run would leave behind: `accept` writes config.json once
  the checkpoints are checked.
  """
  workdir = resolve(workdir)
  _probe_writable(workdir)
  _probe_writable(workdir / "checkpoints")
  for name in ("config.json", "metrics.jsonl"):
    path = workdir / name
    if is_local(path) and path.exists() and not os.access(os.fspath(path), os.W_OK):
      raise UserError(f"{path} is read-only; make it writable (chmod u+w) or use a new --workdir")
  path = workdir / "config.json"
  if not path.exists():
    return workdir
  try:
    old = read_config(workdir)
  except UserError as e:  # The checkpoints still guard the run: they must fit the config.
    log.warning("%s; it will be rewritten from this run's config", e)
    return workdir
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
  keys = [f"optimizer.{k}" for k in STATE_LAYOUT_KEYS]
  get = config_lib.get
  changed = [
    f"{key}: {get(old, key)!r} -> {get(config, key)!r}"
    for key in keys
    if get(old, key) is not None and get(old, key) != get(config, key)
  ]
  if changed:
    raise UserError(
      f"{workdir} holds a run whose optimizer state has another layout ({'; '.join(changed)});"
      " use a new --workdir or the original settings"
    )
  return workdir


def accept(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (process 0, atomically) once the run in `workdir` is accepted."""
  if jax.process_index() != 0:
    return
  path = workdir / "config.json"
  try:
    write_atomic(path, config_lib.to_json(config))
  except OSError as e:  # Disk full, quota: the old config.json is still whole.
    raise UserError(
      f"could not write {path} ({e.strerror or e}); free space or pass another --workdir"
    ) from None


class Lock:
  """One `fulcrum train` per workdir: `DIR/train.lock`, held for the whole run.

  Locally the lock is an exclusive `flock` on that file: the kernel drops it when the holder
  dies however it dies, so a stale lock never blocks a rerun. The file names its holder (host,
  pid, start) for the refusal message. Only process 0 of a multi-host run takes it; the other
  hosts of the same run share it. On an object store, where there is no locking, the lock is a
  marker object checked at start and removed at exit (a dead holder's marker on this host is
  recovered; one left by another machine must be deleted by hand, as the message says).
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / "train.lock"
    self._fd: int | None = None
    self._marker = False

  def __enter__(self) -> Lock:
    refused = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        refused = e
    if jax.process_count() > 1:  # The other hosts learn it now, rather than hang at the mesh.
      gathered = multihost_utils.process_allgather(np.array(refused is not None))
      if refused is None and bool(np.any(gathered)):
        raise UserError(
          f"process 0 could not take {self.path}; its error says why (another `fulcrum train`"
          " may be running in this workdir)"
        )
    if refused is not None:
      raise refused
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Releases the flock; the file stays (removing it would race).
      self._fd = None
    if self._marker:
      self.path.unlink(missing_ok=True)
      self._marker = False

  def _holder(self) -> dict:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    return {**me, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(me["since"]))}

  def _refuse(self, holder: dict | None) -> UserError:
    who = (
      f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
      if holder
      else "another process"
    )
    return UserError(
      f"{self.path.parent} is in use by another `fulcrum train` ({who}); wait for it to end or "
      "stop it, or pass another --workdir"
    )

  def _read(self) -> dict | None:
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def _acquire(self) -> None:
    if not is_local(self.path):
      self._acquire_marker()
      return
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise self._refuse(self._read()) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._holder()).encode(), 0)
    self._fd = fd

  def _acquire_marker(self) -> None:
    holder = self._read() if self.path.exists() else None
    if holder is not None:
      dead_here = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
      if not dead_here:
        raise self._refuse(holder)
      log.warning("recovered the lock of a run that is gone (pid %s)", holder.get("pid"))
    me = self._holder()
    self.path.write_text(json.dumps(me))
    # Object stores have no create-if-absent here: read back, so of two runs starting together
    # the one whose marker was overwritten sees it and steps back.
    if self._read() != me:
      raise self._refuse(self._read())
    self._marker = True


def _alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


# Tasks whose top-level run is a driver of a sequence of runs, one per iteration, each in
# DIR/iterations/T and told by the key named here what it trains on (unset at the top level).
ITERATED = {"spin": "spin.pairs", "agent_improve": "improve.rollouts"}


def is_iteration_driver(config) -> bool:
  """Whether `config` is an iterated run's top level (its driver's), not one iteration's run."""
  key = ITERATED.get(config.get("task"))
  if key is None:
    return False
  section, field = key.split(".")
  return not config[section][field]


def iteration_dir(workdir: epath.Path, t: int) -> epath.Path:
  """Where an iterated run trains iteration t."""
  return epath.Path(workdir) / "iterations" / str(t)


def checkpointed_run(workdir: str | epath.PathLike) -> epath.Path:
  """The workdir whose checkpoints stand for `workdir`: itself, or for an iterated run (SPIN, an
  agent's policy-gradient rounds: each iteration trains in DIR/iterations/T) its newest
  iteration."""
  workdir = resolve(workdir)
  config = read_config(workdir)
  if not is_iteration_driver(config):
    return workdir
  runs = workdir / "iterations"
  found = sorted(
    (int(p.name), p) for p in (runs.iterdir() if runs.exists() else ()) if p.name.isdigit()
  )
  found = [p for _, p in found if (p / "config.json").exists()]
  if not found:
    raise UserError(f"{workdir} is an iterated run with no iteration trained yet; run it first")
  return found[-1]


def load(workdir: str | epath.PathLike, devices=None) -> tuple[Experiment, TrainState, int]:
  """The experiment and newest train state saved in a training workdir (a SPIN run: its
  newest iteration's)."""
  workdir = checkpointed_run(workdir)
  exp = build_experiment(read_config(workdir), devices)
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    restored = ckpt.restore_latest(exp.abstract_state, read_only=True)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint; train first")
  step, state, _ = restored
  return exp, state, step


def evaluate(workdir: str | Path) -> dict[str, float]:
  """Validation metrics of the newest checkpoint in a training workdir."""
  exp, state, step = load(workdir)
  eval_sets = exp.task.eval_sets(jax.process_index(), jax.process_count())
  return {"step": step, **evaluate_params(exp, state.params, eval_sets)}


def kv_cache_specs(workdir: str | Path, model, step: int, method: str, bits: int) -> Any:
  """The KV-cache specs `fulcrum calibrate` saved for this checkpoint (UserError when missing)."""
  path = kv_calibration.spec_path(workdir, step, method, bits)
  if not path.exists():
    raise UserError(
      f"no {method} {bits}-bit KV-cache calibration for step {step} in {workdir}; run "
      f"`fulcrum calibrate --workdir {workdir} --method {method} --bits {bits}` first"
    )
  try:
    return kv_calibration.load(path, model)[0]
  except (ValueError, KeyError, OSError) as e:
    raise UserError(f"{path} is unreadable ({e}); rerun `fulcrum calibrate`") from None


def calibrate(
  workdir: str | Path,
  method: str | None = None,
  bits: int | None = None,
  num_batches: int | None = None,
) -> dict[str, Any]:
  """Fits KV-cache specs for a workdir's newest checkpoint on its training data and saves them.

  Defaults come from the workdir's `decode.*` config (kvquant when `decode.kv_cache` is none).
  Returns the summary of `kv_calibration.calibrate_experiment`.
  """
  exp, state, step = load(workdir)
  return kv_calibration.calibrate_experiment(
    exp, state.params, step, workdir, method=method, bits=bits, num_batches=num_batches
  )
