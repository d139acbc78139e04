"""The sequential `lax.scan` recurrences: the definitions every other implementation matches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def linear_scan(
  a: Float[Array, "b t d"], x: Float[Array, "b t d"], h0: Float[Array, "b d"] | None = None
) -> tuple[Float[Array, "b t d"], Float[Array, "b d"]]:
  """h_t = a_t ⊙ h_{t-1} + x_t in float32; returns all h_t and the last state."""
  a32, x32 = a.astype(jnp.float32), x.astype(jnp.float32)
  h = jnp.zeros(a.shape[::2], jnp.float32) if h0 is None else h0.astype(jnp.float32)

  def step(h, ax):
    a_t, x_t = ax
    h = a_t * h + x_t
    return h, h

  last, hs = jax.lax.scan(step, h, (jnp.swapaxes(a32, 0, 1), jnp.swapaxes(x32, 0, 1)))
  return jnp.swapaxes(hs, 0, 1), last


def selective_scan(
  x: Float[Array, "b t e"],
  dt: Float[Array, "b t e"],
  A: Float[Array, "e n"],
  B: Float[Array, "b t n"],
  C: Float[Array, "b t n"],
  D: Float[Array, " e"] | None = None,
  h0: Float[Array, "b e n"] | None = None,
) -> tuple[Float[Array, "b t e"], Float[Array, "b e n"]]:
  """Mamba's S6 recurrence (Gu & Dao 2023, Alg. 2) with zero-order-hold A and Euler B.

  h_t = exp(dt_t A) ⊙ h_{t-1} + (dt_t x_t) B_t,  y_t = C_t · h_t + D ⊙ x_t, in float32.
  `dt` is the positive step (softplus already applied). Returns y (x's dtype) and the last h.
  """
  f32 = lambda z: z.astype(jnp.float32)
  b, _, e = x.shape
  n = A.shape[-1]
  h = jnp.zeros((b, e, n), jnp.float32) if h0 is None else f32(h0)

  def step(h, inp):
    x_t, dt_t, B_t, C_t = inp  # [b, e], [b, e], [b, n], [b, n]
    h = jnp.exp(dt_t[..., None] * f32(A)) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
    return h, jnp.einsum("ben,bn->be", h, C_t)

  seq = tuple(jnp.swapaxes(f32(z), 0, 1) for z in (x, dt, B, C))
  last, ys = jax.lax.scan(step, h, seq)
  y = jnp.swapaxes(ys, 0, 1)
  if D is not None:
    y = y + f32(x) * f32(D)
  return y.astype(x.dtype), last
