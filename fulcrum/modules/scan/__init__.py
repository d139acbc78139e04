"""Linear-recurrence (RG-LRU) and selective-scan (Mamba) implementations behind one function each.

`linear_scan(a, x, h0, impl=...)` computes h_t = a_t ⊙ h_{t-1} + x_t; `selective_scan(x, dt, A,
B, C, D, h0, impl=...)` computes Mamba's S6 recurrence. `impl` picks the implementation by the
`ScanImpl` enum; AUTO chooses per backend. Every implementation equals REFERENCE (`lax.scan`).
"""

from __future__ import annotations

import enum

from fulcrum.modules.scan import reference


class ScanImpl(enum.StrEnum):
  AUTO = "auto"
  REFERENCE = "reference"  # Sequential lax.scan: the definition.


def resolve(impl: ScanImpl | str) -> ScanImpl:
  """AUTO → the implementation benchmarks/bench_scan.py shows fastest on this backend."""
  impl = ScanImpl(impl)
  return ScanImpl.REFERENCE if impl == ScanImpl.AUTO else impl


def linear_scan(a, x, h0=None, *, impl: ScanImpl | str = ScanImpl.AUTO):
  """h_t = a_t ⊙ h_{t-1} + x_t over axis 1 of [b, t, d] arrays; returns (h [b,t,d], h_T [b,d])."""
  resolve(impl)
  return reference.linear_scan(a, x, h0)


def selective_scan(x, dt, A, B, C, D=None, h0=None, *, impl: ScanImpl | str = ScanImpl.AUTO):
  """Mamba's selective scan; returns (y [b,t,e], h_T [b,e,n]). See `reference.selective_scan`."""
  resolve(impl)
  return reference.selective_scan(x, dt, A, B, C, D, h0)
