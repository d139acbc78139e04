"""Checkpointable training iterators: JSON-safe state checked against the pipeline's settings.

Every training iterator (text, series, self-play pairs) is a `ResumableIterator` around a grain
`DatasetIterator`: its state is a small JSON dict that also records the settings fixing the data
order, so a resume under other settings is refused with the setting named instead of silently
reading other data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from fulcrum.platform.errors import UserError

_STATE_FORMAT = 1


def _to_json(value: Any) -> Any:
  """A JSON-clean copy: tuples -> lists, NumPy scalars -> Python numbers."""
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _from_json(value: Any) -> Any:
  """Undoes the lossy part of JSON for grain's packing state.

  ConcatThenSplit compares its slices with the tuple (-1, -1); after a JSON round trip they
  are lists, which would silently corrupt the restored stream.
  """
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if k == "remainder_slices" and isinstance(v, Mapping):
        out[k] = {name: tuple(sl) for name, sl in v.items()}
      else:
        out[k] = _from_json(v)
    return out
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


class ResumableIterator(grain.DatasetIterator):
  """Wraps a training iterator: JSON-safe state, checked against the pipeline's settings.

  `fingerprint` holds the settings that fix the data order (source, sizes, seed, hosts,
  tokenizer); `set_state` refuses a state saved under different ones. `implied` gives the value
  of a setting added to the fingerprint later, for states saved before it (e.g. the tokenizer:
  every earlier run used bytes).
  """

  def __init__(
    self,
    parent: grain.DatasetIterator,
    fingerprint: dict[str, Any],
    implied: Mapping[str, Any] | None = None,
  ):
    super().__init__(parent)
    self._fingerprint = fingerprint
    self._implied = dict(implied or {})

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {
      "format": _STATE_FORMAT,
      "pipeline_settings": dict(self._fingerprint),
      "grain": _to_json(self._parent.get_state()),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
      raise UserError(
        "the saved data-iterator state is not from this version of Fulcrum's "
        "data pipeline; start a new workdir"
      )
    saved = state.get("pipeline_settings", {})
    saved = {**self._implied, **saved}
    changed = [
      f"{k} was {saved.get(k)!r}, now {v!r}"
      for k, v in self._fingerprint.items()
      if saved.get(k) != v
    ]
    if changed:
      raise UserError(
        f"the data pipeline differs from the saved iterator state ({'; '.join(changed)}"
        "); restore the original data/train settings or start a new workdir"
      )
    self._parent.set_state(_from_json(state["grain"]))

  def __str__(self) -> str:
    return f"FulcrumTrainIterator({self._fingerprint})"
