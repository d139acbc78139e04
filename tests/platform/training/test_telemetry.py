"""Telemetry pieces: the peak-FLOP/s table, the matmul FLOP count (against XLA's cost analysis,
and through loops XLA counts once), the interval mean and `train.profile_steps` validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import telemetry


@pytest.mark.parametrize(
  "kind, peak",
  [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", None),  # Not an L4.
    ("TPU v4 lite", None),
    ("cpu", None),
  ],
)
def test_peak_flops_table(kind, peak):
  assert telemetry.peak_flops(kind) == peak


def _xla_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_matmul_flops_equal_xla_cost_analysis_without_loops():
  x, w = jnp.ones((4, 16, 32)), jnp.ones((32, 8))
  fn = lambda x, w: jnp.einsum("btd,dk->btk", x, w)
  flops = telemetry.step_flops(jax.jit(fn), x, w)
  assert flops == 2 * 4 * 16 * 32 * 8 == _xla_flops(fn, x, w)
  # The gradient w.r.t. w adds one transposed product (x^T g): twice the forward pass.
  loss = lambda w, x: fn(x, w).sum()
  assert telemetry.step_flops(jax.jit(jax.grad(loss)), w, x) == 2 * flops


def test_matmul_flops_count_each_scan_iteration():
  """XLA's cost analysis counts a loop body once; layers stacked by a scan run `length` times."""
  x, ws = jnp.ones((8, 16)), jnp.ones((5, 16, 16))

  def stacked(x, ws):
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

  one_layer = 2 * 8 * 16 * 16
  assert telemetry.step_flops(jax.jit(stacked), x, ws) == 5 * one_layer
  assert _xla_flops(stacked, x, ws) < 2 * one_layer  # What counting the body once gives.


def test_matmul_flops_of_a_cond_count_one_branch():
  x = jnp.ones((8, 8))
  fn = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)
  assert telemetry.step_flops(jax.jit(fn), True, x) == 2 * (2 * 8 * 8 * 8)


def test_interval_mean_leaves_out_nonfinite_steps():
  mean = telemetry.IntervalMean()
  for value in (1.0, 2.0, float("nan"), 6.0):
    mean.add(jnp.float32(value))
  assert mean.pop() == 3.0
  mean.add(jnp.float32(float("inf")))
  assert math.isnan(mean.pop())
  mean.add(jnp.float32(5.0))
  assert mean.pop() == 5.0  # Starts over after each pop.


def test_utilisation_arithmetic(monkeypatch):
  monkeypatch.setitem(telemetry.TPU_PEAK_FLOPS, jax.devices()[0].device_kind, 2e9)
  x, w = jnp.ones((64, 64)), jnp.ones((64, 64))
  row = telemetry.Utilisation().row(10, 0.5, jax.jit(jnp.matmul), x, w)
  flops = 2 * 64**3
  assert row == {"mfu": pytest.approx(flops * 10 / 0.5 / (2e9 * jax.device_count()))}


def test_unknown_device_has_no_mfu():
  assert telemetry.Utilisation().row(10, 0.5, None) == {}  # CPU: nothing traced, no key.


def test_describe_devices():
  assert telemetry.describe_devices() == f"{jax.device_count()} x cpu (cpu)"


@pytest.mark.parametrize(
  "spec, message",
  [
    ("abc", "must be A:B"),
    ("5", "must be A:B"),
    ("3:2", "must be A:B"),
    ("0:2", "must be A:B"),
    ("2:x", "must be A:B"),
    ("5:20", "ends after train.steps=10"),
  ],
)
def test_profile_steps_validation(spec, message):
  config = sections.base_config()
  config_lib.apply_overrides(config, ["train.steps=10", f"train.profile_steps={spec}"])
  with pytest.raises(UserError, match=message):
    sections.validate(config)


def test_profile_steps_accepted():
  config = sections.base_config()
  config_lib.apply_overrides(config, ["train.steps=10", "train.profile_steps=3:10"])
  sections.validate(config)
  assert telemetry.Profiler("3:10", "/unused").range == (3, 10)
  assert telemetry.Profiler("", "/unused").range is None
