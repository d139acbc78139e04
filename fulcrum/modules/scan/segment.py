"""One segment of an affine recurrence, its two evaluation orders and its hand-derived VJPs.

Both scans are the affine recurrence h_t = a_t ⊙ h_{t-1} + x_t (Martin & Cundy 2018, eq. 1;
De et al. 2024, eq. 4 for the RG-LRU; Gu & Dao 2023, eq. 2a with a_t = exp(Δ_t A) for S6). Its
elements (a, x) compose associatively, (a₁, x₁) ∘ (a₂, x₂) = (a₁a₂, a₂x₁ + x₂) (Blelloch 1990),
which is what `lax.associative_scan` evaluates in O(log t) depth.

The adjoint of the recurrence is the same recurrence run backwards (Martin & Cundy 2018, §3):
with g_t = ∂L/∂h_t accumulated through time,

  g_t = ∂̄h_t + a_{t+1} ⊙ g_{t+1},   ∂L/∂x_t = g_t,   ∂L/∂a_t = g_t ⊙ h_{t-1},   ∂L/∂h_0 = a_1 ⊙ g_1.

Writing that backward pass by hand (instead of differentiating through the scan) is what makes the
fast implementations fast: JAX's autodiff of a `lax.scan` stacks every step's residuals and runs
a much slower transposed loop. Every function here works on one segment held whole in memory;
`chunked.py` strings segments together and `associative.py` uses one segment for the sequence.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# How a segment's steps are evaluated: `associative` is the O(log t)-depth parallel prefix
# (accelerators); `sequential` is a static Python loop that XLA fuses into one pass over the
# segment (CPU, where memory traffic rather than depth bounds the speed).
Order = Literal["associative", "sequential"]

f32 = lambda z: jnp.asarray(z, jnp.float32)


def combine(earlier: tuple[Array, Array], later: tuple[Array, Array]) -> tuple[Array, Array]:
  """Composes two affine maps h ↦ a·h + x, `earlier` applied first (the scan's monoid)."""
  a1, x1 = earlier
  a2, x2 = later
  return a1 * a2, a2 * x1 + x2


def affine_scan(
  a: Float[Array, "b t ..."], x: Float[Array, "b t ..."], *, order: Order, reverse: bool = False
) -> Float[Array, "b t ..."]:
  """All states of h_t = a_t ⊙ h_{t-1} + x_t over axis 1, starting from zero.

  With `reverse`, h_t = a_t ⊙ h_{t+1} + x_t from the end instead (the adjoint's direction).
  """
  if order == "associative":
    return jax.lax.associative_scan(combine, (a, x), axis=1, reverse=reverse)[1]
  t = a.shape[1]
  hs: list[Array] = [x[:, 0]] * t
  h = None
  for i in reversed(range(t)) if reverse else range(t):
    h = x[:, i] if h is None else a[:, i] * h + x[:, i]
    hs[i] = h
  return jnp.stack(hs, axis=1)


def shift_next(a: Array) -> Array:
  """a_{t+1} at position t, 1 past the end: the coefficients of the adjoint recurrence."""
  return jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)


def shift_prev(hs: Array, h0: Array) -> Array:
  """h_{t-1} at position t, with h0 before the start."""
  return jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)


