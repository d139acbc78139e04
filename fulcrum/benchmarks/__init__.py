"""Benchmarks: `fulcrum bench NAME [--json] [--out DIR]`, shipped with the package.

Each `bench_NAME.py` here has `run(quick: bool) -> dict` returning its result (with a
"markdown" table) and writing NAME.json, NAME.md and, where it helps, NAME.png to the results
folder: `--out DIR`, else `benchmarks/results/` of the checkout (or of the working directory
for an installed package). Ratios are measured side by side in one run; no test asserts a time.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from fulcrum.benchmarks import common
from fulcrum.platform.errors import UserError

PREFIX = "bench_"


def names() -> list[str]:
  """Every benchmark name, sorted."""
  return sorted(
    m.name.removeprefix(PREFIX) for m in pkgutil.iter_modules(__path__) if m.name.startswith(PREFIX)
  )


def run(name: str, *, quick: bool = False, out: str | Path | None = None) -> dict[str, Any]:
  """Runs benchmark `name`; returns its result (with "markdown") after writing its files."""
  if name not in names():
    raise UserError(f"unknown benchmark {name!r}; available: {', '.join(names())}")
  module = importlib.import_module(f"{__name__}.{PREFIX}{name}")
  with common.results_to(out):
    return module.run(quick=quick)
