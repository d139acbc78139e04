"""Time series for forecasting: the loaded series, its splits, standardisation and pipelines.

The CSV (`data.series` or `data.csv_path`) is located, checked and stored by
`fulcrum.platform.data.series_store`; this module reads its rows back and serves them.

Splits follow LTSF-Linear's `Dataset_Custom` (Zeng et al. 2023), chronologically:
  n_train = int(n * train_fraction), n_test = int(n * test_fraction), n_val = the rest.
A window is L = `input_len` steps of inputs followed by H = `horizon` steps of targets, stride
1. A split owns the windows whose targets lie in its rows; validation and test windows start up
to L rows earlier, so their inputs reach into the previous split. Windows per split:
  train n_train - L - H + 1, validation n_val - H + 1, test n_test - H + 1.
Every channel is standardised with the mean and (population) standard deviation of the train
rows only, applied to all splits; `Series.denormalize` maps predictions back.

The training iterator is a grain `DatasetIterator` over shuffled window indices (reshuffled
every epoch): `get_state()` is a small JSON-serialisable dict and `set_state()` on a fresh
iterator from the same config resumes exactly. Evaluation batches hold every window of a split
exactly once, in order; the last batch is padded and carries `weights` 0 on its padding rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from fulcrum.platform.data.pipeline import ResumableIterator, per_host_batch_size
from fulcrum.platform.data.series_store import (
  SERIES_DIR,
  committed_series,
  prepare,
  read_rows,
)
from fulcrum.platform.errors import UserError

# SERIES_DIR and committed_series are re-exported: callers reach every series name from here.
__all__ = [
  "DATA_KEYS",
  "SERIES_DIR",
  "SPLITS",
  "Series",
  "SeriesIterator",
  "committed_series",
  "config_defaults",
  "load",
  "make_eval_batches",
  "make_train_iterator",
  "split_borders",
]

SPLITS = ("train", "validation", "test")


def config_defaults() -> ml_collections.ConfigDict:
  """Every `data.*` key a series task reads beyond the text pipeline's, with its default."""
  c = ml_collections.ConfigDict()
  c.series = "co2_weekly"  # A committed series: co2_weekly, sunspots_monthly, ...
  c.csv_path = ""  # Your ETT-layout CSV (date, channels...); overrides data.series.
  c.columns = ""  # Comma-separated channels to use; "" = every column but date.
  c.train_fraction = 0.7  # Chronological split: first 70% train,
  c.test_fraction = 0.2  # last 20% test, the rest validation.
  return c


DATA_KEYS = tuple(config_defaults().keys())  # The keys a series task needs in `data`.


def split_borders(
  num_rows: int, input_len: int, horizon: int, train_fraction: float, test_fraction: float
) -> dict[str, tuple[int, int]]:
  """Row ranges [start, end) of each split's windows (inputs included), as in LTSF-Linear.

  Args:
    num_rows: time steps in the series.
    input_len: input window length L.
    horizon: forecast horizon H.
    train_fraction: share of rows in train.
    test_fraction: share of rows in test; validation gets the rest.

  Returns:
    {"train": (0, n_train), "validation": (n_train - L, n_train + n_val),
     "test": (n - n_test - L, n)}.

  Raises:
    UserError: bad fractions, or a split too short for one window.
  """
  if input_len <= 0 or horizon <= 0:
    raise UserError(
      f"model.input_len={input_len} and model.horizon={horizon} must both be positive"
    )
  if not (0 < train_fraction < 1 and 0 < test_fraction < 1 and train_fraction + test_fraction < 1):
    raise UserError(
      f"data.train_fraction={train_fraction} and data.test_fraction={test_fraction} must be in "
      "(0, 1) and leave rows for validation (their sum below 1)"
    )
  n_train = int(num_rows * train_fraction)
  n_test = int(num_rows * test_fraction)
  n_val = num_rows - n_train - n_test
  need = {"train": input_len + horizon, "validation": horizon, "test": horizon}
  have = {"train": n_train, "validation": n_val, "test": n_test}
  for split in SPLITS:
    if have[split] < need[split]:
      raise UserError(
        f"the series has {num_rows} rows, so its {split} split has {have[split]}, fewer than "
        f"the {need[split]} one window needs (model.input_len={input_len}, "
        f"model.horizon={horizon}); lower them or use a longer series"
      )
  return {
    "train": (0, n_train),
    "validation": (n_train - input_len, n_train + n_val),
    "test": (num_rows - n_test - input_len, num_rows),
  }


