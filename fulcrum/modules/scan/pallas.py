"""Pallas kernels: one program per (batch, channel block), a sequential loop over time.

The recurrences are elementwise across channels, so each program owns a block of channels and
walks time holding its state in registers (GPU, Triton lowering) or vector registers / VMEM
(TPU, Mosaic lowering) — the design of Mamba's CUDA selective-scan kernel (Gu & Dao 2023, §3.3)
and recurrentgemma's Pallas LRU. The [b, t, e, n] states of S6 are never written to memory.

Grid: (batch, channel blocks, time blocks). On TPU the time axis is a sequential ("arbitrary")
grid axis, so a time block's inputs fit VMEM, and the state is carried across time blocks in the
h_last output block, which stays resident while only the time index changes (the accumulator
pattern). Triton programs cannot carry anything between grid steps, so on GPU one time block
spans the whole sequence and the kernel reads one time row per loop step. On CPU the kernels run
with `interpret=True` (slowly; for tests).

Gradients: `jax.custom_vjp`. The linear scan's adjoint is the same recurrence backwards (see
`segment.py`), run by the same kernel in reverse. S6's backward pass uses the chunked
implementation's hand-derived VJP (recomputing states chunk by chunk).

On an NVIDIA H200 (jax 0.11.2, Triton) both kernels compile and pass the scan tests' PALLAS
cases (values and gradients against REFERENCE; `scripts/accelerator_check.sh`); on TPU they are
lowered with `jax.export` in the tests but not yet compiled on hardware. CI runs interpret mode.
Inputs are cast to float32 before the kernel: packed
bf16 rows would need layouts not every Mosaic version loads dynamically, and the recurrence
accumulates in float32 anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from fulcrum.modules.scan import chunked, segment

f32 = segment.f32


def _backend() -> str:
  return jax.default_backend()


def _tiles(t: int, channels: int) -> tuple[int, int]:
  """(time block, channel block) for this backend.

  TPU: 128 lanes of channels, 256 time rows per VMEM block. GPU: the whole sequence in one time
  block (Triton has no cross-program carry), 64 channels per program so that a long Mamba layer
  still launches many programs. CPU (interpret): small time blocks to exercise the carry.
  Unmeasured on hardware — starting points to tune.
  """
  backend = _backend()
  t8 = _round_up(t, 8)
  if backend == "gpu":
    return t8, min(64, pl.next_power_of_2(channels))
  if backend == "tpu":
    return min(256, t8), 128
  return min(64, t8), min(128, channels)


def _compiler_params():
  backend = _backend()
  if backend == "gpu":
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=2, num_stages=1)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  return None


def _pad(z: Array, axis: int, size: int, value: float = 0.0) -> Array:
  """Pads `axis` of z up to `size` with `value`."""
  if z.shape[axis] == size:
    return z
  widths = [(0, 0)] * z.ndim
  widths[axis] = (0, size - z.shape[axis])
  return jnp.pad(z, widths, constant_values=value)


def _round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def _time_index(reverse: bool, num_blocks: int):
  """Block index along time for grid step k (blocks visited last-first when `reverse`)."""
  return (lambda k: num_blocks - 1 - k) if reverse else (lambda k: k)


def _carried_state(h0_ref, h_last_ref):
  """h0 in the first time block, else the state the previous time block left in h_last's block.

  A select rather than a store and a load: Triton does not order one program's global-memory
  write before its read when different threads touch the element.
  """
  return jnp.where(pl.program_id(2) == 0, h0_ref[...], h_last_ref[...])


# ---------------------------------------------------------------- linear recurrence (RG-LRU)


def _linear_kernel(a_ref, x_ref, h0_ref, h_ref, h_last_ref, *, block_t: int, reverse: bool):
  def step(i, h):
    row = block_t - 1 - i if reverse else i
    h = a_ref[pl.ds(row, 1), :] * h + x_ref[pl.ds(row, 1), :]  # [1, block_d]
    h_ref[pl.ds(row, 1), :] = h
    return h

  h_last_ref[...] = jax.lax.fori_loop(0, block_t, step, _carried_state(h0_ref, h_last_ref))


def _linear_call(
  a: Array, x: Array, h0: Array, reverse: bool
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """Runs h_t = a_t h_{t-1} + x_t (h_t = a_t h_{t+1} + x_t when `reverse`) in the kernel."""
  b, t, d = a.shape
  block_t, block_d = _tiles(t, d)
  t_pad, d_pad = _round_up(t, block_t), _round_up(d, block_d)
  # Identity steps (a = 1, x = 0) pad time; padded channels are sliced off.
  a = _pad(_pad(f32(a), 1, t_pad, 1.0), 2, d_pad, 1.0)
  x = _pad(_pad(f32(x), 1, t_pad), 2, d_pad)
  h0 = _pad(f32(h0), 1, d_pad)[:, None, :]  # [b, 1, d]: 2-D blocks for Mosaic.
  nt = t_pad // block_t
  time = _time_index(reverse, nt)
  seq_spec = pl.BlockSpec((None, block_t, block_d), lambda i, j, k: (i, time(k), j))
  state_spec = pl.BlockSpec((None, 1, block_d), lambda i, j, k: (i, 0, j))
  hs, h_last = pl.pallas_call(
    functools.partial(_linear_kernel, block_t=block_t, reverse=reverse),
    out_shape=(
      jax.ShapeDtypeStruct((b, t_pad, d_pad), jnp.float32),
      jax.ShapeDtypeStruct((b, 1, d_pad), jnp.float32),
    ),
    grid=(b, d_pad // block_d, nt),
    in_specs=[seq_spec, seq_spec, state_spec],
    out_specs=[seq_spec, state_spec],
    compiler_params=_compiler_params(),
    interpret=_backend() == "cpu",
    name="linear_scan_reverse" if reverse else "linear_scan",
  )(a, x, h0)
  return hs[:, :t, :d], h_last[:, 0, :d]


@jax.custom_vjp
def _linear(a, x, h0):
  return _linear_call(a, x, h0, reverse=False)


def _linear_fwd(a, x, h0):
  hs, h_last = _linear_call(a, x, h0, reverse=False)
  return (hs, h_last), (a, hs, h0, jnp.zeros((0,), x.dtype))


def _linear_bwd(res, cts):
  a, hs, h0, x_like = res
  dhs, dh_last = cts
  a32 = f32(a)
  # The adjoint g_t = a_{t+1} g_{t+1} + ∂̄h_t is the same kernel run backwards (segment.py).
  g, _ = _linear_call(
    segment.shift_next(a32), dhs.at[:, -1].add(dh_last), jnp.zeros_like(dh_last), reverse=True
  )
  da = g * segment.shift_prev(hs, f32(h0))
  dh0 = a32[:, 0] * g[:, 0]
  return da.astype(a.dtype), g.astype(x_like.dtype), dh0.astype(h0.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_scan(
  a: Float[Array, "b t d"], x: Float[Array, "b t d"], h0: Float[Array, "b d"] | None = None
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t by the Pallas kernel, in float32; returns (h, h_last)."""
  b, _, d = a.shape
  return _linear(a, x, segment.initial_state(h0, (b, d)))


