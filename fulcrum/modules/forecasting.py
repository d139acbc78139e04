"""Forecasters: DLinear and NLinear (Zeng et al. 2023, "Are Transformers Effective for Time Series
Forecasting?"; official code cure-lab/LTSF-Linear) and a forecaster over any block stack.

Every forecaster maps a window of past values x [b, l, c] to float32 forecasts [b, o, c].
Shape vocabulary (with layers.py's): l input steps (`input_len`), o forecast steps (`horizon`),
c channels (series variables).

  DLinear             trend = moving average of x (kernel k, stride 1, edges replicated),
                      seasonal = x - trend, ŷ = W_s seasonal + W_t trend along time (Sec. 3).
  NLinear             ŷ = W (x - x_l) + x_l, x_l the last input step (Sec. 3).
  SequenceForecaster  the blocks of `fulcrum.modules.blocks.BLOCKS[arch]` (transformer, mamba, hawk,
                      griffin) over the window; see its docstring for the design.

`individual=True` gives each channel its own time-mixing weights (the paper's per-variate
variant); otherwise one [l, o] map is shared by every channel ("channel-independent" sharing).
The linear models compute in float32: they are tiny, and the level of a series needs the mantissa.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float

from fulcrum.modules.blocks import BLOCK_ARCHS, block_name, block_pattern
from fulcrum.modules.layers import EMBED, RMSNorm, dense
from fulcrum.modules.model_config import ModelConfig

# Logical axis names of forecasting parameters. The mesh rules do not name them, so these
# (small) axes stay replicated; the d_model axis is `embed` like everywhere else.
CHANNELS, INPUT_STEPS, HORIZON = "channels", "input_steps", "horizon"
LINEAR_ARCHS = ("dlinear", "nlinear")


def moving_average(x: Float[Array, "b l c"], kernel_size: int) -> Float[Array, "b l c"]:
  """Moving average over time with stride 1, keeping the length (DLinear's trend).

  The series is extended by repeating its first value (k - 1) // 2 times in front and its last
  value k - 1 - (k - 1) // 2 times behind, then averaged over windows of k: LTSF-Linear's
  `moving_avg` for odd k (the paper's k = 25), and still length-preserving for even k.

  Args:
    x: the series, time on axis 1.
    kernel_size: window k >= 1.

  Returns:
    The trend, same shape and dtype as x.
  """
  if kernel_size < 1:
    raise ValueError(f"moving average kernel must be >= 1, got {kernel_size}")
  front = (kernel_size - 1) // 2
  back = kernel_size - 1 - front
  padded = jnp.concatenate(
    [jnp.repeat(x[:, :1], front, axis=1), x, jnp.repeat(x[:, -1:], back, axis=1)], axis=1
  )
  # A sum window with a literal 0 init lowers to reduce_window_sum, which is differentiable
  # (attribution takes gradients with respect to the series).
  total = jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, kernel_size, 1), (1, 1, 1), "VALID")
  return total / kernel_size


def decompose(
  x: Float[Array, "b l c"], kernel_size: int
) -> tuple[Float[Array, "b l c"], Float[Array, "b l c"]]:
  """DLinear's series decomposition: (seasonal, trend) with seasonal + trend == x."""
  trend = moving_average(x, kernel_size)
  return x - trend, trend


class TimeLinear(nn.Module):
  """A linear map along time, per channel: y[b, o, c] = Σ_l x[b, l, c] W[l, o] + bias[o].

  Attributes:
    horizon: output steps o.
    individual: one (W, bias) per channel — W [c, l, o], bias [c, o] — instead of a shared one.
    kernel_init: initialiser of W; `constant(1/l)` makes every forecast start as the window mean
      (DLinear's official init), None gives torch's nn.Linear default U(±1/sqrt(l)) (NLinear).
  """

  horizon: int
  individual: bool = False
  kernel_init: nn.initializers.Initializer | None = None

  @nn.compact
  def __call__(self, x: Float[Array, "b l c"]) -> Float[Array, "b o c"]:
    _, steps, c = x.shape
    # Shared: W [l, o], bias [o]; individual: a leading channel axis on both.
    lead, lead_axes = ((c,), (CHANNELS,)) if self.individual else ((), ())
    init = self.kernel_init or nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=tuple(range(len(lead)))
    )
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, (*lead_axes, INPUT_STEPS, HORIZON)),
      (*lead, steps, self.horizon),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (*lead_axes, HORIZON)),
      (*lead, self.horizon),
      jnp.float32,
    )
    x = x.astype(jnp.float32)
    # lax.dot_general (not einsum) so quantized training (`model.quant`) reaches these maps too.
    if self.individual:  # Contract l, batch over c: [c, b, o].
      y = jax.lax.dot_general(x, kernel, (((1,), (1,)), ((2,), (0,))))
      return y.transpose(1, 2, 0) + bias.T
    y = jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))  # [b, c, o]
    return y.transpose(0, 2, 1) + bias[:, None]


