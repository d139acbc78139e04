"""Forecasters: DLinear/NLinear against naive NumPy references, their invariants (seasonal + trend
= x, level equivariance), parameter shapes, and the block-stack forecaster for every arch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules.forecasting import (
  DLinear,
  NLinear,
  SequenceForecaster,
  build_forecaster,
  decompose,
  moving_average,
)

# Small models and many short programs: XLA's optimisation passes would dominate the runtime.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

B, L, H, C = 3, 40, 7, 4
RTOL, ATOL = 1e-5, 1e-5


def inputs(seed: int = 0, shape=(B, L, C)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  trend = np.cumsum(rng.normal(size=shape), axis=1) * 0.3
  return (trend + rng.normal(size=shape)).astype(np.float32)


def moving_average_numpy(x: np.ndarray, k: int) -> np.ndarray:
  """LTSF-Linear's moving average: replicate the edges, then average windows of k, stride 1."""
  front = (k - 1) // 2
  padded = np.pad(x.astype(np.float64), ((0, 0), (front, k - 1 - front), (0, 0)), mode="edge")
  return np.stack([padded[:, t : t + k].mean(axis=1) for t in range(x.shape[1])], axis=1)


def time_linear_numpy(x: np.ndarray, p: dict) -> np.ndarray:
  """y[b, o, c] = sum_l x[b, l, c] W[l, o] + bias[o] (shared) or W[c, l, o], bias[c, o]."""
  w, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
  out = np.zeros((x.shape[0], w.shape[-1], x.shape[2]))
  for c in range(x.shape[2]):
    wc, bc = (w[c], bias[c]) if w.ndim == 3 else (w, bias)
    out[:, :, c] = x[:, :, c].astype(np.float64) @ wc + bc
  return out


