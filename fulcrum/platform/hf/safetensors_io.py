"""Safetensors files read and written with numpy alone (no torch, no `safetensors` package).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian bytes. Files are memory-mapped, so
only the tensors that are used are ever read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from fulcrum.platform.errors import UserError

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # The reference implementation's limit.


class _Entry(NamedTuple):
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # Byte offsets from the start of the file.
  end: int


class SafetensorsFile(Mapping[str, np.ndarray]):
  """One .safetensors file as a read-only mapping from tensor name to a memory-mapped array.

  Arrays are views into the file: nothing is read until they are used, and they are only valid
  while the file exists. Raises `UserError` when the file is not valid safetensors.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.metadata, self._entries = _read_header(self.path)
    self._buffer: np.ndarray | None = None

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def __getitem__(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    if self._buffer is None:
      # A plain ndarray over the map, so that views of it are plain ndarrays too.
      self._buffer = np.asarray(np.memmap(self.path, dtype=np.uint8, mode="r"))
    return self._buffer[entry.start : entry.end].view(entry.dtype).reshape(entry.shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, _Entry]]:
  """Parses and validates the JSON header; returns (metadata, entries by name)."""

  def corrupt(why: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file ({why}); re-download or re-save it")

  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise corrupt("shorter than the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > min(_MAX_HEADER_BYTES, size - 8):
      raise corrupt(f"header length {n} does not fit in a {size}-byte file")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise corrupt(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise corrupt("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  base, entries = 8 + n, {}
  for name, info in header.items():
    try:
      dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise corrupt(f"bad header entry for {name!r}: {info!r}") from None
    if not 0 <= start <= end <= size - base:
      raise corrupt(f"{name!r} lies outside the file")
    if end - start != math.prod(shape) * dtype.itemsize:
      raise corrupt(f"{name!r} has {end - start} bytes for shape {shape} of {info['dtype']}")
    entries[name] = _Entry(dtype, shape, base + start, base + end)
  return metadata, entries


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file, as memory-mapped numpy arrays."""
  return dict(SafetensorsFile(path))


def write_safetensors(
  path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
  """Writes arrays (numpy, jax or anything `np.asarray` takes) as one .safetensors file.

  Tensors are laid out widest dtype first so every tensor starts aligned to its item size, as
  the reference implementation does; the file is written to a temporary name and then renamed.
  """
  arrays = {name: np.asarray(value) for name, value in tensors.items()}
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset, order = 0, sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
  for name in order:
    a = arrays[name]
    dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dtype not in _DTYPE_NAMES:
      raise ValueError(f"{name}: dtype {a.dtype} has no safetensors equivalent")
    arrays[name] = a = np.asarray(a, dtype=dtype, order="C")  # Keeps 0-d shapes.
    header[name] = {
      "dtype": _DTYPE_NAMES[dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data section starts 8-byte aligned.
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in order:
      f.write(arrays[name].reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)


def open_checkpoint(folder: Path) -> dict[str, SafetensorsFile]:
  """Where each tensor of a checkpoint folder lives: {tensor name: its file}.

  A sharded checkpoint is read through `model.safetensors.index.json`; otherwise
  `model.safetensors`, or failing that every `*.safetensors` file in the folder (some
  repositories also ship the original weights, e.g. consolidated.safetensors).
  """
  index, files, where = folder / "model.safetensors.index.json", {}, {}
  if index.is_file():
    try:
      weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{index} is not a valid index ({e}); re-download it") from None
  else:
    single = folder / "model.safetensors"
    weight_map = {}
    for p in [single] if single.is_file() else sorted(folder.glob("*.safetensors")):
      files[p.name] = SafetensorsFile(p)
      for tensor in files[p.name]:
        if tensor in weight_map:
          raise UserError(f"tensor {tensor!r} is in {weight_map[tensor]} and {p.name}; remove one")
        weight_map[tensor] = p.name
  for tensor, name in weight_map.items():
    if name not in files:
      if not (folder / name).is_file():
        raise UserError(f"{index.name} lists shard {name} but {folder} lacks it; download it")
      files[name] = SafetensorsFile(folder / name)
    if tensor not in files[name]:
      raise UserError(f"{index.name} puts {tensor!r} in {name}, which lacks it; re-download")
    where[tensor] = files[name]
  return where
