"""Where training metrics go: `metrics.jsonl`, TensorBoard, Weights & Biases and a progress bar.

Owns the `log.*` config section (which optional sinks a run writes to besides metrics.jsonl).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import uuid
from typing import Any

import jax
import ml_collections
from etils import epath
from tqdm.auto import tqdm

from fulcrum.platform import files
from fulcrum.platform.errors import UserError

log = logging.getLogger("fulcrum")

TENSORBOARD_INSTALL = "pip install 'fulcrum[tensorboard]'"
WANDB_INSTALL = "pip install 'fulcrum[wandb]'"


def config_defaults() -> ml_collections.ConfigDict:
  """Every `log.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.tensorboard = True  # TensorBoard events in WORKDIR/tensorboard (needs fulcrum[tensorboard]).
  c.wandb = False  # Also log to Weights & Biases (needs fulcrum[wandb]; WANDB_MODE=offline works).
  c.wandb_project = "fulcrum"  # The W&B project of the run (its name is the workdir's name).
  return c


def validate_config(section: ml_collections.ConfigDict) -> None:
  """Checks the `log.*` section; raises ValueError naming the fix."""
  if section.wandb and not section.wandb_project.strip():
    raise ValueError("log.wandb_project is empty; name a W&B project or set log.wandb=false")


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep the row valid.
  return value


def resumed_lines(data: bytes, resume_step: int, name: str = "metrics.jsonl") -> bytes:
  """What a run resumed at `resume_step` keeps of its metrics file: the rows up to that step.

  A last line that is not JSON is the torn tail of an append the killed run never finished:
  it is dropped with a warning. A line elsewhere that is not JSON was not written by an
  interrupted append; it is kept as it is (with a warning), since its step is unknown.
  """
  lines = [line for line in data.split(b"\n") if line.strip()]
  kept = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
      step = row.get("step", 0)
    except (ValueError, AttributeError):  # Not JSON, not UTF-8, or not an object.
      if i == len(lines) - 1:
        log.warning("%s: dropped a torn last line (the run was killed while writing it)", name)
      else:
        log.warning("%s: line %d is not a JSON row; kept as it is", name, i + 1)
        kept.append(line)
      continue
    if not isinstance(step, (int, float)) or step <= resume_step:
      kept.append(line)
  return b"".join(line + b"\n" for line in kept)


class MetricsWriter:
  """Appends one JSON object per logged step to `DIR/metrics.jsonl` and mirrors it to
  TensorBoard and Weights & Biases (`log.*`).

  Only process 0 writes. On resume, rows past the restored step (logged after the last
  checkpoint by the interrupted run) are dropped, atomically, so the file reads as one
  uninterrupted run. A file that cannot be written is a `UserError` before training starts.
  """

  def __init__(
    self,
    workdir: epath.PathLike,
    *,
    resume_step: int = 0,
    config: ml_collections.ConfigDict | None = None,
  ):
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.tensorboard_dir: epath.Path | None = None
    self._tb = self._wandb = self._file = None
    self._remote: list[bytes] | None = None
    if not self.enabled:
      return
    options = config.log if config is not None and "log" in config else config_defaults()
    self._open(resume_step)
    try:
      if options.tensorboard:
        self._tb = self._start_tensorboard(workdir, resume_step)
      if options.wandb:
        self._wandb = _start_wandb(workdir, options, config, resume_step)
    except BaseException:
      self.close()
      raise

  def _open(self, resume_step: int) -> None:
    try:
      old = self.path.read_bytes() if self.path.exists() else b""
      kept = resumed_lines(old, resume_step, str(self.path))
      if kept != old:
        files.write_atomic(self.path, kept)
      if files.is_local(self.path):
        self._file = self.path.open("ab")  # Closed in close().
      else:  # Object stores cannot append: each write uploads the whole file.
        self._remote = [kept]
    except OSError as e:
      raise UserError(
        f"cannot write {self.path} ({e.strerror or e}); make it writable (chmod u+w) or pass "
        "another --workdir"
      ) from None

  def _start_tensorboard(self, workdir: epath.Path, resume_step: int):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      log.warning(
        "TensorBoard logging is off: tensorboardX is not installed (%s)", TENSORBOARD_INSTALL
      )
      return None
    self.tensorboard_dir = workdir / "tensorboard"
    return SummaryWriter(os.fspath(self.tensorboard_dir), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    line = json.dumps(row).encode() + b"\n"
    try:
      if self._remote is not None:
        self._remote.append(line)
        files.write_atomic(self.path, b"".join(self._remote))
      else:
        self._file.write(line)
        self._file.flush()
    except OSError as e:
      raise UserError(
        f"could not append to {self.path} ({e.strerror or e}); free space or pass another "
        "--workdir, then rerun the same command to resume"
      ) from None
    scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _start_wandb(workdir: epath.Path, options, config, resume_step: int):
  """A W&B run for this workdir: the same run again on resume (its id is kept in the workdir)."""
  try:
    import wandb
  except ImportError:
    raise UserError(
      f"log.wandb=true needs Weights & Biases: {WANDB_INSTALL} (or --set log.wandb=false)"
    ) from None
  id_path = workdir / "wandb_run_id"
  run_id = id_path.read_text().strip() if resume_step and id_path.exists() else ""
  if not run_id:
    run_id = uuid.uuid4().hex[:16]
    files.write_atomic(id_path, run_id + "\n")
  try:
    return wandb.init(
      project=options.wandb_project,
      name=workdir.name,
      id=run_id,
      resume="allow",
      dir=os.fspath(workdir) if files.is_local(workdir) else None,
      config=config.to_dict() if config is not None else None,
      settings=wandb.Settings(console="off"),  # Leave stdout/stderr (the progress bar) alone.
    )
  except Exception as e:  # wandb raises its own types (no login, no network, bad project).
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"Weights & Biases did not start ({first}); run `wandb login`, set WANDB_MODE=offline, "
      "or --set log.wandb=false"
    ) from None


def tensorboard_command(workdir: epath.PathLike) -> str:
  """How to look at a run's TensorBoard events, or how to get them (for `fulcrum train`)."""
  directory = epath.Path(workdir) / "tensorboard"
  if not directory.exists():
    if importlib.util.find_spec("tensorboardX") is None:
      return f"not written; {TENSORBOARD_INSTALL} and rerun to log events"
    return "not written (log.tensorboard=false)"
  command = f"tensorboard --logdir {directory}"
  if importlib.util.find_spec("tensorboard") is None:
    return f"{command}  (first: {TENSORBOARD_INSTALL})"
  return command


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
  """A training progress bar on stderr (off on hosts other than 0 or when disabled)."""
  return tqdm(
    total=total,
    initial=initial,
    disable=not enabled or jax.process_index() != 0,
    unit="step",
    dynamic_ncols=True,
    file=sys.stderr,
    mininterval=1.0,
    leave=True,
  )