@dataclasses.dataclass(frozen=True)
class Series:
  """A loaded series, its splits and its train-only normalisation.

  Attributes:
    label: what it is, for logs ("co2_weekly", "csv /path/to.csv").
    key: the builder config name (label slug + content hash): identifies the data.
    channels: channel (column) names.
    dates: the `date` column, one per row.
    values: raw values, float64 [rows, channels].
    input_len: input window length L.
    horizon: forecast horizon H.
    borders: each split's row range [start, end), inputs of its first window included.
    mean: per-channel mean of the train rows, float64 [channels].
    std: per-channel population std of the train rows (1 where constant), float64 [channels].
  """

  label: str
  key: str
  channels: tuple[str, ...]
  dates: tuple[str, ...]
  values: np.ndarray
  input_len: int
  horizon: int
  borders: dict[str, tuple[int, int]]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_channels(self) -> int:
    return len(self.channels)

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """Raw values [..., channels] → the standardised scale the model sees (float32)."""
    return ((np.asarray(x, np.float64) - self.mean) / self.std).astype(np.float32)

  def denormalize(self, y: Any) -> np.ndarray:
    """Model outputs [..., channels] on the standardised scale → original units (float64)."""
    return np.asarray(y, np.float64) * self.std + self.mean

  def num_windows(self, split: str) -> int:
    start, end = self.borders[split]
    return end - start - self.input_len - self.horizon + 1

  def window_starts(self, split: str) -> np.ndarray:
    """First input row of each of the split's windows, in time order."""
    start = self.borders[split][0]
    return np.arange(start, start + self.num_windows(split))

  def windows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every window of a split on the standardised scale: inputs [w, L, C], targets [w, H, C]."""
    data = self.normalize(self.values)
    rows = self.window_starts(split)[:, None] + np.arange(self.input_len + self.horizon)
    full = data[rows]
    return full[:, : self.input_len], full[:, self.input_len :]

  def describe(self) -> str:
    """E.g. "co2_weekly: 1 channel, 2284 steps (L=336, H=96); windows train 1167 / ..."."""
    c = self.num_channels
    counts = " / ".join(f"{s} {self.num_windows(s)}" for s in SPLITS)
    return (
      f"{self.label}: {c} channel{'s' if c != 1 else ''}, {len(self.dates)} steps "
      f"(L={self.input_len}, H={self.horizon}); windows {counts}"
    )


def _select(channels: list[str], values: np.ndarray, spec: str, label: str):
  if not spec.strip():
    return channels, values
  wanted = [c.strip() for c in spec.split(",") if c.strip()]
  missing = [c for c in wanted if c not in channels]
  if missing:
    raise UserError(
      f"data.columns names {', '.join(map(repr, missing))}, which {label} lacks; its channels "
      f"are {', '.join(channels)}"
    )
  index = [channels.index(c) for c in wanted]
  return wanted, values[:, index]


def load(data_cfg: ml_collections.ConfigDict, *, input_len: int, horizon: int) -> Series:
  """Prepares (if needed) and loads the series a data config names, with its splits and scaler.

  Args:
    data_cfg: the `data` section: `series` or `csv_path`, `columns`, `train_fraction`,
      `test_fraction`, `data_dir`.
    input_len: input window length L.
    horizon: forecast horizon H.

  Returns:
    The loaded `Series`.

  Raises:
    UserError: unknown series, bad CSV, unknown column, a split too short for one window.
  """
  builder, channels, label = prepare(data_cfg)
  dates, values = read_rows(builder)
  channels, values = _select(channels, values, data_cfg.columns, label)
  borders = split_borders(
    len(values), input_len, horizon, data_cfg.train_fraction, data_cfg.test_fraction
  )
  train = values[slice(*borders["train"])]
  # Huge values overflow the variance (std inf: every input 0, a NaN run), and the model sees
  # float32: each channel's mean, std and standardised values must be finite (checked below).
  with np.errstate(over="ignore", invalid="ignore"):
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # A constant channel is only centred (as scikit-learn).
    scaled = ((values - mean) / std).astype(np.float32)
  finite = np.isfinite(mean) & np.isfinite(std) & np.isfinite(scaled).all(axis=0)
  if not finite.all():
    name = channels[int(np.argmin(finite))]
    raise UserError(
      f"{label}: column {name!r} holds values too large to standardise (their mean or standard "
      "deviation overflows, or standardised values exceed float32); rescale that column (e.g. "
      "to other units or its logarithm) or drop it with data.columns"
    )
  return Series(
    label=label,
    key=builder.builder_config.name,
    channels=tuple(channels),
    dates=dates,
    values=values,
    input_len=input_len,
    horizon=horizon,
    borders=borders,
    mean=mean,
    std=std,
  )


@dataclasses.dataclass(frozen=True)
class _Window(grain.transforms.Map):
  """A window's first input row → {"inputs" [L, C], "targets" [H, C]} (standardised)."""

  data: np.ndarray  # float32 [rows, C], standardised.
  input_len: int
  horizon: int

  def map(self, start: int) -> dict[str, np.ndarray]:
    full = self.data[start : start + self.input_len + self.horizon]
    return {"inputs": full[: self.input_len], "targets": full[self.input_len :]}


