"""Recipes: one file per experiment, each with a `get_config()` and a docstring.

The docstring's first line is the one-line description `fulcrum recipes` prints; the rest
states the purpose, the expected metric, the runtime and the exact command.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from fulcrum.platform.errors import UserError


def names() -> list[str]:
  """Every recipe name, sorted."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def describe(name: str) -> str:
  """The first line of a recipe's docstring."""
  doc = _module(name).__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def _module(name: str):
  if name not in names():
    raise UserError(f"unknown recipe {name!r}; `fulcrum recipes` lists them: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


def get(name: str) -> ml_collections.ConfigDict:
  """The locked config of recipe `name`."""
  config = _module(name).get_config()
  config.lock()
  return config
