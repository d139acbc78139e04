"""The whole sequence as one `lax.associative_scan` over the affine-map monoid (Blelloch 1990).

O(log t) depth and O(t) work, as in the S5 paper (Smith et al. 2023, §2.2) and the parallel
form of Griffin's RG-LRU (De et al. 2024, §3). Its price is memory: the selective scan holds all
[b, t, e, n] states (and the backward pass its adjoints), which `chunked.py` avoids. Gradients
come from the hand-derived adjoint recurrence in `segment.py`, itself an associative scan.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from fulcrum.modules.scan import segment


def linear_scan(
  a: Float[Array, "b t d"], x: Float[Array, "b t d"], h0: Float[Array, "b d"] | None = None
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t in float32 by one parallel prefix; returns (h, h_last)."""
  b, _, d = a.shape
  return segment.linear_segment(a, x, segment.initial_state(h0, (b, d)), "associative")


def selective_scan(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  D: Float[Array, " e"] | None = None,
  h0: Float[Array, "b e n"] | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """Mamba's S6 (Gu & Dao 2023, Alg. 2) by one parallel prefix; returns (y, h_last)."""
  (b, _, e), n = x.shape, A.shape[-1]
  y, h_last = segment.selective_segment(
    x, dt, A, B, C, segment.initial_state(h0, (b, e, n)), "associative"
  )
  return segment.add_skip(y, x, D), h_last