def _check_inputs(x: Array, input_len: int, channels: int, name: str) -> None:
  if x.ndim != 3 or x.shape[1] != input_len or (channels and x.shape[2] != channels):
    want = f"[b, {input_len}, {channels or 'c'}]"
    raise ValueError(f"{name} expects inputs {want} (input_len, channels); got {x.shape}")


class DLinear(nn.Module):
  """Decomposition-Linear (Zeng et al. 2023, Sec. 3): ŷ = W_s (x - trend) + W_t trend.

  Attributes:
    input_len: input steps l.
    horizon: forecast steps o.
    moving_avg: trend kernel k (paper: 25).
    individual: per-channel weights instead of shared ones.
    channels: c, checked against the inputs; 0 = whatever the inputs have.
  """

  input_len: int
  horizon: int
  moving_avg: int = 25
  individual: bool = False
  channels: int = 0

  @nn.compact
  def __call__(self, x: Float[Array, "b l c"]) -> Float[Array, "b o c"]:
    _check_inputs(x, self.input_len, self.channels, "DLinear")
    seasonal, trend = decompose(x.astype(jnp.float32), self.moving_avg)
    # Sown as trend_component: "trend" names the head below (a sow under it clashed).
    self.sow("intermediates", "trend_component", trend)
    init = nn.initializers.constant(1.0 / self.input_len)
    kw = dict(individual=self.individual, kernel_init=init)
    seasonal_out = TimeLinear(self.horizon, name="seasonal", **kw)(seasonal)
    trend_out = TimeLinear(self.horizon, name="trend", **kw)(trend)
    return seasonal_out + trend_out


class NLinear(nn.Module):
  """Normalisation-Linear (Zeng et al. 2023, Sec. 3): ŷ = W (x - x_l) + x_l.

  Shifting the inputs by a constant shifts the forecast by it: NLinear(x + a) = NLinear(x) + a.
  (The official code detaches x_l, which only changes gradients with respect to the inputs;
  here they are the true ones, so attribution methods see the function the model computes.)

  Attributes:
    input_len: input steps l.
    horizon: forecast steps o.
    individual: per-channel weights instead of shared ones.
    channels: c, checked against the inputs; 0 = whatever the inputs have.
  """

  input_len: int
  horizon: int
  individual: bool = False
  channels: int = 0

  @nn.compact
  def __call__(self, x: Float[Array, "b l c"]) -> Float[Array, "b o c"]:
    _check_inputs(x, self.input_len, self.channels, "NLinear")
    x = x.astype(jnp.float32)
    last = x[:, -1:]
    return TimeLinear(self.horizon, self.individual, name="linear")(x - last) + last


