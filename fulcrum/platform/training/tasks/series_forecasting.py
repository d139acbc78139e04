"""The forecasting task: windows of a real series in, the next `model.horizon` steps out.

Selected by `task = "forecast"` (see `fulcrum/recipes/forecast.py`). Data: a committed series
(`data.series`) or the user's ETT-layout CSV (`data.csv_path`), split, windowed and standardised
by `fulcrum.platform.data.series` (LTSF-Linear's protocol). Batches hold `inputs` float32
[b, input_len, c] and `targets` float32 [b, horizon, c]; evaluation batches also hold `weights`
[b] (0 on padding rows). The loss is the mean squared error on the standardised scale, and so are
the reported metrics, as papers report them: `eval/mse`, `eval/mae` (validation) and
`eval/mse_test`, `eval/mae_test` (every test window, none dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fulcrum.modules import ModelConfig
from fulcrum.modules.models import ARCHS, is_forecaster
from fulcrum.platform.data import series as series_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Batch, Task


def _weights(batch: Batch, outputs: jax.Array) -> jax.Array:
  weights = batch.get("weights")
  if weights is None:
    return jnp.ones(outputs.shape[:1], jnp.float32)
  return weights.astype(jnp.float32)


class Forecasting(Task):
  """Multivariate-to-multivariate forecasting of a series (LTSF-Linear's "M" setting)."""

  name = "forecast"

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    m, d = config.model, config.data
    missing = [f"data.{k}" for k in series_lib.DATA_KEYS if k not in d]
    if missing:
      raise UserError(
        f"task=forecast needs the keys {', '.join(missing)}; start from the forecast recipe "
        "(`--recipe forecast`)"
      )
    if m.arch not in ARCHS:
      raise UserError(f"model.arch={m.arch!r} cannot forecast; choose one of {', '.join(ARCHS)}")
    if not is_forecaster(ModelConfig.from_mapping(m)):
      raise UserError(
        f"model.arch={m.arch!r} forecasts only with model.head='forecast' (got {m.head!r}); "
        "set model.head=forecast"
      )
    if m.input_len <= 0 or m.horizon <= 0:
      raise UserError(
        f"model.input_len={m.input_len} and model.horizon={m.horizon} must both be positive"
      )
    if m.arch == "dlinear" and m.moving_avg < 1:
      raise UserError(f"model.moving_avg must be >= 1 (paper: 25), got {m.moving_avg}")

  @functools.cached_property
  def series(self) -> series_lib.Series:
    """The loaded series, with its splits and train-only normalisation (loaded on first use)."""
    m = self.config.model
    s = series_lib.load(self.config.data, input_len=m.input_len, horizon=m.horizon)
    if m.channels and m.channels != s.num_channels:
      raise UserError(
        f"model.channels={m.channels} but {s.label} has {s.num_channels} channel(s) "
        f"({', '.join(s.channels)}); set model.channels={s.num_channels} or 0 (from the data)"
      )
    return s

  def example_inputs(self):
    return (jnp.zeros((1, self.config.model.input_len, self.series.num_channels), jnp.float32),)

  def train_iterator(self, process_index, process_count):
    t = self.config.train
    return series_lib.make_train_iterator(
      self.series,
      batch_size=t.batch_size,
      seed=t.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def eval_sets(self, process_index, process_count):
    kw = dict(
      batch_size=self.config.train.batch_size,
      process_index=process_index,
      process_count=process_count,
    )
    return {
      "": series_lib.make_eval_batches(self.series, "validation", **kw),
      "test": series_lib.make_eval_batches(self.series, "test", **kw),
    }

  def summary(self):
    return self.series.describe()

  def denormalize(self, forecasts) -> np.ndarray:
    """Forecasts [..., c] on the standardised scale → the series' original units."""
    return self.series.denormalize(forecasts)

  def loss(self, outputs, batch):
    """Mean squared error over windows (weighted by `weights`), steps and channels."""
    weights = _weights(batch, outputs)
    err = outputs.astype(jnp.float32) - batch["targets"].astype(jnp.float32)
    per_window = jnp.mean(jnp.square(err), axis=(1, 2))
    total = weights.sum()
    return (per_window * weights).sum() / jnp.maximum(total, 1.0), total

  def eval_sums(self, outputs, batch):
    weights = _weights(batch, outputs)[:, None, None]
    err = outputs.astype(jnp.float32) - batch["targets"].astype(jnp.float32)
    values_per_window = err.shape[1] * err.shape[2]
    return {
      "squared_error": jnp.sum(weights * jnp.square(err)),
      "absolute_error": jnp.sum(weights * jnp.abs(err)),
      "count": jnp.sum(weights) * values_per_window,
    }

  def eval_metrics(self, sums):
    count = max(sums["count"], 1.0)
    return {"mse": sums["squared_error"] / count, "mae": sums["absolute_error"] / count}


TASK = Forecasting
