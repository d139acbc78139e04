"""Checkpoints with orbax: periodic async saves, keep-last-K, verified restores, corrupt fallback.

A checkpoint `checkpoints/STEP/` holds two items:

  state/   the train-state pytree (params, optimizer state, step, rng, counters), orbax arrays
  data/    one file per process, `process_I-of-N.json`: that process's data-iterator state, its
           sha256, and the fingerprints of every `state` array (`integrity.py`)

so a resumed run sees exactly the batches an uninterrupted run would, on every host. A restore
is trusted only when the arrays' fingerprints and the iterator state's digest match what was
saved. What happens to a checkpoint that is not usable depends on why:

- it does not fit the config (other shapes or dtypes, another process count): `UserError`,
  nothing is moved or deleted;
- it cannot be read or fails verification (truncated, bit flips, a missing or empty iterator
  state): it is moved aside to `checkpoints/corrupt-STEP-TIME` (never deleted) and the previous
  checkpoint is tried.

Non-finite parameters are never saved, and a save that fails stops the run with one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fulcrum.platform.errors import UserError
from fulcrum.platform.training import integrity

log = logging.getLogger("fulcrum")

DATA_FORMAT = "fulcrum-data-1"


class CorruptCheckpoint(Exception):
  """A checkpoint that cannot be trusted (it is moved aside)."""


class Restored(NamedTuple):
  step: int
  state: Any
  data_state: dict | None  # None only for checkpoints saved before per-process data files.


@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  iterator_state: dict
  fingerprints: dict[str, int]


@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  # Only the checksums are needed (eval, decode): any process's file will do, so a workdir
  # trained on N hosts can be read from one.
  any_process: bool = False


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataHandler(ocp.CheckpointHandler):
  """Saves and restores each process's own `data/process_I-of-N.json` (orbax handler)."""

  def save(self, directory: epath.Path, args: DataSave) -> None:
    payload = {
      "format": DATA_FORMAT,
      "iterator": args.iterator_state,
      "iterator_sha256": integrity.digest(args.iterator_state),
      "state_fingerprints": args.fingerprints,
    }
    _process_file(epath.Path(directory)).write_text(json.dumps(payload))

  def restore(self, directory: epath.Path, args: DataRestore | None = None) -> dict:
    directory = epath.Path(directory)
    path = _process_file(directory)
    if not path.exists():
      others = sorted(p.name for p in directory.glob("process_*-of-*.json"))
      if others and args is not None and args.any_process:
        path = directory / others[0]
      elif others and not any(n.endswith(f"-of-{jax.process_count()}.json") for n in others):
        raise UserError(
          f"the checkpoint in {directory.parent} was saved by a run with another number of "
          f"processes ({others[0]}); resume with the original process count"
        )
      elif (directory / "metadata").exists() and not others:  # Saved before this format.
        return {"format": "legacy", "iterator": json.loads((directory / "metadata").read_text())}
      else:
        raise CorruptCheckpoint(f"{path.name} is missing")
    try:
      payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise CorruptCheckpoint(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != DATA_FORMAT:
      raise CorruptCheckpoint(f"{path.name} is not a Fulcrum data state")
    iterator = payload.get("iterator")
    if not isinstance(iterator, dict) or not iterator:
      raise CorruptCheckpoint(f"{path.name} holds an empty data-iterator state")
    if integrity.digest(iterator) != payload.get("iterator_sha256"):
      raise CorruptCheckpoint(f"{path.name}: the data-iterator state fails its checksum")
    return payload

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


ocp.args.register_with_handler(DataHandler, for_save=True)(DataSave)
ocp.args.register_with_handler(DataHandler, for_restore=True)(DataRestore)


def _brief(error: Exception) -> str:
  """An orbax/tensorstore error in one short line (without the JSON spec tensorstore appends)."""
  text = str(error).split(" [tensorstore_spec=")[0].split("See full TensorStore details")[0]
  text = " ".join(text.split()).rstrip(" .")
  return f"{type(error).__name__}: {text[:240]}"


def _quiet_closed_loop_callbacks() -> None:
  """Drops the leftovers of a failed checkpoint read that Python reports as "unraisable".

  When one read of a checkpoint fails, orbax ends its event loop at once. The reads still in
  flight then finish on a closed loop ("Event loop is closed" from tensorstore's callbacks), and
  orbax's read coroutines that failed too are discarded with their exceptions ("Exception
  ignored in: <coroutine ... _read_array_index_and_device_put>"): each prints a traceback, from
  dozens to over a thousand lines. The failure itself is reported once (the checkpoint is
  corrupt), so exactly these are dropped; every other unraisable error reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_fulcrum_quiet", False):
    return

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    code = getattr(source, "cr_code", None)
    orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or orbax_read):
      previous(unraisable)

  hook._fulcrum_quiet = True
  sys.unraisablehook = hook


def _on_any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Wraps an orbax `CheckpointManager` over `DIR/checkpoints` (local or any epath URL)."""

  def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True):
    directory = epath.Path(directory)
    self.directory = directory if directory.is_absolute() else epath.Path.cwd() / directory
    self._keep, self._async = keep, async_save
    self._manager = self._open()
    self.last_saved: int | None = None

  def _open(self, async_save: bool | None = None) -> ocp.CheckpointManager:
    async_save = self._async if async_save is None else async_save
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self._keep, create=True, enable_async_checkpointing=async_save
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": DataHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    """Starts saving (in the background when async); `wait()` blocks until it is durable.

    Raises FloatingPointError (and saves nothing) when a parameter is not finite, and
    `UserError` when the save fails.
    """
    fingerprints, finite = integrity.summarize(state)
    if not finite:
      raise FloatingPointError(
        f"the train state at step {step} holds non-finite values; not saving it over the "
        f"last good checkpoint (step {self.last_saved})"
      )
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=DataSave(dict(data_state), fingerprints)
    )
    try:
      self._manager.save(step, args=args, force=force)
    except Exception as e:  # orbax surfaces an earlier async failure here too.
      raise self._save_failed(step, e) from None
    self.last_saved = step

  def _save_failed(self, step: int, error: Exception) -> UserError:
    return UserError(
      f"saving the checkpoint at step {step} in {self.directory} failed "
      f"({_brief(error)}); training stopped. Fix the cause "
      "(disk space, permissions) and rerun the same command to resume"
    )

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self.last_saved or -1, e) from None

  def _layout(self, reader: ocp.CheckpointManager, step: int) -> dict:
    metadata = reader.item_metadata(step)["state"]
    if metadata is None:
      raise CorruptCheckpoint("no state metadata")
    return integrity.layout(metadata)

  def _restore(
    self, reader: ocp.CheckpointManager, step: int, abstract_state: Any, any_process: bool
  ) -> Restored:
    try:
      differences = integrity.layout_differences(
        self._layout(reader, step), integrity.layout(abstract_state)
      )
    except UserError:
      raise
    except Exception as e:
      raise CorruptCheckpoint(f"unreadable metadata ({_brief(e)})") from None
    if differences:
      raise UserError(
        f"the checkpoint at step {step} in {self.directory} was saved by a run with other "
        f"settings ({'; '.join(differences)}); use the original settings or a new --workdir"
      )
    try:
      restored = reader.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=DataRestore(any_process)
        ),
      )
    except (UserError, CorruptCheckpoint):
      raise
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files.
      raise CorruptCheckpoint(_brief(e)) from None
    state, data = restored["state"], restored["data"]
    if data["format"] == "legacy":
      log.warning("checkpoint %d predates checksums; restored without verifying it", step)
      return Restored(step, state, data["iterator"] or None)
    changed = integrity.changed_fingerprints(
      data["state_fingerprints"], integrity.summarize(state)[0]
    )
    if changed:
      raise CorruptCheckpoint(
        f"{len(changed)} array(s) fail their checksum ({', '.join(changed[:3])})"
      )
    return Restored(step, state, data["iterator"])

  def restore_latest(self, abstract_state: Any, *, read_only: bool = False) -> Restored | None:
    """The newest checkpoint that restores and verifies, or None when there is none.

    `read_only` (eval, decode, calibrate, attribute): the data-iterator state is not resumed,
    so the checkpoint may come from a run on another number of processes.

    A corrupt checkpoint is moved aside (never deleted) and the previous one is tried; one that
    does not fit `abstract_state` is a `UserError` and nothing is moved. Raises `UserError`
    when checkpoints exist but none can be trusted.
    """
    # A synchronous reader of its own, so a failed read leaves no save machinery behind.
    reader = self._open(async_save=False)
    _quiet_closed_loop_callbacks()
    steps = sorted(reader.all_steps())
    try:
      for step in reversed(steps):
        try:
          restored, why = self._restore(reader, step, abstract_state, read_only), None
        except CorruptCheckpoint as e:
          restored, why = None, str(e)
        # Hosts agree: one host's corrupt data file makes the checkpoint corrupt for all.
        if not _on_any_process(why is not None):
          return restored
        self._move_aside(step, why or "corrupt on another process")
        reader.reload()
    finally:
      reader.close()
      self._manager.reload()
    if steps:
      raise UserError(
        f"no checkpoint in {self.directory} could be read (moved aside as corrupt-*); "
        "rerun to start fresh, or restore them from a backup"
      )
    return None

  def _move_aside(self, step: int, why: str) -> None:
    aside = self.directory / f"corrupt-{step}-{int(time.time())}"
    log.warning(
      "checkpoint %d is corrupt (%s); moved to %s, trying an earlier one", step, why, aside
    )
    _barrier(f"fulcrum-corrupt-{step}-read")
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    _barrier(f"fulcrum-corrupt-{step}-moved")

  def close(self) -> None:
    """Waits for a save in flight and closes; a failure here is logged (`wait()` raises it)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      log.error("the checkpoint save in flight failed: %s", _brief(e))
    finally:
      self._manager.close()
