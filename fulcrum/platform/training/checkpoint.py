"""Checkpoints with orbax: periodic async saves, keep-last-K, resume, and corrupt fallback.

A checkpoint holds two items: `state` (the train-state pytree: params, optimizer state, step,
rng, counters) and `data` (the grain iterator's JSON state), so that a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fulcrum.platform.errors import UserError

log = logging.getLogger("fulcrum")


class Checkpointer:
  """Wraps an orbax `CheckpointManager` over `DIR/checkpoints`."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._keep, self._async = keep, async_save
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self._keep, create=True, enable_async_checkpointing=self._async
    )
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
    """Starts saving (in the background when async); `wait()` blocks until it is durable."""
    args = {"state": ocp.args.StandardSave(state)}
    args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
    self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint, or None when there is none.

    A checkpoint that fails to restore (truncated, partially deleted) is moved aside to
    `checkpoints/corrupt-STEP-TIME` with a warning — never deleted — and the previous one is
    tried. Raises `UserError` when checkpoints exist but none can be read.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
        return step, restored["state"], dict(restored["data"] or {})
      except Exception as e:  # orbax raises many types for unreadable files.
        aside = self.directory / f"corrupt-{step}-{int(time.time())}"
        log.warning(
          "checkpoint at step %d is unreadable (%s: %s); moved to %s, trying an earlier one",
          step,
          type(e).__name__,
          str(e)[:200],
          aside,
        )
        if jax.process_index() == 0:
          (self.directory / str(step)).rename(aside)
        self._manager.close()
        self._manager = self._open()
    if steps:
      raise UserError(
        f"no checkpoint in {self.directory} could be read (moved aside as corrupt-*); "
        "rerun to start fresh, or restore them from a backup"
      )
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
