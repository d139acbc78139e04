"""Chunked scans: the sequence in chunks, each chunk whole, the state carried by `lax.scan`.

The sequence is cut into chunks of `chunk_size` steps (padded with identity steps, a = 1 and
x = 0, or Δ = 0 for S6, so any length works). A `lax.scan` carries the state h across chunks;
a chunk's steps are evaluated together (`segment.py`): by an associative scan on accelerators,
or by one fused pass on CPU (see `intra_chunk_order`). This is the
state-passing form of Mamba-2's SSD algorithm (Dao & Gu 2024, §6) for a diagonal, per-channel A.

Memory: the selective scan never holds more than one chunk's [b, chunk, e, n] states. The chunk
body is wrapped in `jax.checkpoint`, so the backward pass stores only the [b, e, n] state at each
chunk boundary and recomputes the chunk; its gradient is the hand-derived adjoint recurrence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fulcrum.modules.scan import segment


def intra_chunk_order() -> segment.Order:
  """How a chunk's steps are evaluated on this backend.

  CPU: `sequential` — a static loop XLA fuses into one pass over the chunk. Measured 2-4× faster
  than the associative scan there (`chunked_associative` rows of fulcrum/benchmarks/bench_scan.py),
  whose log-depth passes each stream the chunk through memory, while CPU parallelism comes from
  the vector units anyway.
  GPU/TPU: `associative` — the O(log c)-depth prefix that keeps the parallel units busy
  (unmeasured here: no accelerator on the development machine).
  """
  return "sequential" if jax.default_backend() == "cpu" else "associative"


def default_chunk_size(order: segment.Order, scan: str) -> int:
  """Chunk length when the caller gives none, for the "linear" or "selective" scan.

  Sequential (CPU), measured at L = 2048 and 8192 among 4-32: the selective scan is fastest with
  8 (a chunk's [b, 8, e, n] states stay in cache; longer unrolled chunks spill and compile
  slower), the linear scan, whose state is e times smaller, with 16. Associative (accelerators):
  128, so the sequential carry across chunks is short.
  """
  if order == "associative":
    return 128
  return 8 if scan == "selective" else 16


def _chunks(z: Array, c: int, pad_value: float) -> Array:
  """[b, t, ...] → [t/c, b, c, ...], padding time to a multiple of c with `pad_value`."""
  b, t = z.shape[:2]
  pad = -t % c
  if pad:
    z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2), constant_values=pad_value)
  return jnp.moveaxis(z.reshape(b, (t + pad) // c, c, *z.shape[2:]), 1, 0)


def _unchunk(z: Array, t: int) -> Array:
  """[t/c, b, c, ...] → [b, t, ...], dropping the padding."""
  nc, b, c = z.shape[:3]
  return jnp.moveaxis(z, 0, 1).reshape(b, nc * c, *z.shape[3:])[:, :t]


def _plan(t: int, chunk_size: int | None, order: segment.Order | None, scan: str):
  order = order or intra_chunk_order()
  c = default_chunk_size(order, scan) if chunk_size is None else chunk_size
  if c < 1:
    raise ValueError(f"chunk_size must be a positive number of steps, got {chunk_size}")
  return min(c, t), order


def linear_scan(
  a: Float[Array, "b t d"],
  x: Float[Array, "b t d"],
  h0: Float[Array, "b d"] | None = None,
  *,
  chunk_size: int | None = None,
  order: segment.Order | None = None,
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t chunk by chunk, in float32; returns (h, h_last).

  Args:
    a, x: [b, t, d] decays and inputs.
    h0: optional [b, d] initial state.
    chunk_size: steps per chunk (default `default_chunk_size`).
    order: evaluation inside a chunk (default `intra_chunk_order()`).
  """
  b, t, d = a.shape
  c, order = _plan(t, chunk_size, order, "linear")

  @jax.checkpoint
  def chunk(h, ax):
    hs, h = segment.linear_segment(ax[0], ax[1], h, order)
    return h, hs

  h_last, hs = jax.lax.scan(
    chunk, segment.initial_state(h0, (b, d)), (_chunks(a, c, 1.0), _chunks(x, c, 0.0))
  )
  return _unchunk(hs, t), h_last


def selective_states(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  h0: Float[Array, "b e n"],
  *,
  chunk_size: int | None = None,
  order: segment.Order | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """S6 without the D skip, chunk by chunk: (C_t · h_t in float32, h_last). See `selective_scan`."""
  t = x.shape[1]
  c, order = _plan(t, chunk_size, order, "selective")

  @jax.checkpoint
  def chunk(h, inputs):
    x_c, dt_c, B_c, C_c = inputs
    y, h = segment.selective_segment(x_c, dt_c, A, B_c, C_c, h, order)
    return h, y

  # Δ = 0 makes a padded step the identity: exp(0·A) = 1 and no input.
  inputs = tuple(_chunks(z, c, 0.0) for z in (x, dt, B, C))
  h_last, ys = jax.lax.scan(chunk, segment.initial_state(h0, h0.shape), inputs)
  return _unchunk(ys, t), h_last


def selective_scan(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  D: Float[Array, " e"] | None = None,
  h0: Float[Array, "b e n"] | None = None,
  *,
  chunk_size: int | None = None,
  order: segment.Order | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """Mamba's S6 (Gu & Dao 2023, Alg. 2) chunk by chunk; returns (y in x's dtype, h_last).

  Args:
    x, dt: [b, t, e] inputs and positive steps Δ (softplus applied).
    A: [e, n] state matrix (negative); B, C: [b, t, n]; D: optional [e] skip.
    h0: optional [b, e, n] initial state.
    chunk_size: steps per chunk (default `default_chunk_size`).
    order: evaluation inside a chunk (default `intra_chunk_order()`).
  """
  (b, _, e), n = x.shape, A.shape[-1]
  h0 = segment.initial_state(h0, (b, e, n))
  y, h_last = selective_states(x, dt, A, B, C, h0, chunk_size=chunk_size, order=order)
  return segment.add_skip(y, x, D), h_last