class SeriesIterator(ResumableIterator):
  """The training iterator; `series` carries the normalisation to de-normalise predictions."""

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any], series: Series):
    super().__init__(parent, fingerprint)
    self.series = series


def make_train_iterator(
  series: Series, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> SeriesIterator:
  """The endless, checkpointable iterator of training windows for this host.

  Window indices are shuffled with `seed` (a new order every epoch), dealt round-robin to
  hosts and batched; a host's batch holds `batch_size // process_count` windows.

  Args:
    series: the loaded series.
    batch_size: global batch size (windows across all hosts).
    seed: data-order seed.
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    A grain `DatasetIterator` of {"inputs": float32 [b, L, C], "targets": float32 [b, H, C]};
    `get_state()` is JSON-serialisable and `set_state()` resumes exactly.
  """
  per_host = per_host_batch_size(batch_size, process_index, process_count)
  starts = series.window_starts("train")
  window = _Window(series.normalize(series.values), series.input_len, series.horizon)
  ds = grain.MapDataset.source(starts.tolist()).shuffle(seed=seed % 2**32).repeat()
  ds = ds[process_index::process_count].map(window).batch(per_host, drop_remainder=True)
  # Read in this thread: a window is a slice of an in-memory array, cheaper than a hand-off.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  fingerprint = {
    "source": f"{series.label} [{series.key}] columns {','.join(series.channels)}",
    "num_windows": len(starts),
    "input_len": series.input_len,
    "horizon": series.horizon,
    "batch_size": batch_size,
    "seed": seed,
    "process_index": process_index,
    "process_count": process_count,
  }
  return SeriesIterator(iter(ds), fingerprint, series)


def make_eval_batches(
  series: Series, split: str, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
  """Every window of `split` exactly once, in time order, as fixed batches.

  The global batches are the same on every host, which keeps rows [i * b, (i + 1) * b) with
  b = batch_size // process_count. The last batch is padded with zero windows to the full
  batch size; `weights` (float32 [b]) is 1 for real windows and 0 for padding, so weighted
  sums over the batches count every window once.

  Args:
    series: the loaded series.
    split: "validation" or "test" (or "train").
    batch_size: global batch size.
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    A list of {"inputs" [b, L, C], "targets" [b, H, C], "weights" [b]} numpy dicts.
  """
  per_host = per_host_batch_size(batch_size, process_index, process_count)
  inputs, targets = series.windows(split)
  count = len(inputs)
  padded = -(-count // batch_size) * batch_size
  pad = ((0, padded - count), (0, 0), (0, 0))
  inputs, targets = np.pad(inputs, pad), np.pad(targets, pad)
  weights = (np.arange(padded) < count).astype(np.float32)
  out = []
  for first in range(0, padded, batch_size):
    rows = slice(first + process_index * per_host, first + (process_index + 1) * per_host)
    out.append(
      {
        "inputs": np.ascontiguousarray(inputs[rows]),
        "targets": np.ascontiguousarray(targets[rows]),
        "weights": weights[rows],
      }
    )
  return out
