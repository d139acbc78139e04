"""Where training metrics go: `metrics.jsonl`, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep the row valid.
  return value


class MetricsWriter:
  """Appends one JSON object per logged step to `DIR/metrics.jsonl` and mirrors it to TensorBoard.

  Only process 0 writes. On resume, rows past the restored step (logged after the last
  checkpoint by the interrupted run) are dropped so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: Path, *, resume_step: int = 0, tensorboard: bool = True):
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():
      rows = [r for r in self.path.read_text().splitlines() if r.strip()]
      kept = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
      self.path.write_text("".join(r + "\n" for r in kept))
    self._file = self.path.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self.tensorboard_dir = workdir / "tensorboard"
      self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


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
