"""Recipes: one file per experiment, each with a `get_config()` and a docstring.

The docstring's first line is the one-line description `fulcrum recipes` prints; the rest
states the purpose, the expected metric, the runtime and the exact command. A recipe is named
by its module here (`--recipe demo`) or by the path of a recipe file anywhere
(`--recipe ./my_recipe.py`, as big_vision's `--config path.py`); such a file builds on
`fulcrum.recipes._bases` like the ones here.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

import ml_collections

from fulcrum.platform.errors import UserError


def names() -> list[str]:
  """Every recipe name, sorted."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def describe(name: str) -> str:
  """The first line of a recipe's docstring."""
  doc = _module(name).__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def is_path(name: str) -> bool:
  """Whether `--recipe` names a file rather than a recipe of this package."""
  return name.endswith(".py") or "/" in name or "\\" in name


def _load_file(path: Path) -> ModuleType:
  if not path.is_file():
    raise UserError(f"recipe file {path} does not exist; pass a recipe name or a .py file path")
  spec = importlib.util.spec_from_file_location(f"fulcrum_recipe_{path.stem}", path)
  if spec is None or spec.loader is None:
    raise UserError(f"recipe file {path} is not a Python file; pass a .py file with get_config()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (SyntaxError, ImportError) as e:
    raise UserError(f"recipe file {path} does not import ({type(e).__name__}: {e})") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"recipe file {path} defines no get_config(); add one returning the config")
  return module


def _module(name: str) -> ModuleType:
  if is_path(name):
    return _load_file(Path(name).expanduser())
  if name not in names():
    raise UserError(f"unknown recipe {name!r}; `fulcrum recipes` lists them: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")


def get(name: str) -> ml_collections.ConfigDict:
  """The locked config of recipe `name` (a recipe here, or the path of a recipe file)."""
  config = _module(name).get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"recipe {name}'s get_config() returned {type(config).__name__}, not a config")
  config.lock()
  return config
