"""What a run tells about itself: the devices it runs on, the mean loss of each logging interval,
model FLOPs utilisation (MFU) and `jax.profiler` traces of chosen steps."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from fulcrum.platform.training.train_config import profile_range

log = logging.getLogger("fulcrum")

# Dense (no 2:4 sparsity) bf16 peak FLOP/s of one JAX device, from the vendors' spec sheets.
# Cloud TPU system architecture pages, "peak compute per chip (bf16)"; a v4/v5p chip (megacore)
# and a v5e/v6e chip are one JAX device each. Keys are `device.device_kind` as JAX spells it.
TPU_PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5e": 197e12,
  "TPU v5": 459e12,  # v5p
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,  # v6e (Trillium)
  "TPU v6e": 918e12,
}
# NVIDIA datasheets list bf16 Tensor Core FLOP/s "with sparsity"; dense is half of that.
# A GPU matches the first rule whose words all occur in its device kind (e.g. "NVIDIA H100 80GB
# HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L4"), so the specific variants come first.
GPU_PEAK_FLOPS = (
  (("h100", "pcie"), 756e12),  # H100 PCIe: 1,513 TFLOPS sparse.
  (("h100", "nvl"), 835e12),  # H100 NVL: 1,671 TFLOPS sparse.
  (("h100",), 989e12),  # H100 SXM: 1,979 TFLOPS sparse.
  (("h200", "nvl"), 835e12),  # H200 NVL: 1,671 TFLOPS sparse.
  (("h200",), 989e12),  # H200 SXM: 1,979 TFLOPS sparse.
  (("a100",), 312e12),  # A100 SXM and PCIe: 624 TFLOPS sparse.
  (("l4",), 121e12),  # L4: 242 TFLOPS sparse.
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None for a kind not in the tables."""
  if device_kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[device_kind]
  words = set("".join(c if c.isalnum() else " " for c in device_kind.lower()).split())
  for needed, flops in GPU_PEAK_FLOPS:
    if words.issuperset(needed):
      return flops
  return None


def describe_devices() -> str:
  """E.g. `8 x TPU v5 lite (tpu)`, `1 x cpu (cpu)`; the process count when there are several."""
  devices = jax.devices()
  kinds = ", ".join(sorted({d.device_kind for d in devices}))
  text = f"{len(devices)} x {kinds} ({jax.default_backend()})"
  if jax.process_count() > 1:
    text += f" in {jax.process_count()} processes"
  return text


class IntervalMean:
  """The mean of a per-step scalar (the loss) since it was last read, summed on the device so
  the host never waits for a step; non-finite (skipped) steps are left out."""

  def __init__(self):
    self._sum = self._count = None

  def add(self, value: jax.Array) -> None:
    finite = jnp.isfinite(value)
    value, count = jnp.where(finite, value, 0.0), finite.astype(jnp.int32)
    if self._sum is None:
      self._sum, self._count = value, count
    else:
      self._sum, self._count = self._sum + value, self._count + count

  def pop(self) -> float:
    """The mean since the last `pop` (NaN when every step was non-finite); starts over."""
    total, count = jax.device_get((self._sum, self._count))
    self._sum = self._count = None
    return float(total) / int(count) if count else math.nan


def _sub_jaxprs(eqn) -> Iterator[tuple[int, jex_core.Jaxpr]]:
  """(times run per run of `eqn`, jaxpr) for each jaxpr inside `eqn`."""
  name = eqn.primitive.name
  if name == "cond":  # One branch runs: count the costliest.
    branches = [b.jaxpr for b in eqn.params["branches"]]
    yield 1, max(branches, key=matmul_flops)
    return
  times = 1
  if name == "scan":
    times = eqn.params["length"]
  elif name == "pallas_call":  # The kernel runs once per grid cell.
    times = math.prod(getattr(eqn.params.get("grid_mapping"), "grid", ()) or (1,))
  for jaxpr in jex_core.jaxprs_in_params(eqn.params):
    yield times, jaxpr


def matmul_flops(jaxpr: jex_core.Jaxpr) -> int:
  """FLOPs of the matrix multiplications and convolutions in `jaxpr`, loops included.

  The model-FLOPs convention of MFU (PaLM, Chowdhery et al. 2022, appendix B): multiply-adds
  count 2, elementwise work is not counted. A `scan` body counts `length` times; XLA's own
  `cost_analysis()` counts a loop body once, which would undercount layers stacked with
  `nn.scan` and gradient accumulation by their trip count. A `while` loop (trip count unknown)
  counts once.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[i] for i in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * math.prod(out) * (math.prod(rhs) // out_features)
    for times, sub in _sub_jaxprs(eqn):
      total += times * matmul_flops(sub)
  return total


def step_flops(jitted, *args) -> int:
  """Model FLOPs of one call of the jitted function `jitted` on `args`, over all devices."""
  return matmul_flops(jitted.trace(*args).jaxpr.jaxpr)


class Utilisation:
  """MFU: the step's model FLOPs per second ÷ the devices' peak (`peak_flops`).

  The step's FLOPs are counted once, on the first `row` (its trace is cached by then); on a
  device kind without a known peak the key is omitted and nothing is traced.
  """

  def __init__(self):
    kind = jax.devices()[0].device_kind
    self.peak = peak_flops(kind)
    self.flops: int | None = None
    if self.peak is None:
      log.info("MFU not logged: no peak FLOP/s known for %s devices", kind)

  def row(self, steps: int, seconds: float, jitted, *args) -> dict[str, float]:
    """`{"mfu": ...}` for `steps` calls of `jitted(*args)` that took `seconds`; `{}` if unknown."""
    if self.peak is None or seconds <= 0:
      return {}
    if self.flops is None:
      self.flops = step_flops(jitted, *args)
      log.info(
        "train step: %.3g GFLOP in matmuls; devices' peak %.0f TFLOP/s each",
        self.flops / 1e9,
        self.peak / 1e12,
      )
    return {"mfu": self.flops * steps / seconds / (self.peak * jax.device_count())}


class Profiler:
  """Writes a `jax.profiler` trace of steps A..B (`train.profile_steps="A:B"`) into `directory`.

  Call `at(step, state)` before the first step (with the step trained so far) and after each
  step: the trace starts before step A runs and stops once step B's work is done.
  """

  def __init__(self, spec: str, directory: os.PathLike | str):
    self.range = profile_range(spec)
    self.directory = directory
    self.active = False

  def at(self, step: int, state) -> None:
    if self.range is None:
      return
    first, last = self.range
    if self.active and step >= last:
      jax.block_until_ready(state)
      self.close()
      log.info("profile of steps %d-%d written to %s", first, last, self.directory)
      self.range = None
    elif not self.active and first <= step + 1 <= last:
      jax.profiler.start_trace(os.fspath(self.directory))
      self.active = True

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