# ---------------------------------------------------------------- linear recurrence (RG-LRU)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear_segment(
  a: Float[Array, "b t d"], x: Float[Array, "b t d"], h0: Float[Array, "b d"], order: Order
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t from h0 over a segment, in float32; returns (h, h_last)."""
  hs = _linear_states(a, x, h0, order)
  return hs, hs[:, -1]


def _linear_states(a, x, h0, order):
  a32, x32 = f32(a), f32(x)
  x32 = x32.at[:, 0].add(a32[:, 0] * f32(h0))  # Fold h0 into the first step.
  return affine_scan(a32, x32, order=order)


def _linear_fwd(a, x, h0, order):
  hs = _linear_states(a, x, h0, order)
  # An empty array carries x's dtype (a residual must be an array) for its cotangent.
  return (hs, hs[:, -1]), (a, hs, h0, jnp.zeros((0,), x.dtype))


def _linear_bwd(order, res, cts):
  a, hs, h0, x_like = res
  dhs, dh_last = cts
  a32 = f32(a)
  g = affine_scan(shift_next(a32), dhs.at[:, -1].add(dh_last), order=order, reverse=True)
  da = g * shift_prev(hs, f32(h0))
  dh0 = a32[:, 0] * g[:, 0]
  return da.astype(a.dtype), g.astype(x_like.dtype), dh0.astype(h0.dtype)


linear_segment.defvjp(_linear_fwd, _linear_bwd)


# ---------------------------------------------------------------- selective scan (Mamba S6)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def selective_segment(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  h0: Float[Array, "b e n"],
  order: Order,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """S6 over a segment (Gu & Dao 2023, Alg. 2, eq. 2a-b, 4), without the D skip, in float32.

  h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_t,  y_t = C_t · h_t. Returns (y float32, h_last).
  Materialises the segment's [b, t, e, n] states, so callers keep segments short.
  """
  _, hs = _selective_states(x, dt, A, B, h0, order)
  return jnp.einsum("bten,btn->bte", hs, f32(C)), hs[:, -1]


def _selective_states(x, dt, A, B, h0, order):
  dt32 = f32(dt)
  decay = jnp.exp(dt32[..., None] * f32(A))  # Ā_t = exp(Δ_t A), zero-order hold.
  inp = (dt32 * f32(x))[..., None] * f32(B)[:, :, None, :]  # B̄_t x_t = Δ_t B_t x_t (Euler).
  inp = inp.at[:, 0].add(decay[:, 0] * f32(h0))
  return decay, affine_scan(decay, inp, order=order)


def _selective_fwd(x, dt, A, B, C, h0, order):
  decay, hs = _selective_states(x, dt, A, B, h0, order)
  y = jnp.einsum("bten,btn->bte", hs, f32(C))
  return (y, hs[:, -1]), (x, dt, A, B, C, h0, decay, hs)


def _selective_bwd(order, res, cts):
  x, dt, A, B, C, h0, decay, hs = res
  dy, dh_last = cts
  x32, dt32, A32, B32, C32 = map(f32, (x, dt, A, B, C))
  # ∂L/∂h_t from the readout y_t = C_t·h_t, then accumulated backwards through the decays.
  g_in = (dy[..., None] * C32[:, :, None, :]).at[:, -1].add(dh_last)
  g = affine_scan(shift_next(decay), g_in, order=order, reverse=True)
  # ∂L/∂(Δ_t A) = g_t ⊙ h_{t-1} ⊙ Ā_t (the exp's derivative is itself).
  d_log_decay = g * shift_prev(hs, f32(h0)) * decay
  du = jnp.einsum("bten,btn->bte", g, B32)  # u_t = Δ_t x_t
  dA = jnp.einsum("bten,bte->en", d_log_decay, dt32)
  ddt = jnp.einsum("bten,en->bte", d_log_decay, A32) + du * x32
  dB = jnp.einsum("bten,bte->btn", g, dt32 * x32)
  dC = jnp.einsum("bte,bten->btn", dy, hs)
  dh0 = decay[:, 0] * g[:, 0]
  grads = (du * dt32, ddt, dA, dB, dC, dh0)
  return tuple(d.astype(p.dtype) for d, p in zip(grads, (x, dt, A, B, C, h0), strict=True))


selective_segment.defvjp(_selective_fwd, _selective_bwd)


# ---------------------------------------------------------------- shared by every implementation


def initial_state(h0: Array | None, shape: tuple[int, ...]) -> Float[Array, "..."]:
  """h0 in float32, or zeros of `shape` when absent (the recurrence starts from rest)."""
  return jnp.zeros(shape, jnp.float32) if h0 is None else f32(h0)


def add_skip(
  y: Float[Array, "b t e"], x: Float[Array, "b t e"], D: Float[Array, " e"] | None
) -> Float[Array, "b t e"]:
  """y + D ⊙ x (Gu & Dao 2023, Alg. 2 line 6's skip), cast to x's dtype as the API promises."""
  if D is not None:
    y = y + f32(x) * f32(D)
  return y.astype(x.dtype)
