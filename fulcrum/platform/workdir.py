"""A run's workdir: prepare it for training, load its newest checkpoint, evaluate it, and find
the KV-cache calibration `fulcrum calibrate` saved for it.

  DIR/config.json        the resolved config (written atomically; checked on every resume)
  DIR/metrics.jsonl      one JSON object per logged step (`training/metrics.py`)
  DIR/checkpoints/       orbax checkpoints (`training/checkpoint.py`)
  DIR/kvquant/step_S/    calibrated KV-cache specs (`decode/kv_calibration.py`)
  DIR/attribution/       attribution reports (`attribution/explain.py`)

Decoding, calibration and attribution read a workdir through this module and never import
the trainer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections

from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.decode import kv_calibration
from fulcrum.platform.errors import UserError
from fulcrum.platform.optim.factory import STATE_LAYOUT_KEYS
from fulcrum.platform.training.checkpoint import Checkpointer
from fulcrum.platform.training.experiment import (
  Experiment,
  TrainState,
  build_experiment,
  evaluate_params,
)


def write_atomic(path: Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: never half a file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The resolved config of a training workdir (UserError when it has none)."""
  path = Path(workdir).expanduser().absolute() / "config.json"
  if not path.exists():
    raise UserError(
      f"{path.parent} has no config.json; pass the --workdir of a `fulcrum train` run"
    )
  return sections.from_json(path.read_text())


def prepare(workdir: str | Path, config: ml_collections.ConfigDict) -> Path:
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
    old = read_config(workdir)
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
  if jax.process_index() == 0:
    try:
      write_atomic(path, config_lib.to_json(config))
    except OSError as e:  # Disk full, quota: the old config.json is still whole.
      raise UserError(
        f"could not write {path} ({e.strerror or e}); free space or pass another --workdir"
      ) from None
  return workdir


def load(workdir: str | Path, devices=None) -> tuple[Experiment, TrainState, int]:
  """The experiment and newest train state saved in a training workdir."""
  workdir = Path(workdir).expanduser().absolute()
  exp = build_experiment(read_config(workdir), devices)
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
