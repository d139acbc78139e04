"""DLinear forecasts weekly Mauna Loa CO2 96 weeks ahead from 336 (LTSF-Linear protocol).

Purpose: the long-term forecasting baseline of Zeng et al. 2023 on a committed real series, with
LTSF-Linear's protocol: chronological 70/10/20 split, standardisation from the train split
only, stride-1 windows, MSE loss; metrics on the standardised scale over every validation and
test window (`eval/mse`, `eval/mae`, `eval/mse_test`, `eval/mae_test`). `model.arch` switches
to nlinear or to a block stack (transformer, mamba, hawk, griffin; `model.d_model`,
`model.num_layers`, ...); `data.series` to sunspots_monthly, sunspots_yearly or
us_macro_quarterly (12 channels; use input_len 24, horizon 8), or `data.csv_path` to your own
CSV in the ETT layout (`date` column, then one column per channel).

Expected: test MSE about 0.011 (validation 0.012) on the standardised scale, against 0.124 for
the naive last-value forecast; nlinear reaches about 0.006. About 20 s on 2 CPU cores.

  fulcrum train --recipe forecast --workdir runs/forecast
  fulcrum train --recipe forecast --workdir runs/forecast_nlinear --set model.arch=nlinear
"""

from fulcrum.recipes._bases import forecast_config


def get_config():
  c = forecast_config()
  c.train.steps = 1000  # ~27 epochs of the 1167 training windows.
  c.train.batch_size = 32
  c.train.seq_len = 336  # Unused by forecasting except in tokens_per_s (input steps per second).
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 500

  c.model.arch = "dlinear"  # dlinear | nlinear | transformer | mamba | hawk | griffin.
  c.model.input_len = 336  # Input window L (time steps).
  c.model.horizon = 96  # Forecast horizon H (time steps).
  c.model.d_model = 64  # Block-stack forecasters only (as num_layers, num_heads, ...).
  c.model.num_layers = 2

  c.optimizer.learning_rate = 5e-3  # LTSF-Linear's ETTh1 DLinear rate (Adam).
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0  # LTSF-Linear trains with plain Adam.
  return c
