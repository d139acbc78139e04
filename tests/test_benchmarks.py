"""The architecture benchmarks' analysis: slopes, crossover and ratios from the measured times.

Timing itself is replaced by known cost models (time ∝ L for the recurrent models, ∝ L² for
the transformer), so the fitted numbers can be checked exactly without compiling a model and
without asserting any wall-clock time; the models' forward/backward and decode paths are tested
in tests/modules. `--quick` runs write no result files.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_decode_latency, bench_scaling

ARCHS = {"transformer", "mamba", "griffin", "hawk"}


def fake_step_time(model, length: int, repeats: int) -> float:
  """1 ms per token for the recurrent models; L² / 96 ms for the transformer."""
  del repeats
  if model.config.arch == "transformer":
    return 1e-3 * length**2 / 96
  return 1e-3 * length


def test_scaling_slopes_and_crossover(monkeypatch):
  monkeypatch.setattr(bench_scaling, "_step_time", fake_step_time)
  result = bench_scaling.run(quick=True)  # L = 64, 128, 256.
  assert set(result["slopes"]) == ARCHS
  assert result["slopes"]["mamba"] == pytest.approx(1.0)
  assert result["slopes"]["transformer"] == pytest.approx(2.0)
  # Mamba (L ms) beats the transformer (L²/96 ms) once L > 96: not at 64, but at 128.
  assert result["crossover_len"] == 128
  assert "| transformer |" in result["markdown"]


def test_scaling_skips_full_attention_past_the_cap(monkeypatch):
  monkeypatch.setattr(bench_scaling, "_step_time", fake_step_time)
  monkeypatch.setattr(bench_scaling, "MAX_FULL_ATTENTION_LEN", 128)
  result = bench_scaling.run(quick=True)
  assert result["step_time_s"]["transformer"][-1] is None
  assert result["step_time_s"]["mamba"][-1] == pytest.approx(0.256)
  assert result["slopes"]["transformer"] == pytest.approx(2.0)  # Fitted on what was measured.
  assert "—" in result["markdown"]


def test_scaling_never_faster_gives_no_crossover(monkeypatch):
  monkeypatch.setattr(
    bench_scaling, "_step_time", lambda m, n, r: 1.0 + (m.config.arch != "transformer")
  )
  assert bench_scaling.run(quick=True)["crossover_len"] is None


def test_decode_latency_ratio(monkeypatch):
  def fake_latency(model, context: int, repeats: int) -> float:
    del repeats
    grows = model.config.arch == "transformer"
    return 1e-3 * (1 + context / 16) if grows else 2e-3

  monkeypatch.setattr(bench_decode_latency, "_latency", fake_latency)
  result = bench_decode_latency.run(quick=True)  # Contexts 16 and 128.
  assert set(result["latency_ratio"]) == ARCHS
  assert result["latency_ratio"]["transformer"] == pytest.approx(9 / 2)
  for arch in ARCHS - {"transformer"}:
    assert result["latency_ratio"][arch] == pytest.approx(1.0)
  assert all(math.isfinite(v) for v in result["latency_ratio"].values())


def test_benchmark_models_attend_as_documented():
  """The transformer attends to the whole sequence; Griffin's attention is local."""
  assert bench_scaling._model("transformer", quick=False).config.window == 0
  assert bench_scaling._model("griffin", quick=False).config.window == 1024
