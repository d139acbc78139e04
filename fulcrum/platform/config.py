"""Config machinery: sections assembled from their owners, typed overrides, JSON round trip.

This module knows no key. Each section's keys, defaults, comments and checks live with the
package that reads them (`fulcrum.platform.sections` lists the owners); here is only how
sections become one locked `ml_collections.ConfigDict`, how `--set key=value` strings are
parsed to the type of the key's default (an unknown key is an error, never ignored), and how
a resolved config is written to and read back from `DIR/config.json`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from fulcrum.platform.errors import UserError


@dataclasses.dataclass(frozen=True)
class Section:
  """One config section: its defaults and its check, both owned by the package reading it.

  Attributes:
    defaults: returns a fresh ConfigDict of every key with its default.
    validate: raises `UserError` (or `ValueError`, turned into one) naming the fix.
  """

  defaults: Callable[[], ml_collections.ConfigDict]
  validate: Callable[[ml_collections.ConfigDict], None] = lambda section: None


def from_dataclass(fields: Iterable[dataclasses.Field]) -> ml_collections.ConfigDict:
  """A section whose keys and defaults are dataclass fields (e.g. `ModelConfig`'s)."""
  c = ml_collections.ConfigDict()
  for f in fields:
    if f.default is not dataclasses.MISSING:
      c[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      c[f.name] = f.default_factory()
    else:
      raise TypeError(f"config field {f.name!r} has no default")
  return c


def assemble(top: Mapping[str, Any], sections: Mapping[str, Section]) -> ml_collections.ConfigDict:
  """Top-level keys and each section's defaults as one (unlocked) ConfigDict."""
  c = ml_collections.ConfigDict()
  for key, value in top.items():
    c[key] = value
  for name, section in sections.items():
    c[name] = section.defaults()
  return c


def check(config: ml_collections.ConfigDict, sections: Mapping[str, Section]) -> None:
  """Runs every section's check; a `ValueError` becomes a `UserError` with the same message."""
  for name, section in sections.items():
    if name in config:
      try:
        section.validate(config[name])
      except ValueError as e:
        raise UserError(str(e)) from None


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value at a dotted key, or None where any part is absent."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _parse(text: str, default: Any, key: str) -> Any:
  """Parses an override string to the type of the key's default."""
  expected = type(default)
  try:
    if isinstance(default, bool):
      low = text.strip().lower()
      if low in ("true", "1", "yes", "on"):
        return True
      if low in ("false", "0", "no", "off"):
        return False
      raise ValueError
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return expected(value)
  except (ValueError, SyntaxError):
    raise UserError(
      f"--set {key}={text!r}: expected a {expected.__name__} like {default!r}"
    ) from None
  raise UserError(f"--set {key}: keys of type {expected.__name__} cannot be overridden")


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(
        f"unknown config key {key!r}: no section {'.'.join(parents[: i + 1])!r}; "
        f"sections are {', '.join(sorted(config.keys()))}"
      )
    node = node[part]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    known = ", ".join(sorted(k for k in node if not isinstance(node[k], ml_collections.ConfigDict)))
    raise UserError(f"unknown config key {key!r}; known keys there: {known}")
  return node, leaf


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `key=value` strings in place, parsing each value to its default's type."""
  for item in overrides:
    if "=" not in item:
      raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, text = item.split("=", 1)
    key = key.strip()
    node, leaf = _lookup(config, key)
    with node.unlocked():
      node[leaf] = _parse(text, node[leaf], key)


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as indented JSON (what `DIR/config.json` holds)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from `to_json` output over `base` (an unlocked config of every
  default), so keys added since the run was written take their defaults."""
  stored = json.loads(text)
  config = base
  with config.unlocked():
    for section, values in stored.items():
      if isinstance(values, dict):
        if section not in config:
          config[section] = ml_collections.ConfigDict()
        for key, value in values.items():
          config[section][key] = value
      else:
        config[section] = values
  config.lock()
  return config
