"""KVQuant KV-cache quantization (Hooper et al. 2024): bit packing round-trips, outliers come back
exactly, error falls with bits, per-channel keys beat per-token keys on outlier channels, the
Fisher-weighted codebook is a Lloyd fixed point, reconstruction equals a naive numpy reference,
the byte accounting matches a hand count, and everything runs under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.modules import kv_codebooks as kc
from fulcrum.modules import kvquant as kq


def spec_for(book, k, e, center=0.0, scale=1.0, **kw) -> kq.KVQuantSpec:
  book = jnp.asarray(book, jnp.float32)
  return kq.KVQuantSpec(
    key_codebook=book,
    value_codebook=book,
    key_center=jnp.full((k, e), center, jnp.float32),
    key_scale=jnp.full((k, e), scale, jnp.float32),
    **kw,
  )


@functools.partial(jax.jit, static_argnames="kind")
def _roundtrip(x, spec, kind):
  return kq.dequantize(kq.quantize(x, spec, kind), spec, kind, x.shape[-2:])


quantize = jax.jit(kq.quantize, static_argnames="kind")
dequantize = jax.jit(kq.dequantize, static_argnames=("kind", "shape"))


def roundtrip(x, spec, kind) -> np.ndarray:
  """dequantize(quantize(x)) as numpy, jitted (one compile beats many eager dispatches)."""
  return np.asarray(_roundtrip(jnp.asarray(x), spec, kind))


def rel_mse(approx, x) -> float:
  return float(np.sum((approx - x) ** 2) / np.sum(x**2))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
  size = 24 if bits == 1 else 40  # 3-bit: 40 codes = 15 bytes (not a multiple of 8 codes/byte).
  codes = np.random.default_rng(bits).integers(0, 2**bits, (2, 3, size), dtype=np.uint8)
  packed = kq.pack_codes(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (2, 3, size * bits // 8)
  np.testing.assert_array_equal(np.asarray(kq.unpack_codes(packed, bits, size)), codes)
  # Distinct codes produce distinct bytes (not, e.g., every code collapsed to zero).
  assert len({bytes(row) for row in np.asarray(packed).reshape(-1, packed.shape[-1])}) == 6
  with pytest.raises(ValueError, match="multiple of 8"):
    kq.pack_codes(jnp.zeros((5,), jnp.uint8), 3)
  with pytest.raises(ValueError, match="multiple of 8"):
    kq.unpack_codes(jnp.zeros((2,), jnp.uint8), 3, 5)


def test_pack_three_bits_layout():
  # Little-endian bit stream: code i occupies bits [3i, 3i + 3).
  packed = np.asarray(kq.pack_codes(jnp.asarray([1, 0, 0, 0, 0, 0, 0, 7], jnp.uint8), 3))
  np.testing.assert_array_equal(packed, [1, 0, 0b11100000])


def planted(shape, positions_per_token, seed, magnitude=(20.0, 50.0)):
  """Gaussian [b, t, k, e], clipped to +-3.5, with `positions_per_token[t]` large entries planted
  per token; returns it and the [b, t, D] mask of planted entries."""
  rng = np.random.default_rng(seed)
  x = np.clip(rng.standard_normal(shape), -3.5, 3.5).astype(np.float32)
  flat = x.reshape(*shape[:2], -1)
  where = np.zeros(flat.shape, bool)
  for b in range(shape[0]):
    for t in range(shape[1]):
      count = positions_per_token[t % len(positions_per_token)]
      pos = rng.choice(flat.shape[-1], count, replace=False)
      flat[b, t, pos] = rng.uniform(*magnitude, count) * rng.choice([-1, 1], count)
      where[b, t, pos] = True
  return x, where


@pytest.mark.parametrize("outlier_dtype", ["float32", "float16"])
def test_outliers_round_trip_exactly(outlier_dtype):
  k, e = 2, 16
  spec = spec_for(np.linspace(-1, 1, 8), k, e, scale=4.0, outliers=3, outlier_dtype=outlier_dtype)
  # Values (per token): three planted per token fill the capacity.
  x, where = planted((2, 4, k, e), [3], seed=0)
  if outlier_dtype == "float16":
    x = x.astype(np.float16).astype(np.float32)
  out = roundtrip(x, spec, "value").reshape(where.shape)
  np.testing.assert_array_equal(out[where], x.reshape(where.shape)[where])
  assert np.abs(out - x.reshape(where.shape))[~where].max() < 1.0  # The rest quantized, not lost.

  # Keys (per channel, |z| > 1 only): 0-2 planted per token, so some slots stay unused.
  # Unplanted entries are clipped to |x| <= 3.5, so |z| = |x| / 4 <= 1: never outliers.
  x, where = planted((2, 6, k, e), [0, 1, 2], seed=1)
  if outlier_dtype == "float16":
    x = x.astype(np.float16).astype(np.float32)
  q = quantize(jnp.asarray(x), spec, "key")
  index = np.asarray(q.outlier_index)
  assert q.center.shape == (2, 6, 0) and index.dtype == np.uint8  # D = 32 < 256.
  for b in range(2):
    for t in range(6):
      used = index[b, t][index[b, t] < k * e]
      assert set(used) == set(np.flatnonzero(where[b, t]))  # Unused slots carry D.
  out = np.asarray(dequantize(q, spec, "key", (k, e))).reshape(where.shape)
  np.testing.assert_array_equal(out[where], x.reshape(where.shape)[where])
  assert np.abs(out - x.reshape(where.shape))[~where].max() < 1.0


def kv_data(n, k, e, seed):
  """Keys with a few outlier channels (10-20x larger, consistent sign) and Gaussian values."""
  rng = np.random.default_rng(seed)
  magnitude = np.ones(k * e)
  channels = [3, k * e // 2 + 1, k * e - 5]
  magnitude[channels] = [12.0, 20.0, 15.0]
  offset = np.zeros(k * e)
  offset[channels] = [1.0, -1.0, 1.0]
  magnitude, offset = magnitude.reshape(k, e), offset.reshape(k, e)
  keys = magnitude * (offset + 0.5 * rng.standard_normal((n, k, e)))
  values = rng.standard_normal((n, k, e))
  return keys.astype(np.float32), values.astype(np.float32)


@pytest.fixture(scope="module")
def kv():
  k, e = 2, 32
  keys, values = kv_data(1200, k, e, seed=0)
  test_keys, test_values = kv_data(64, k, e, seed=1)
  return k, e, keys, values, test_keys[None], test_values[None]


def test_error_falls_with_bits(kv):
  k, e, keys, values, test_keys, test_values = kv
  rng = np.random.default_rng(2)
  fisher_k, fisher_v = rng.exponential(size=keys.shape), rng.exponential(size=values.shape)
  errors = {"nuq": [], "int": []}
  for bits in (2, 3, 4):
    nuq = kc.calibrate(keys, fisher_k, values, fisher_v, bits, max_samples=20_000)
    assert nuq.bits == bits and nuq.outliers == 1 and nuq.key_mode == "channel"
    uni = kc.uniform(bits, k, e)
    for name, spec in (("nuq", nuq), ("int", uni)):
      errors[name].append(
        (
          rel_mse(roundtrip(test_keys, spec, "key"), test_keys),
          rel_mse(roundtrip(test_values, spec, "value"), test_values),
        )
      )
  for name, errs in errors.items():
    for kind in (0, 1):
      e2, e3, e4 = (err[kind] for err in errs)
      assert e2 > e3 > e4, (name, kind, errs)
  # The calibrated NUQ with outliers beats the per-token integer baseline at each width.
  for nuq_err, int_err in zip(errors["nuq"], errors["int"], strict=True):
    assert nuq_err[0] < int_err[0] and nuq_err[1] < int_err[1]


def test_per_channel_keys_beat_per_token_keys(kv):
  k, e, keys, _, test_keys, _ = kv
  per_token = kc.uniform(3, k, e, key_mode="token")
  per_channel = kc.uniform(3, k, e, key_mode="channel", keys=keys)
  assert not per_token.pre_rope and per_channel.pre_rope
  err_token = rel_mse(roundtrip(test_keys, per_token, "key"), test_keys)
  err_channel = rel_mse(roundtrip(test_keys, per_channel, "key"), test_keys)
  assert err_channel < err_token / 3, (err_channel, err_token)


def nearest(samples, levels):
  return np.argmin(np.abs(samples[:, None] - levels[None, :]), axis=1)


def test_fit_codebook_is_a_weighted_lloyd_fixed_point():
  rng = np.random.default_rng(0)
  samples = np.clip(0.4 * rng.standard_normal(4000), -1, 1)
  weights = rng.exponential(size=samples.size)
  levels = kc.fit_codebook(samples, weights, 3, iters=1000).astype(np.float64)
  assert levels.shape == (8,)
  assert np.all(np.diff(levels) > 0) and levels.min() >= -1 and levels.max() <= 1
  assign = nearest(samples, levels)
  for i, level in enumerate(levels):
    mine = assign == i
    assert mine.any()
    mean = np.sum(weights[mine] * samples[mine]) / np.sum(weights[mine])
    assert abs(level - mean) < 1e-4, (i, level, mean)

  # Fisher weighting pulls levels toward the heavily weighted samples.
  even = np.linspace(-1, 1, 2001)
  plain = kc.fit_codebook(even, np.ones_like(even), 3, iters=200)
  heavy = kc.fit_codebook(even, np.where(even > 0.5, 100.0, 1.0), 3, iters=200)
  assert np.sum(heavy > 0.5) > np.sum(plain > 0.5)
  # Zero total weight falls back to uniform weights.
  np.testing.assert_allclose(kc.fit_codebook(even, np.zeros_like(even), 3, iters=200), plain)

  # On Gaussian-like data the fitted levels beat the uniform grid in weighted MSE.
  def weighted_mse(book):
    return np.sum(weights * (samples - book[nearest(samples, book)]) ** 2)

  assert weighted_mse(levels) < 0.8 * weighted_mse(np.linspace(-1, 1, 8))


def reference(x, spec, kind):
  """Naive numpy KVQuant: normalise, nearest level, denormalise, outliers, one vector at a time."""
  book = np.asarray(spec.key_codebook if kind == "key" else spec.value_codebook)
  lead, size = x.shape[:2], x.shape[2] * x.shape[3]
  flat = x.reshape(-1, size).astype(np.float32)
  out = np.zeros_like(flat)
  capacity = spec.outliers
  odt = np.dtype(spec.outlier_dtype)
  for row, v in enumerate(flat):
    if kind == "key" and spec.key_mode == "channel":
      center = np.asarray(spec.key_center).reshape(size)
      scale = np.asarray(spec.key_scale).reshape(size)
      z = (v - center) / scale
      candidates = [i for i in np.argsort(-np.abs(z), kind="stable") if abs(z[i]) > 1]
      outliers = candidates[:capacity]
    else:
      outliers = list(np.argsort(-np.abs(v - v.mean()), kind="stable")[:capacity])
      rest = np.delete(v, outliers)
      sdt = np.dtype(spec.scale_dtype)
      center = np.float32(sdt.type((rest.max() + rest.min()) / 2))
      scale = np.float32(sdt.type((rest.max() - rest.min()) / 2))
      z = (v - center) / scale
    levels = book[nearest(np.clip(z, -1, 1), book)]
    out[row] = levels * scale + center
    out[row, outliers] = v[outliers].astype(odt).astype(np.float32)
  return out.reshape(*lead, *x.shape[2:])


@pytest.mark.parametrize("kind", ["key", "value"])
def test_matches_naive_reference(kind):
  k, e = 2, 8
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 4, k, e)).astype(np.float32)
  # Values: center ~100 (float16 steps of 2^-4) and scale ~1, so the rounded center moves entries
  # across level boundaries unless the rounded center is also the one used to normalise.
  x = 0.5 * x + 100 if kind == "value" else 2 * x
  book = np.sort(np.tanh(rng.standard_normal(8) * 0.8)).astype(np.float32)
  spec = kq.KVQuantSpec(
    key_codebook=jnp.asarray(book),
    value_codebook=jnp.asarray(book[::-1] * -0.9),
    key_center=jnp.asarray(rng.standard_normal((k, e)) * 0.3, jnp.float32),
    key_scale=jnp.asarray(rng.uniform(1.5, 3.0, (k, e)), jnp.float32),
    outliers=2,
  )
  expected = reference(x, spec, kind)
  np.testing.assert_allclose(roundtrip(x, spec, kind), expected, rtol=1e-6, atol=1e-6)
  # The test data exercises outliers (per-channel ones too) and a nonuniform codebook.
  assert not np.allclose(roundtrip(x, spec.replace(outliers=0), kind), expected, atol=1e-3)


def test_bytes_per_token():
  spec = kc.uniform(3, 2, 64, key_mode="channel", keys=np.ones((1, 2, 64), np.float32))
  book = jnp.linspace(-1, 1, 8)
  spec = spec.replace(key_codebook=book, value_codebook=book, outliers=2)
  codes = 128 * 3 // 8
  keys = codes + 2 * (1 + 2)  # D = 128 < 256: uint8 outlier index + float16 value.
  values = codes + 2 + 2 + 2 * (1 + 2)
  assert kq.bytes_per_token(spec, 2, 64) == keys + values == 112
  keys, values = kv_data(300, 4, 64, seed=4)
  nuq = kc.calibrate(keys, np.ones_like(keys), values, np.ones_like(values), 3)
  assert nuq.outliers == 3  # ceil(1% of 256)
  assert 2 * 256 * 2 / kq.bytes_per_token(nuq, 4, 64) > 4.5
  empty = kq.empty(3, 5, 4, 64, nuq, "key")
  assert empty.codes.shape == (3, 5, 96) and empty.center.shape == (3, 5, 0)
  assert np.all(np.asarray(empty.outlier_index) == 256)  # Every slot unused.
  assert empty.outlier_index.dtype == np.int16  # D = 256 does not fit uint8's 0..255.


def test_jit_and_stacked_spec():
  k, e = 2, 16
  rng = np.random.default_rng(5)
  book = np.sort(np.tanh(rng.standard_normal(4))).astype(np.float32)
  spec = spec_for(book, k, e, center=0.1, scale=1.5, outliers=2)
  x, _ = planted((2, 5, k, e), [0, 1, 2], seed=6)
  for kind in ("key", "value"):
    q = quantize(jnp.asarray(x), spec, kind)
    assert q.codes.shape == (2, 5, k * e * 2 // 8) and q.outlier_index.shape == (2, 5, 2)
    out = dequantize(q, spec, kind, (k, e))
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference(x, spec, kind), rtol=1e-6, atol=1e-6)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), spec)
  assert stacked.bits == 2 and stacked.key_codebook.shape == (3, 4)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="bits in"):
    kc.uniform(5, 2, 8)
  with pytest.raises(ValueError, match="bits in"):
    kc.fit_codebook(np.zeros(4), np.ones(4), 6)
  x = np.zeros((4, 2, 8), np.float32)
  with pytest.raises(ValueError, match=r"in \[0, 0.5\)"):
    kc.calibrate(x, x, x, x, 3, outlier_fraction=0.5)
  with pytest.raises(ValueError, match="needs calibration keys"):
    kc.uniform(3, 2, 8, key_mode="channel")
  spec = spec_for(np.linspace(-1, 1, 8), 1, 5)
  with pytest.raises(ValueError, match="multiple of 8"):
    kq.quantize(jnp.zeros((1, 1, 1, 5)), spec, "value")
  with pytest.raises(ValueError, match="2\\*\\*bits"):
    _ = spec_for(np.linspace(-1, 1, 6), 1, 8).bits