class SequenceForecaster(nn.Module):
  """A forecaster over the block stack of `config.arch` (any `fulcrum.modules.blocks.BLOCKS` entry).

  x - mean(x) → per-step input projection c → d → `num_layers` blocks (causal, unrolled) → final
  RMSNorm → a linear head (zero-initialised) from the last step's hidden state to [o, c] → + x_l.

  Why this design:
  - Centring the inputs on the window mean and adding back the last value x_l (NLinear's
    normalisation, LTSF-Linear's fix for the level shift between train and test) makes the
    forecaster exactly level-equivariant, f(x + a) = f(x) + a, so it models changes, not levels.
    The inputs are centred on the mean, not on x_l as NLinear does, because x - x_l is zero at
    the last step, which closes the multiplicative gates (Mamba's silu(z), the RG-LRU block's
    gelu branch) exactly where the head reads: the head would see zeros and training could not
    start.
  - The blocks are causal, so the last step's hidden state has seen the whole window: for the
    recurrent blocks (Mamba, RG-LRU) it is the state the recurrence carries, for attention the
    last query over every step. A head on it costs d·o·c parameters, not l·d·o·c as a head over
    the flattened sequence would, so no parameter depends on the input length l.
  - The zero-initialised head starts training from the naive last-value forecast.
  - The projection mixes channels at every step, so multivariate inputs share one state.

  Attributes:
    config: the block stack's hyper-parameters (`arch`, `d_model`, `num_layers`, ...).
    input_len: input steps l.
    horizon: forecast steps o.
    channels: c, checked against the inputs; 0 = whatever the inputs have.
  """

  config: ModelConfig
  input_len: int
  horizon: int
  channels: int = 0

  @nn.compact
  def __call__(self, x: Float[Array, "b l c"]) -> Float[Array, "b o c"]:
    cfg = self.config
    _check_inputs(x, self.input_len, self.channels, f"SequenceForecaster({cfg.arch})")
    c = x.shape[-1]
    kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.float32)
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=1, keepdims=True)
    h = dense(c, cfg.d_model, (CHANNELS, EMBED), "input_proj", use_bias=True, **kw)(centred)
    pattern = block_pattern(cfg.arch)
    for i in range(cfg.num_layers):
      h, _ = pattern[i % len(pattern)](cfg, name=block_name(i))(h, None, None)
    h = RMSNorm(cfg.norm_eps, name="final_norm", **kw)(h[:, -1])
    head = dense(
      cfg.d_model,
      (self.horizon, c),
      (EMBED, HORIZON, CHANNELS),
      "head",
      kernel_init=nn.initializers.zeros,
      **kw,
    )
    return head(h).astype(jnp.float32) + x[:, -1:]


def build_forecaster(model_cfg: Mapping[str, Any] | ModelConfig) -> nn.Module:
  """The forecaster a `model` config describes.

  Reads `arch` (dlinear | nlinear | any block-stack arch: transformer, mamba, hawk, griffin),
  `input_len`, `horizon`, `channels` (0 = from the inputs), `individual` and `moving_avg`; a
  block-stack forecaster also reads `d_model`, `num_layers`, ...

  Args:
    model_cfg: a `ModelConfig` or the `model` section (a dict or ConfigDict).

  Returns:
    A module whose `apply(variables, x [b, l, c])` returns float32 forecasts [b, o, c].

  Raises:
    ValueError: an unknown arch or key, or non-positive `input_len`/`horizon`/`moving_avg`.
  """
  m = ModelConfig.from_mapping(model_cfg)
  if m.input_len <= 0 or m.horizon <= 0:
    raise ValueError(
      f"model.input_len={m.input_len} and model.horizon={m.horizon} must be positive"
    )
  if m.channels < 0:
    raise ValueError(f"model.channels must be >= 0 (0 = from the data), got {m.channels}")
  if m.arch == "dlinear":
    if m.moving_avg < 1:
      raise ValueError(f"model.moving_avg must be >= 1, got {m.moving_avg}")
    return DLinear(m.input_len, m.horizon, m.moving_avg, m.individual, m.channels)
  if m.arch == "nlinear":
    return NLinear(m.input_len, m.horizon, m.individual, m.channels)
  if m.arch in BLOCK_ARCHS:
    return SequenceForecaster(m, m.input_len, m.horizon, m.channels)
  known = ", ".join((*LINEAR_ARCHS, *BLOCK_ARCHS))
  raise ValueError(f"model.arch={m.arch!r} cannot forecast; choose one of {known}")