def random_params(model: nn.Module, x: np.ndarray, seed: int = 1):
  """Initialised parameters, redrawn at random (DLinear's constant init would hide mistakes)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  leaves, tree = jax.tree.flatten(nn.unbox(shapes))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [0.2 * rng.normal(size=a.shape) for a in leaves])


@pytest.mark.parametrize("kernel", [25, 5, 4, 1, 60])
def test_moving_average_replicates_edges(kernel):
  x = inputs()
  got = np.asarray(moving_average(jnp.asarray(x), kernel))
  np.testing.assert_allclose(got, moving_average_numpy(x, kernel), rtol=RTOL, atol=ATOL)
  if kernel == 25:  # The first window holds 13 copies of x_0 (12 replicated) and x_1..x_12.
    first = (13 * x[:, 0] + x[:, 1:13].sum(axis=1)) / 25
    np.testing.assert_allclose(got[:, 0], first, rtol=RTOL, atol=ATOL)
    last = (13 * x[:, -1] + x[:, -13:-1].sum(axis=1)) / 25
    np.testing.assert_allclose(got[:, -1], last, rtol=RTOL, atol=ATOL)
  # A constant series is its own trend.
  const = jnp.full((1, 9, 2), 3.5)
  np.testing.assert_allclose(moving_average(const, kernel), const, rtol=RTOL)


@pytest.mark.parametrize("kernel", [25, 4])
def test_decomposition_sums_to_input(kernel):
  x = jnp.asarray(inputs(seed=2))
  seasonal, trend = decompose(x, kernel)
  np.testing.assert_allclose(seasonal + trend, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("individual", [False, True])
def test_dlinear_matches_numpy(individual):
  x = inputs(seed=3)
  model = DLinear(L, H, moving_avg=25, individual=individual)
  params = random_params(model, x)
  got = model.apply({"params": params}, x)
  assert got.shape == (B, H, C) and got.dtype == jnp.float32
  trend = moving_average_numpy(x, 25)
  want = time_linear_numpy(x - trend, params["seasonal"]) + time_linear_numpy(
    trend, params["trend"]
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dlinear_starts_as_the_window_mean():
  # Official init: both maps are 1/L everywhere, so mean(seasonal) + mean(trend) = mean(x).
  x = inputs(seed=4)
  model = DLinear(L, H)
  out = model.apply(model.init(jax.random.key(0), x), x)
  want = np.broadcast_to(x.mean(axis=1, keepdims=True), (B, H, C))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("individual", [False, True])
def test_nlinear_matches_numpy(individual):
  x = inputs(seed=5)
  model = NLinear(L, H, individual=individual)
  params = random_params(model, x)
  got = model.apply({"params": params}, x)
  last = x[:, -1:]
  want = time_linear_numpy(x - last, params["linear"]) + last
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("individual", [False, True])
def test_nlinear_shift_equivariant(individual):
  x = inputs(seed=6)
  model = NLinear(L, H, individual=individual)
  params = random_params(model, x)
  shift = np.array([10.0, -3.0, 0.5, 100.0], np.float32)  # One constant per channel.
  a = model.apply({"params": params}, x + shift)
  b = model.apply({"params": params}, x) + shift
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["dlinear", "nlinear"])
def test_individual_vs_shared_parameter_shapes(arch):
  x = inputs()
  shapes = {}
  for individual in (False, True):
    model = build_forecaster(dict(arch=arch, input_len=L, horizon=H, individual=individual))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes[individual] = jax.tree.map(lambda a: a.shape, nn.unbox(variables["params"]))
  names = ("seasonal", "trend") if arch == "dlinear" else ("linear",)
  for name in names:
    assert shapes[False][name] == {"kernel": (L, H), "bias": (H,)}
    assert shapes[True][name] == {"kernel": (C, L, H), "bias": (C, H)}
  # The (individual) kernel carries logical axis names for the sharding rules.
  assert variables["params"][names[0]]["kernel"].names == ("channels", "input_steps", "horizon")


def test_build_forecaster_reads_the_model_section():
  cfg = dict(arch="dlinear", input_len=L, horizon=H, moving_avg=5, individual=True, channels=C)
  cfg.update(d_model=999, vocab_size=3)  # LM keys are ignored by the linear models.
  model = build_forecaster(cfg)
  assert isinstance(model, DLinear)
  assert (model.moving_avg, model.individual, model.channels) == (5, True, C)
  assert isinstance(build_forecaster(dict(arch="nlinear", input_len=L, horizon=H)), NLinear)
  with pytest.raises(ValueError, match="cannot forecast"):
    build_forecaster(dict(arch="lstm", input_len=L, horizon=H))
  with pytest.raises(ValueError, match="must be positive"):
    build_forecaster(dict(arch="dlinear", input_len=0, horizon=H))
  with pytest.raises(ValueError, match="expects inputs"):  # Wrong channel count or length.
    model.init(jax.random.key(0), inputs(shape=(B, L, C + 1)))
  with pytest.raises(ValueError, match="expects inputs"):
    build_forecaster(dict(arch="nlinear", input_len=L + 1, horizon=H)).init(
      jax.random.key(0), inputs()
    )


@functools.cache
def sequence_forecaster(arch: str):
  """A one-block forecaster, its fresh params and its jitted apply."""
  config = dict(arch=arch, input_len=L, horizon=H, d_model=8, num_layers=1, num_heads=2)
  model = build_forecaster(config | dict(ssm_state=4, window=8))
  x = inputs(seed=7)
  # RBG keys compile much faster than threefry on CPU.
  fresh = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"])
  return model, fresh, jax.jit(lambda p, x: model.apply({"params": p}, x))


def test_sequence_forecaster_cycles_the_block_pattern():
  # Griffin's layers cycle (recurrent, recurrent, local attention), as in the LM.
  config = dict(arch="griffin", input_len=L, horizon=H, d_model=8, num_layers=4, num_heads=2)
  model = build_forecaster(config)
  params = jax.eval_shape(model.init, jax.random.key(0), inputs())["params"]
  blocks = [params[f"blocks_{i}"] for i in range(4)]
  kinds = ["attention" if "attention_block" in b else "recurrent" for b in blocks]
  assert kinds == ["recurrent", "recurrent", "attention", "recurrent"]
  assert {"input_proj", "final_norm", "head"} <= params.keys()
  assert params["head"]["kernel"].names == ("embed", "horizon", "channels")


# One layer of griffin is its recurrent block, which is also hawk's (the cycle is tested above).
@pytest.mark.parametrize("arch", ["transformer", "mamba", "griffin"])
def test_sequence_forecaster_every_arch(arch):
  model, fresh, apply = sequence_forecaster(arch)
  assert isinstance(model, SequenceForecaster)
  x = inputs(seed=8)
  # The zero-initialised head starts from the naive last-value forecast...
  np.testing.assert_allclose(apply(fresh, x), np.repeat(x[:, -1:], H, axis=1), atol=1e-6)
  # ...and learns from there: the last hidden state it reads is not zero (gates are open).
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x) - 1.0))
  assert float(jnp.linalg.norm(jax.jit(jax.grad(loss))(fresh)["head"]["kernel"])) > 1e-3
  leaves, tree = jax.tree.flatten(fresh)
  rng = np.random.default_rng(9)
  params = jax.tree.unflatten(
    tree, [a + 0.2 * rng.normal(size=a.shape).astype(np.float32) for a in leaves]
  )
  y = apply(params, x)
  assert y.shape == (B, H, C) and y.dtype == jnp.float32 and np.isfinite(y).all()
  # Last-value normalisation makes it level-equivariant, like NLinear.
  shift = np.array([5.0, -2.0, 0.25, 40.0], np.float32)
  np.testing.assert_allclose(apply(params, x + shift), y + shift, rtol=1e-5, atol=1e-4)
