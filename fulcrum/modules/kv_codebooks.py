"""KVQuant calibration (Hooper et al. 2024): Fisher-weighted k-means codebooks ("nuqX"),
per-channel key thresholds and the uniform integer baselines, fit offline from sampled keys and
values. The storage format they feed is `kvquant`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from fulcrum.modules.kvquant import (
  KVQuantSpec,
  check_bits,
  check_fraction,
  check_key_mode,
  check_layout,
  normalise,
  num_outliers,
)


def fit_codebook(
  samples: Float[np.ndarray, " n"], weights: Float[np.ndarray, " n"], bits: int, iters: int = 30
) -> Float[np.ndarray, " L"]:
  """Fisher-weighted 1-D k-means (Lloyd) codebook (KVQuant "nuqX", Hooper et al. 2024).

  Minimises sum_i w_i (s_i - c(s_i))^2 over 2**bits levels c, where c(s) is the level nearest
  to s. Levels start at the weighted quantiles (i + 1/2) / 2**bits and each iteration moves
  every level to the weighted mean of the samples nearest to it (same tie rule as `quantize`);
  a level with no weight keeps its place. Stops early when no level moves.

  Args:
    samples: normalised entries; clipped to [-1, 1].
    weights: non-negative weights (Fisher information, squared gradients); if their total is
      zero, uniform weights are used.
    bits: 1, 2, 3, 4 or 8.
    iters: maximum Lloyd iterations.

  Returns:
    float32 [2**bits] sorted levels in [-1, 1].

  Raises:
    ValueError: bits is unsupported, shapes differ, or there are no samples.
  """
  check_bits(bits)
  s = np.clip(np.asarray(samples, np.float64).ravel(), -1.0, 1.0)
  w = np.asarray(weights, np.float64).ravel()
  if s.shape != w.shape:
    raise ValueError(f"{s.size} samples but {w.size} weights; give one weight per sample")
  if not s.size:
    raise ValueError("fit_codebook needs at least one sample")
  w = np.where(np.isfinite(w), np.maximum(w, 0.0), 0.0)
  if not w.sum() > 0:
    w = np.ones_like(s)
  count = 2**bits
  order = np.argsort(s, kind="stable")
  s, w = s[order], w[order]
  cumulative = (np.cumsum(w) - w / 2) / w.sum()
  levels = np.interp((np.arange(count) + 0.5) / count, cumulative, s)
  for _ in range(iters):
    assign = np.searchsorted((levels[1:] + levels[:-1]) / 2, s, side="left")
    mass = np.bincount(assign, weights=w, minlength=count)
    moment = np.bincount(assign, weights=w * s, minlength=count)
    new = np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), levels)
    new = np.clip(np.sort(new), -1.0, 1.0)
    if np.array_equal(new, levels):
      break
    levels = new
  return levels.astype(np.float32)


def _pooled(
  z: np.ndarray, used: np.ndarray, index: np.ndarray, fisher: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Non-outlier normalised entries and their Fisher weights."""
  keep = np.ones(z.shape, bool)
  rows = np.broadcast_to(np.arange(z.shape[0])[:, None], index.shape)
  keep[rows[used], index[used]] = False
  return z[keep], fisher.reshape(z.shape)[keep]


