"""Forecasting data and task: LTSF-Linear splits and windows, train-only normalisation, padded
evaluation batches, exact iterator resume, user CSVs and their errors, the task's loss and
metrics against NumPy, a few optimizer steps, and one run of the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fulcrum import recipes
from fulcrum.modules.forecasting import LINEAR_ARCHS, build_forecaster
from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.data import series as series_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import trainer
from fulcrum.platform.training.tasks.series_forecasting import Forecasting

ROWS = 120  # Rows of the ramp CSV: train 84, validation 12, test 24.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("series_tfds"))


def write_csv(path: Path, rows: int = ROWS) -> Path:
  """A two-channel ramp: channel a = row index, channel b = 2 * index + 10."""
  lines = ["date,a,b"] + [f"2020-01-{i:04d},{i},{2 * i + 10}" for i in range(rows)]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="session")
def ramp_csv(tmp_path_factory) -> str:
  return str(write_csv(tmp_path_factory.mktemp("csv") / "ramp.csv"))


def make_config(data_dir: str, **overrides):
  """The forecast recipe with `--set` style overrides (train.progress off, tmp data dir)."""
  config = recipes.get("forecast")
  values = {"data.data_dir": data_dir, "train.progress": False, **overrides}
  config_lib.apply_overrides(config, [f"{k}={v}" for k, v in values.items()])
  return config


def load(data_dir, csv="", series="co2_weekly", input_len=10, horizon=5, **data):
  config = make_config(data_dir, **{f"data.{k}": v for k, v in data.items()})
  config.data.csv_path, config.data.series = csv, series
  return series_lib.load(config.data, input_len=input_len, horizon=horizon)


def test_committed_series():
  names = series_lib.committed_series()
  assert names == ["co2_weekly", "sunspots_monthly", "sunspots_yearly", "us_macro_quarterly"]
  for name in names:
    path = series_lib.SERIES_DIR / f"{name}.csv"
    assert path.stat().st_size < 200_000
    assert path.read_text().startswith("date,")
  readme = (series_lib.SERIES_DIR / "README.md").read_text()
  assert all(name in readme for name in names) and "public domain" in readme


def test_committed_series_loads(data_dir):
  s = load(data_dir, series="us_macro_quarterly", input_len=24, horizon=8)
  assert s.num_channels == 12 and len(s.values) == 203 and s.channels[0] == "realgdp"
  assert s.dates[0] == "1959-01-01" and s.dates[-1] == "2009-07-01"
  assert np.isclose(s.values[0, 0], 2710.349)
  assert [s.num_windows(split) for split in series_lib.SPLITS] == [111, 14, 33]


def test_splits_and_windows_follow_ltsf_linear(data_dir, ramp_csv):
  L, H = 10, 5
  s = load(data_dir, csv=ramp_csv, input_len=L, horizon=H)
  n_train, n_test = int(ROWS * 0.7), int(ROWS * 0.2)
  n_val = ROWS - n_train - n_test
  assert s.borders == {
    "train": (0, n_train),
    "validation": (n_train - L, n_train + n_val),
    "test": (ROWS - n_test - L, ROWS),
  }
  counts = {split: s.num_windows(split) for split in series_lib.SPLITS}
  assert counts == {
    "train": n_train - L - H + 1,
    "validation": n_val - H + 1,
    "test": n_test - H + 1,
  }
  owners = {  # Rows each split's targets cover: train's first L rows are only ever inputs.
    "train": (L, n_train),
    "validation": (n_train, n_train + n_val),
    "test": (ROWS - n_test, ROWS),
  }
  for split in series_lib.SPLITS:
    inputs, targets = s.windows(split)
    assert inputs.shape == (counts[split], L, 2) and targets.shape == (counts[split], H, 2)
    # Back in original units, channel a is the row index: every window is L + H consecutive rows.
    rows_in, rows_out = s.denormalize(inputs)[..., 0], s.denormalize(targets)[..., 0]
    np.testing.assert_allclose(s.denormalize(targets)[..., 1], 2 * rows_out + 10, atol=1e-4)
    start = s.borders[split][0]
    np.testing.assert_allclose(rows_in[:, 0], np.arange(start, start + counts[split]), atol=1e-4)
    np.testing.assert_allclose(np.diff(np.concatenate([rows_in, rows_out], 1)), 1, atol=1e-4)
    # Targets cover exactly the split's own rows (chronological, disjoint); inputs reach back.
    lo, hi = owners[split]
    assert round(rows_out.min()) == lo and round(rows_out.max()) == hi - 1
    if split != "train":
      assert round(rows_in.min()) == lo - L  # The first window's inputs are the previous rows.


def test_normalisation_uses_train_rows_only(data_dir, tmp_path):
  path = write_csv(tmp_path / "jump.csv")
  lines = path.read_text().splitlines()
  # A jump after the train rows must not move the statistics.
  for i in range(int(ROWS * 0.7) + 1, ROWS + 1):
    date, a, b = lines[i].split(",")
    lines[i] = f"{date},{float(a) + 1e6},{b}"
  path.write_text("\n".join(lines) + "\n")
  s = load(data_dir, csv=str(path))
  train = s.values[: int(ROWS * 0.7)]
  np.testing.assert_allclose(s.mean, train.mean(axis=0))
  np.testing.assert_allclose(s.std, train.std(axis=0))  # Population std, as scikit-learn.
  np.testing.assert_allclose(s.mean, [41.5, 93.0])
  # The same statistics normalise every split, and denormalize undoes them.
  _, test_targets = s.windows("test")
  assert test_targets[..., 0].min() > 1e4  # The jump stays visible on the test scale.
  scale = np.abs(s.values).max()  # Standardised values are float32.
  np.testing.assert_allclose(s.denormalize(s.normalize(s.values)), s.values, atol=1e-6 * scale)


def test_constant_channel_is_only_centred(data_dir, tmp_path):
  path = tmp_path / "const.csv"
  path.write_text("date,x,k\n" + "".join(f"d{i},{i},7\n" for i in range(60)))
  s = load(data_dir, csv=str(path))
  assert s.std[1] == 1.0 and s.mean[1] == 7.0
  assert np.isfinite(s.windows("test")[0]).all()


@pytest.mark.parametrize("batch_size", [4, 7, 64])
def test_eval_batches_count_every_window_once(data_dir, ramp_csv, batch_size):
  s = load(data_dir, csv=ramp_csv)
  inputs, targets = s.windows("test")
  batches = series_lib.make_eval_batches(s, "test", batch_size=batch_size)
  assert len(batches) == math.ceil(len(inputs) / batch_size)
  assert all(b["inputs"].shape[0] == batch_size for b in batches)  # Padded, never dropped.
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == len(inputs) and set(np.unique(weights)) <= {0.0, 1.0}
  assert (weights[: len(inputs)] == 1).all()
  real = weights == 1
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[real], inputs)
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[real], targets)
  # Two hosts each keep half of every global batch; together they hold the same rows.
  if batch_size % 2 == 0:
    hosts = [
      series_lib.make_eval_batches(
        s, "test", batch_size=batch_size, process_index=i, process_count=2
      )
      for i in range(2)
    ]
    for whole, *halves in zip(batches, *hosts, strict=True):
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_resumes_exactly(data_dir, ramp_csv):
  s = load(data_dir, csv=ramp_csv)
  kw = dict(batch_size=8, seed=3)
  it = series_lib.make_train_iterator(s, **kw)
  # 70 windows, 8 per batch: 15 batches cross the first epoch boundary (a new shuffle).
  first = _take(it, 15)
  state = json.loads(json.dumps(it.get_state()))
  rest = _take(it, 12)
  resumed = series_lib.make_train_iterator(s, **kw)
  resumed.set_state(state)
  for a, b in zip(rest, _take(resumed, 12), strict=True):
    assert a.keys() == {"inputs", "targets"}
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  # A fresh iterator replays the same order; each epoch visits every train window once.
  again = _take(series_lib.make_train_iterator(s, **kw), 15)
  np.testing.assert_array_equal(first[3]["inputs"], again[3]["inputs"])
  epoch = np.concatenate([b["inputs"][:, 0, 0] for b in first])[: s.num_windows("train")]
  np.testing.assert_allclose(np.sort(epoch), np.sort(s.windows("train")[0][:, 0, 0]))
  assert it.series is s  # The normalisation travels with the iterator.
  with pytest.raises(UserError, match="seed was 3, now 4"):
    series_lib.make_train_iterator(s, batch_size=8, seed=4).set_state(state)


def test_user_csv_columns_and_rebuild(data_dir, tmp_path):
  path = write_csv(tmp_path / "mine.csv")
  s = load(data_dir, csv=str(path), columns="b")
  assert s.channels == ("b",) and s.values[3, 0] == 16 and s.label == f"csv {path}"
  path.write_text(path.read_text().replace("2020-01-0003,3,16", "2020-01-0003,3,-5"))
  assert load(data_dir, csv=str(path), columns="b").values[3, 0] == -5  # Edited: rebuilt.


BAD_CSVS = {
  "empty": ("", "is empty"),
  "first column": ("time,a\n1,2\n", "expected 'date'"),
  "no channels": ("date\n2020\n", "only a 'date' column"),
  "repeated name": ("date,a,a\nx,1,2\n", "empty or repeated"),
  "short row": ("date,a,b\nx,1,2\ny,3\n", "line 3 has 2 fields"),
  "not a number": ("date,a\nx,1\ny,abc\n", "line 3, column 'a': 'abc' is not a finite"),
  "gap": ("date,a\nx,1\ny,\n", "line 3, column 'a': '' is not a finite"),
  "nan": ("date,a\nx,1\ny,nan\n", "'nan' is not a finite"),
  "no rows": ("date,a\n", "no rows"),
  "too short": ("date,a\n" + "".join(f"d{i},{i}\n" for i in range(20)), "fewer than"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_csvs_raise_user_errors(data_dir, tmp_path, case):
  text, message = BAD_CSVS[case]
  path = tmp_path / "bad.csv"
  path.write_text(text)
  with pytest.raises(UserError, match=message) as err:
    load(data_dir, csv=str(path))
  assert "\n" not in str(err.value)


def test_bad_data_settings_raise_user_errors(data_dir, tmp_path, ramp_csv):
  with pytest.raises(UserError, match="is not a file"):
    load(data_dir, csv=str(tmp_path / "missing.csv"))
  with pytest.raises(UserError, match="data.series='nope' is unknown; choose one of co2_weekly"):
    load(data_dir, series="nope")
  with pytest.raises(UserError, match="data.columns names 'zz'"):
    load(data_dir, csv=ramp_csv, columns="a,zz")
  with pytest.raises(UserError, match="leave rows for validation"):
    load(data_dir, csv=ramp_csv, train_fraction=0.8, test_fraction=0.2)
  with pytest.raises(UserError, match="validation split has 6, fewer than the 8"):
    load(data_dir, csv=ramp_csv, horizon=8, train_fraction=0.75)


def test_task_checks_its_config(data_dir, ramp_csv):
  base = sections.base_config()
  base.task = "forecast"
  with pytest.raises(UserError, match="needs the keys data.columns, data.csv_path, data.series"):
    Forecasting(base)
  with pytest.raises(UserError, match="cannot forecast"):
    Forecasting(make_config(data_dir, **{"model.arch": "lstm"}))
  with pytest.raises(UserError, match="set model.head=forecast"):
    Forecasting(make_config(data_dir, **{"model.arch": "mamba", "model.head": "lm"}))
  overrides = {
    "data.csv_path": ramp_csv,
    "model.channels": 3,
    "model.input_len": 10,
    "model.horizon": 5,
  }
  task = Forecasting(make_config(data_dir, **overrides))
  with pytest.raises(UserError, match="set model.channels=2 or 0"):
    task.example_inputs()


def test_loss_and_metrics_match_numpy(data_dir, ramp_csv):
  overrides = {"data.csv_path": ramp_csv, "model.input_len": 10, "model.horizon": 5}
  task = Forecasting(make_config(data_dir, **overrides))
  assert task.summary() == (
    f"csv {ramp_csv}: 2 channels, {ROWS} steps (L=10, H=5); windows train 70 / validation 8 / "
    "test 20"
  )
  rng = np.random.default_rng(0)
  # Loss: MSE over steps and channels, averaged over windows with their weights.
  out, tgt = rng.normal(size=(6, 5, 2)), rng.normal(size=(6, 5, 2))
  weights = np.array([1, 1, 0, 1, 0, 1], np.float32)
  loss, total = task.loss(jnp.asarray(out), {"targets": jnp.asarray(tgt), "weights": weights})
  want = ((out - tgt) ** 2).mean(axis=(1, 2))[weights == 1].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(total) == 4
  unweighted, _ = task.loss(jnp.asarray(out), {"targets": jnp.asarray(tgt)})
  np.testing.assert_allclose(float(unweighted), ((out - tgt) ** 2).mean(), rtol=1e-5)
  # Eval: sums over padded batches give the MSE/MAE of exactly the split's windows.
  sets = task.eval_sets(0, 1)
  assert set(sets) == {"", "test"}
  inputs, targets = task.series.windows("test")
  predict = lambda x: np.repeat(x[:, -1:], 5, axis=1) * 0.9  # Any fixed forecaster.
  sums = {}
  for batch in sets["test"]:
    for k, v in task.eval_sums(jnp.asarray(predict(batch["inputs"])), batch).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  metrics = task.eval_metrics(sums)
  err = predict(inputs) - targets
  np.testing.assert_allclose(metrics["mse"], (err**2).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["mae"], np.abs(err).mean(), rtol=1e-5)
  assert set(metrics) == {"mse", "mae"}


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_optimizer_steps_reduce_the_loss(data_dir, arch):
  overrides = {"model.arch": arch, "model.input_len": 96, "model.horizon": 24}
  config = make_config(data_dir, **overrides)
  task = Forecasting(config)
  model = build_forecaster(config.model)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *task.example_inputs())["params"])
  tx = optax.adam(5e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss_fn = lambda p: task.loss(model.apply({"params": p}, *task.model_inputs(batch)), batch)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  it = task.train_iterator(0, 1)
  losses = []
  for _ in range(60):
    params, opt_state, loss = step(params, opt_state, next(it))
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses


def test_trainer_run_logs_forecast_metrics(data_dir, tmp_path):
  config = make_config(
    data_dir,
    **{
      "model.input_len": 24,
      "model.horizon": 12,
      "train.steps": 30,
      "train.log_every": 10,
      "train.eval_every": 0,
      "train.async_checkpointing": False,
      "data.series": "sunspots_yearly",
      "model.arch": "nlinear",
    },
  )
  out = trainer.train(config, tmp_path / "run")
  rows = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  evals = [r for r in rows if "eval/mse" in r]
  assert len(evals) == 1 and evals[0]["step"] == 30
  assert {"eval/mse", "eval/mae", "eval/mse_test", "eval/mae_test"} <= evals[0].keys()
  assert all(np.isfinite(evals[0][k]) for k in evals[0])
  assert out["eval/mse_test"] == evals[0]["eval/mse_test"]


def test_a_resume_with_narrowed_columns_is_refused_not_moved(data_dir, tmp_path):
  """Checkpoints that do not fit the data are a refusal: none is renamed `corrupt-*`."""
  csv = write_csv(tmp_path / "ramp.csv")

  def config(columns, steps):
    return make_config(
      data_dir,
      **{
        "data.csv_path": str(csv),
        "data.series": "",
        "data.columns": columns,
        "model.input_len": 10,
        "model.horizon": 5,
        "train.steps": steps,
        "train.eval_every": 0,
        "train.checkpoint_every": 5,
        "train.batch_size": 8,
        "train.async_checkpointing": False,
      },
    )

  trainer.train(config("a,b", 10), tmp_path / "run")
  (tmp_path / "run" / "config.json").unlink()
  with pytest.raises(UserError, match="data pipeline differs.*columns a,b.*columns b"):
    trainer.train(config("b", 20), tmp_path / "run")
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10", "5"]
  assert not (tmp_path / "run" / "config.json").exists()
