"""Whole-or-nothing file writes for workdir files (config.json, metrics.jsonl), local or in an
object store. Imports nothing from Fulcrum, so any module may use it without an import cycle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from etils import epath


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on a local (POSIX) filesystem rather than an object store URL."""
  return "://" not in os.fspath(path)


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` whole or not at all.

  Locally through a temporary file in the same directory, fsync and `os.replace`: a kill at any
  moment leaves the old file or the new one, never a truncated one. On an object store (gs://,
  s3://) one upload is already all-or-nothing.
  """
  path = epath.Path(path)
  if not is_local(path):
    if isinstance(data, bytes):
      path.write_bytes(data)
    else:
      path.write_text(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data if isinstance(data, bytes) else data.encode())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(path))
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
