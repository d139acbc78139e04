"""Helpers shared by the benchmarks: timing, device description, where results go."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

_OUT: list[Path] = []  # The results folder `run(..., out=DIR)` chose, while it runs.


def checkout_root() -> Path:
  """The repository root when running from a checkout, else the working directory (an
  installed package has no repository: its results and runs go under the current folder)."""
  root = Path(__file__).resolve().parents[2]
  return root if (root / "pyproject.toml").is_file() else Path.cwd()


def results_dir() -> Path:
  """Where results go: `--out DIR`, else benchmarks/results/ of the checkout."""
  return _OUT[-1] if _OUT else checkout_root() / "benchmarks" / "results"


@contextlib.contextmanager
def results_to(out: str | Path | None):
  """Within this block, `results_dir()` is `out` (when given)."""
  if out is None:
    yield
    return
  _OUT.append(Path(out).expanduser().absolute())
  try:
    yield
  finally:
    _OUT.pop()


def device_description() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  if d.platform == "cpu":
    kind = f"{platform.processor() or platform.machine()} CPU"
  return f"{len(jax.devices())}x {kind} ({jax.default_backend()}), jax {jax.__version__}"


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
  """Median wall time of `fn()` (which must block until its result is ready), in seconds."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
  """Throughput of one jitted float32 n×n @ n×n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jax.numpy.float32)
  f = jax.jit(lambda x, y: x @ y)
  seconds = time_call(lambda: f(a, b).block_until_ready(), repeats=repeats, warmup=2)
  return 2 * n**3 / seconds


def peak_bytes(compiled) -> int | None:
  """A compiled program's peak device memory: arguments + outputs + temporaries − donated
  (aliased) buffers, from XLA's `memory_analysis()` (None where the backend gives none)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  return int(total)


def write_results(name: str, result: dict, markdown: str) -> dict:
  """Writes results/NAME.json and results/NAME.md; returns the result with the markdown."""
  out = results_dir()
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / f"{name}.md").write_text(markdown + "\n")
  return {**result, "markdown": markdown}