def calibrate(
  keys: Float[np.ndarray, "n k e"],
  key_fisher: Float[np.ndarray, "n k e"],
  values: Float[np.ndarray, "n k e"],
  value_fisher: Float[np.ndarray, "n k e"],
  bits: int,
  outlier_fraction: float = 0.01,
  max_samples: int = 200_000,
  seed: int = 0,
) -> KVQuantSpec:
  """One layer's KVQuant spec from calibration activations (Hooper et al. 2024, Section 3).

  Per-channel key thresholds are the (f/2, 1 - f/2) quantiles over the n tokens (f =
  outlier_fraction). Keys are normalised per channel and values per token, with
  C = ceil(f · D) outliers per vector removed exactly as `quantize` does; the remaining entries
  are pooled with their Fisher weights (a seeded subsample of max_samples if larger) and one
  Fisher-weighted k-means codebook is fit for keys and one for values.

  Args:
    keys, values: [n, k, e] pre-RoPE keys and values of n calibration tokens.
    key_fisher, value_fisher: [n, k, e] Fisher information (squared gradients) of each entry.
    bits: 1, 2, 3, 4 or 8.
    outlier_fraction: share of each vector kept as sparse outliers, in [0, 0.5).
    max_samples: cap on the pooled entries per codebook.
    seed: for the subsample.

  Returns:
    A "channel"-mode, pre-RoPE spec with outliers = C.

  Raises:
    ValueError: bad bits / outlier_fraction, or mismatched shapes.
  """
  check_bits(bits)
  check_fraction(outlier_fraction)
  keys, values = np.asarray(keys, np.float32), np.asarray(values, np.float32)
  shapes = {a.shape for a in (keys, key_fisher, values, value_fisher)}
  if len(shapes) != 1 or keys.ndim != 3:
    raise ValueError(
      f"keys, values and their Fisher information must share one [n, k, e] shape; got {shapes}"
    )
  n, k, e = keys.shape
  size = k * e
  capacity = num_outliers(outlier_fraction, size)
  half = outlier_fraction / 2
  lower = np.quantile(keys, half, axis=0)
  upper = np.quantile(keys, 1 - half, axis=0)
  tiny = float(np.finfo(np.float32).tiny)
  spec = KVQuantSpec(
    key_codebook=jnp.linspace(-1.0, 1.0, 2**bits, dtype=jnp.float32),
    value_codebook=jnp.linspace(-1.0, 1.0, 2**bits, dtype=jnp.float32),
    key_center=jnp.asarray((upper + lower) / 2, jnp.float32),
    key_scale=jnp.asarray(np.maximum((upper - lower) / 2, tiny), jnp.float32),
    key_mode="channel",
    outliers=capacity,
    pre_rope=True,
  )
  rng = np.random.default_rng(seed)
  normalise_jit = jax.jit(normalise, static_argnames="per_channel")
  books = []
  for x, fisher, per_channel in ((keys, key_fisher, True), (values, value_fisher, False)):
    check_layout(spec, size, per_channel)
    z, _, _, index, used = normalise_jit(jnp.asarray(x.reshape(n, size)), spec, per_channel)
    s, w = _pooled(np.asarray(z), np.asarray(used), np.asarray(index), np.asarray(fisher))
    if s.size > max_samples:
      pick = rng.choice(s.size, max_samples, replace=False)
      s, w = s[pick], w[pick]
    books.append(jnp.asarray(fit_codebook(s, w, bits)))
  return spec.replace(key_codebook=books[0], value_codebook=books[1])


def uniform(
  bits: int,
  num_kv_heads: int,
  head_dim: int,
  key_mode: str = "token",
  keys: Float[np.ndarray, "n k e"] | None = None,
  pre_rope: bool | None = None,
) -> KVQuantSpec:
  """The integer baseline: uniform levels linspace(-1, 1, 2**bits) and no outliers.

  Args:
    bits: 1, 2, 3, 4 or 8.
    num_kv_heads, head_dim: the vector layout.
    key_mode: "token" (per-token min/max keys, the classic int baseline) or "channel"
      (per-channel min/max of the calibration `keys`).
    keys: [n, k, e] calibration keys, required for "channel".
    pre_rope: defaults to False for "token" (post-RoPE baseline) and True for "channel".

  Raises:
    ValueError: bad bits / key_mode, or "channel" without matching `keys`.
  """
  check_bits(bits)
  check_key_mode(key_mode)
  shape = (num_kv_heads, head_dim)
  center, scale = np.zeros(shape, np.float32), np.ones(shape, np.float32)
  if key_mode == "channel":
    if keys is None:
      raise ValueError("key_mode='channel' needs calibration keys; pass keys=[n, k, e]")
    keys = np.asarray(keys, np.float32)
    if keys.shape[1:] != shape:
      raise ValueError(f"keys have shape {keys.shape}; expected [n, {num_kv_heads}, {head_dim}]")
    lower, upper = keys.min(axis=0), keys.max(axis=0)
    center = (upper + lower) / 2
    scale = np.maximum((upper - lower) / 2, np.finfo(np.float32).tiny)
  book = jnp.linspace(-1.0, 1.0, 2**bits, dtype=jnp.float32)
  return KVQuantSpec(
    key_codebook=book,
    value_codebook=book,
    key_center=jnp.asarray(center, jnp.float32),
    key_scale=jnp.asarray(scale, jnp.float32),
    key_mode=key_mode,
    outliers=0,
    pre_rope=(key_mode == "channel") if pre_rope is None else pre_rope,
  )
