"""Smoke tests of the architecture benchmarks at their `--quick` sizes.

They check that each benchmark runs end to end through the CLI and reports well-formed JSON
(every architecture present, times positive and finite). No timing is asserted: wall-clock
numbers belong in benchmarks/results/, measured by `make bench`. Quick runs write no files.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, run_cli

ARCHS = {"transformer", "mamba", "griffin", "hawk"}


def bench(name: str) -> dict:
  before = {p: p.stat().st_mtime for p in (REPO / "benchmarks" / "results").glob(f"{name}.*")}
  proc = run_cli(["bench", name, "--quick", "--json"])
  assert proc.returncode == 0, proc.stderr
  after = {p: p.stat().st_mtime for p in (REPO / "benchmarks" / "results").glob(f"{name}.*")}
  assert after == before, "a --quick run must not overwrite the recorded results"
  return json.loads(proc.stdout)


def positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_scaling_quick():
  result = bench("scaling")
  lengths = result["lengths"]
  assert lengths == sorted(lengths) and len(lengths) >= 3
  assert set(result["step_time_s"]) == ARCHS == set(result["slopes"])
  for arch, times in result["step_time_s"].items():
    assert len(times) == len(lengths)
    assert all(positive(t) for t in times), (arch, times)
  assert all(math.isfinite(s) for s in result["slopes"].values())
  assert result["crossover_len"] is None or result["crossover_len"] in lengths


@pytest.mark.slow
def test_bench_decode_latency_quick():
  result = bench("decode_latency")
  short, long = (str(c) for c in result["contexts"])
  assert set(result["latency_s"]) == ARCHS == set(result["latency_ratio"])
  for arch, latency in result["latency_s"].items():
    assert positive(latency[short]) and positive(latency[long])
    assert result["latency_ratio"][arch] == pytest.approx(latency[long] / latency[short])