# ---------------------------------------------------------------- selective scan (Mamba S6)


def _selective_kernel(
  x_ref, dt_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, h_last_ref, *, block_t: int
):
  # The state is [n, block_e]: channels on the fast (lane) axis, n on rows.
  A = A_ref[...]  # [n, block_e]
  n = A.shape[0]
  # B_t and C_t arrive as [1, n] rows but multiply the state as [n, 1] columns. Masking with the
  # identity and summing lanes turns one into the other with ops both Triton and Mosaic lower.
  eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
    jnp.int32, (n, n), 1
  )
  column = lambda row: jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)

  def step(i, h):
    dt = dt_ref[pl.ds(i, 1), :]  # [1, block_e]
    u = dt * x_ref[pl.ds(i, 1), :]
    h = jnp.exp(dt * A) * h + column(B_ref[pl.ds(i, 1), :]) * u  # [n, block_e]
    y_ref[pl.ds(i, 1), :] = jnp.sum(column(C_ref[pl.ds(i, 1), :]) * h, axis=0, keepdims=True)
    return h

  h_last_ref[...] = jax.lax.fori_loop(0, block_t, step, _carried_state(h0_ref, h_last_ref))


def _selective_call(x, dt, A, B, C, h0):
  """S6 without the D skip in the kernel: (y float32 [b, t, e], h_last [b, e, n])."""
  (b, t, e), n = x.shape, A.shape[-1]
  block_t, block_e = _tiles(t, e)
  # Triton needs power-of-two tensors: zero-padded states never receive input (B = 0) and are
  # never read (C = 0); padded channels have Δ = 0, the identity step.
  t_pad, e_pad = _round_up(t, block_t), _round_up(e, block_e)
  n_pad = pl.next_power_of_2(n) if _backend() == "gpu" else n
  x, dt = (_pad(_pad(f32(z), 1, t_pad), 2, e_pad) for z in (x, dt))
  B, C = (_pad(_pad(f32(z), 1, t_pad), 2, n_pad) for z in (B, C))
  A_t = _pad(_pad(f32(A), 0, e_pad), 1, n_pad).T  # [n, e]
  h0_t = _pad(_pad(f32(h0), 1, e_pad), 2, n_pad).transpose(0, 2, 1)  # [b, n, e]
  nt = t_pad // block_t
  chan_spec = pl.BlockSpec((None, block_t, block_e), lambda i, j, k: (i, k, j))
  state_row_spec = pl.BlockSpec((None, block_t, n_pad), lambda i, j, k: (i, k, 0))
  state_spec = pl.BlockSpec((None, n_pad, block_e), lambda i, j, k: (i, 0, j))
  y, h_last = pl.pallas_call(
    functools.partial(_selective_kernel, block_t=block_t),
    out_shape=(
      jax.ShapeDtypeStruct((b, t_pad, e_pad), jnp.float32),
      jax.ShapeDtypeStruct((b, n_pad, e_pad), jnp.float32),
    ),
    grid=(b, e_pad // block_e, nt),
    in_specs=[
      chan_spec,
      chan_spec,
      pl.BlockSpec((n_pad, block_e), lambda i, j, k: (0, j)),
      state_row_spec,
      state_row_spec,
      state_spec,
    ],
    out_specs=[chan_spec, state_spec],
    compiler_params=_compiler_params(),
    interpret=_backend() == "cpu",
    name="selective_scan",
  )(x, dt, A_t, B, C, h0_t)
  return y[:, :t, :e], h_last.transpose(0, 2, 1)[:, :e, :n]


@jax.custom_vjp
def _selective(x, dt, A, B, C, h0):
  return _selective_call(x, dt, A, B, C, h0)


def _selective_fwd(x, dt, A, B, C, h0):
  return _selective_call(x, dt, A, B, C, h0), (x, dt, A, B, C, h0)


def _selective_bwd(res, cts):
  # Recomputes the states chunk by chunk and runs their adjoint (chunked.py, segment.py).
  _, vjp = jax.vjp(chunked.selective_states, *res)
  return vjp(cts)


_selective.defvjp(_selective_fwd, _selective_bwd)


def selective_scan(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  D: Float[Array, " e"] | None = None,
  h0: Float[Array, "b e n"] | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """Mamba's S6 (Gu & Dao 2023, Alg. 2) by the Pallas kernel; returns (y, h_last)."""
  (b, _, e), n = x.shape, A.shape[-1]
  y, h_last = _selective(x, dt, A, B, C, segment.initial_state(h0, (b, e, n)))
  return segment.add_skip(y, x, D), h_last
