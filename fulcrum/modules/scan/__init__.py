"""Linear-recurrence (RG-LRU) and selective-scan (Mamba) implementations behind one function each.

`linear_scan(a, x, h0, impl=...)` computes h_t = a_t ⊙ h_{t-1} + x_t; `selective_scan(x, dt, A,
B, C, D, h0, impl=...)` computes Mamba's S6 recurrence. `impl` picks the implementation by the
`ScanImpl` enum; AUTO chooses per backend. Every implementation equals REFERENCE (`lax.scan`)
in value and gradient (tests/modules/test_scan.py); speed and memory are in
benchmarks/results/scan.md.
"""

from __future__ import annotations

import enum
from typing import Literal

import jax
from jaxtyping import Array, Float

from fulcrum.modules.scan import associative, chunked, pallas, reference


class ScanImpl(enum.StrEnum):
  AUTO = "auto"  # Fastest measured on this backend (see `resolve`).
  REFERENCE = "reference"  # Sequential lax.scan: the definition.
  ASSOCIATIVE = "associative"  # One lax.associative_scan: O(log t) depth, O(t·e·n) memory.
  CHUNKED = "chunked"  # Chunks carried by lax.scan: O(chunk·e·n) memory; takes chunk_size.
  PALLAS = "pallas"  # Pallas kernel, Triton (GPU) / Mosaic (TPU); interpreted on CPU.


# AUTO per backend and scan, from benchmarks/results/scan*.md (forward + backward, L = 2048 and
# 8192). CPU: CHUNKED for the selective scan (3.6× REFERENCE's speed, 0.08× its temporary
# memory); REFERENCE for the linear scan, memory-bound there, which nothing beat (CHUNKED
# 0.6-1.0× with 0.7× the memory). GPU (H200, scan_nvidia_h200.md): ASSOCIATIVE for the linear
# scan (0.9 ms at 8K against PALLAS 7.1 ms, same 0.33× memory); PALLAS for the selective scan
# (4.8 ms at 8K, 0.06× REFERENCE's memory; ASSOCIATIVE is 2.0 ms but holds every state,
# 0.66×, which long Mamba sequences cannot afford). TPU: PALLAS, unmeasured.
_AUTO: dict[str, dict[str, ScanImpl]] = {
  "cpu": {"linear": ScanImpl.REFERENCE, "selective": ScanImpl.CHUNKED},
  "gpu": {"linear": ScanImpl.ASSOCIATIVE, "selective": ScanImpl.PALLAS},
  "tpu": {"linear": ScanImpl.PALLAS, "selective": ScanImpl.PALLAS},
}


def resolve(impl: ScanImpl | str, scan: Literal["linear", "selective"] = "selective") -> ScanImpl:
  """`impl` as a `ScanImpl`; AUTO → the fastest measured for `scan` on this backend (`_AUTO`).

  Raises:
    ValueError: `impl` names no implementation.
  """
  impl = ScanImpl(impl)
  if impl != ScanImpl.AUTO:
    return impl
  return _AUTO.get(jax.default_backend(), _AUTO["cpu"])[scan]


# Backends a Pallas kernel runs on: Triton (GPU), Mosaic (TPU), the interpreter (CPU, slowly).
PALLAS_BACKENDS = ("cpu", "gpu", "tpu")


def check_available(impl: ScanImpl | str, key: str = "model.scan_impl") -> None:
  """Raises ValueError, naming `key` and the fix, when `impl` cannot run on this backend."""
  if ScanImpl(impl) == ScanImpl.PALLAS and jax.default_backend() not in PALLAS_BACKENDS:
    raise ValueError(
      f"{key}=pallas has no kernel for the {jax.default_backend()} backend (only "
      f"{', '.join(PALLAS_BACKENDS)}); use {key}=auto"
    )


def linear_scan(
  a: Float[Array, "b t d"],
  x: Float[Array, "b t d"],
  h0: Float[Array, "b d"] | None = None,
  *,
  impl: ScanImpl | str = ScanImpl.AUTO,
  chunk_size: int | None = None,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t over axis 1 (De et al. 2024, eq. 4 without the gates).

  Args:
    a: [b, t, d] decays (a_t = 0 resets the state, e.g. at a document start).
    x: [b, t, d] inputs.
    h0: optional [b, d] state before the first step (zeros when absent).
    impl: a `ScanImpl` (or its name).
    chunk_size: steps per chunk for CHUNKED (default per backend); ignored by the others.

  Returns:
    (h [b, t, d] float32, h_last [b, d] float32); feeding h_last as h0 continues the sequence.
  """
  impl = resolve(impl, "linear")
  if impl == ScanImpl.REFERENCE:
    return reference.linear_scan(a, x, h0)
  if impl == ScanImpl.ASSOCIATIVE:
    return associative.linear_scan(a, x, h0)
  if impl == ScanImpl.CHUNKED:
    return chunked.linear_scan(a, x, h0, chunk_size=chunk_size)
  return pallas.linear_scan(a, x, h0)


def selective_scan(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  D: Float[Array, " e"] | None = None,
  h0: Float[Array, "b e n"] | None = None,
  *,
  impl: ScanImpl | str = ScanImpl.AUTO,
  chunk_size: int | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """Mamba's selective scan (Gu & Dao 2023, Alg. 2). See `reference.selective_scan`.

  h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_t,  y_t = C_t · h_t + D ⊙ x_t, accumulated in float32.

  Args:
    x, dt: [b, t, e] inputs and positive steps Δ (softplus already applied).
    A: [e, n] state matrix; B, C: [b, t, n] input and output projections; D: optional [e] skip.
    h0: optional [b, e, n] state before the first step (zeros when absent).
    impl: a `ScanImpl` (or its name).
    chunk_size: steps per chunk for CHUNKED (default per backend); ignored by the others.

  Returns:
    (y [b, t, e] in x's dtype, h_last [b, e, n] float32).
  """
  impl = resolve(impl, "selective")
  if impl == ScanImpl.REFERENCE:
    return reference.selective_scan(x, dt, A, B, C, D, h0)
  if impl == ScanImpl.ASSOCIATIVE:
    return associative.selective_scan(x, dt, A, B, C, D, h0)
  if impl == ScanImpl.CHUNKED:
    return chunked.selective_scan(x, dt, A, B, C, D, h0, chunk_size=chunk_size)
  return pallas.selective_scan(x, dt, A, B, C, D, h0)
