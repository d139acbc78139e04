"""Time series for forecasting: a TFDS builder over ETT-layout CSVs, splits, windows, pipelines.

A series is a CSV in the ETT layout that LTSF-Linear reads: a `date` column, then one numeric
column per channel, one row per time step, oldest first (rows are taken in file order; dates are
kept as text and never parsed). `data.series` picks one of the committed series in `series/`
next to this file (see its README for provenance); `data.csv_path` points at the user's own
CSV instead (it wins when set). Either is built once into ArrayRecord by the TF-free TFDS
builder `FulcrumSeries` under `DATA_DIR/fulcrum_series/NAME-HASH/1.0.0/`, one example per block
of up to `BLOCK_ROWS` consecutive rows ({"start", "dates", "values"}), so that loading a long
series decodes a few examples, not one per step; HASH is of the CSV's bytes, so an edited file
is rebuilt.

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

import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fulcrum.platform.data.pipeline import _ResumableIterator
from fulcrum.platform.data.text_corpus import quiet_tfds, resolve_data_dir
from fulcrum.platform.errors import UserError

SERIES_DIR = Path(__file__).parent / "series"  # Committed CSVs (scripts/make_series_csvs.py).
SPLITS = ("train", "validation", "test")
_FULL_SPLIT = "full"  # The one TFDS split: every row, in order.
BLOCK_ROWS = 1024  # Rows (time steps) per stored example.


def committed_series() -> list[str]:
  """Names of the committed series (`data.series` values), sorted."""
  return sorted(p.stem for p in SERIES_DIR.glob("*.csv"))


@dataclasses.dataclass(frozen=True)
class SeriesFile:
  """A CSV to serve: what to call it, its identity, where it is and its text."""

  label: str  # For logs and iterator fingerprints: "co2_weekly" or "csv /abs/path.csv".
  key: str  # Builder config name: a slug of the label and a short hash of the file's bytes.
  path: str
  text: str


def _locate(data_cfg: ml_collections.ConfigDict) -> SeriesFile:
  """The CSV `data.csv_path` (if set) or `data.series` names, read as UTF-8 text."""
  if data_cfg.csv_path:
    path = os.path.abspath(os.path.expandvars(os.path.expanduser(data_cfg.csv_path)))
    key_name, label = "data.csv_path", f"csv {path}"
    if not os.path.isfile(path):
      raise UserError(
        f"data.csv_path={data_cfg.csv_path!r} is not a file; pass the path of a CSV with a "
        "'date' column and one column per channel"
      )
  else:
    names = committed_series()
    if data_cfg.series not in names:
      raise UserError(
        f"data.series={data_cfg.series!r} is unknown; choose one of {', '.join(names)} or set "
        "data.csv_path to your own CSV"
      )
    path = str(SERIES_DIR / f"{data_cfg.series}.csv")
    key_name, label = "data.series", data_cfg.series
  try:
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8-sig")
  except OSError as e:
    raise UserError(
      f"{key_name}: cannot read {path}: {e.strerror}; check its permissions"
    ) from None
  except UnicodeDecodeError:
    raise UserError(f"{key_name}: {path} is not UTF-8 text; save it as a UTF-8 CSV") from None
  slug = re.sub(r"[^a-z0-9]+", "_", Path(path).stem.lower()).strip("_") or "series"
  digest = hashlib.sha1(raw).hexdigest()[:10]
  return SeriesFile(label=label, key=f"{slug}-{digest}", path=path, text=text)


def _header(file: SeriesFile) -> list[str]:
  rows = csv.reader(io.StringIO(file.text))
  header = next(rows, None)
  if not header or not any(h.strip() for h in header):
    raise UserError(f"{file.label} is empty; a series CSV needs a header row 'date,CHANNEL,...'")
  header = [h.strip() for h in header]
  if header[0] != "date":
    raise UserError(
      f"{file.label}: the first column is {header[0]!r}, expected 'date' (ETT layout: date, "
      "then one numeric column per channel)"
    )
  if len(header) < 2:
    raise UserError(f"{file.label} has only a 'date' column; add one column per channel")
  seen = set()
  for name in header[1:]:
    if not name or name in seen or name == "date":
      raise UserError(
        f"{file.label}: column name {name!r} is empty or repeated; give every column a unique name"
      )
    seen.add(name)
  return header


def parse_csv(file: SeriesFile) -> tuple[list[str], list[str], np.ndarray]:
  """Checks and parses an ETT-layout CSV.

  Args:
    file: the located CSV.

  Returns:
    (channel names, dates, float64 values [rows, channels]).

  Raises:
    UserError: naming the first problem (layout, a short row, a missing or non-numeric value).
  """
  header = _header(file)
  dates, values = [], []
  reader = csv.reader(io.StringIO(file.text))
  next(reader)
  for row in reader:
    if not row or not any(f.strip() for f in row):
      continue  # Blank lines (e.g. a trailing newline) are not time steps.
    line = reader.line_num
    if len(row) != len(header):
      raise UserError(
        f"{file.label}: line {line} has {len(row)} fields but the header has {len(header)}; "
        "every row needs a date and one value per channel"
      )
    numbers = []
    for name, field in zip(header[1:], row[1:], strict=True):
      try:
        number = float(field)
      except ValueError:
        number = math.nan
      if not math.isfinite(number):
        raise UserError(
          f"{file.label}: line {line}, column {name!r}: {field.strip()!r} is not a finite "
          "number; fill or drop gaps before training (e.g. interpolate them)"
        )
      numbers.append(number)
    dates.append(row[0].strip())
    values.append(numbers)
  if not values:
    raise UserError(f"{file.label} has a header but no rows")
  return header[1:], dates, np.asarray(values, np.float64)


@dataclasses.dataclass
class SeriesConfig(tfds.core.BuilderConfig):
  """Builder config naming one CSV (by label and content hash); `path` is not its identity."""

  path: str = dataclasses.field(default="", repr=False)
  num_channels: int = dataclasses.field(default=1, repr=False)


class FulcrumSeries(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Blocks of consecutive rows of a CSV series: {"start", "dates" [n], "values" [n, channels]}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Blocks of BLOCK_ROWS rows, in file order, in one 'full' split."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # As in text_corpus: TFDS' own lookup needs `importlib_resources`.
    return epath.Path(__file__)

  def __init__(self, **kwargs: Any):
    with quiet_tfds():  # Our configs are made on the fly; TFDS warns about each.
      super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="A time series from an ETT-layout CSV, in blocks of consecutive time steps.",
      features=tfds.features.FeaturesDict(
        {
          "start": tfds.features.Scalar(np.int64),  # Row index of the block's first step.
          "dates": tfds.features.Sequence(tfds.features.Text()),
          "values": tfds.features.Tensor(
            shape=(None, self.builder_config.num_channels), dtype=np.float64
          ),
        }
      ),
      disable_shuffling=True,  # Keep rows in time order on disk.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    return {_FULL_SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    path = self.builder_config.path
    text = Path(path).read_text(encoding="utf-8-sig")
    _, dates, values = parse_csv(SeriesFile(self.builder_config.description, "", path, text))
    for start in range(0, len(dates), BLOCK_ROWS):
      stop = start + BLOCK_ROWS
      yield start, {"start": start, "dates": dates[start:stop], "values": values[start:stop]}


def prepare(data_cfg: ml_collections.ConfigDict) -> tuple[FulcrumSeries, list[str], str]:
  """Builds the series' ArrayRecord data if needed (a cheap no-op when it exists).

  Args:
    data_cfg: the `data` section (`series`, `csv_path`, `data_dir`).

  Returns:
    (the prepared builder, the CSV's channel names, its label).

  Raises:
    UserError: unknown series, missing or malformed CSV, unwritable data dir.
  """
  file = _locate(data_cfg)
  channels = _header(file)[1:]
  root_dir = resolve_data_dir(data_cfg.data_dir)
  config = SeriesConfig(
    name=file.key, description=file.label, path=file.path, num_channels=len(channels)
  )
  with quiet_tfds():
    builder = FulcrumSeries(config=config, data_dir=root_dir)
    prepared = builder.is_prepared()
  if not prepared:
    parse_csv(file)  # Clean UserErrors before TFDS wraps anything.
    print(f"preparing series {file.label} in {root_dir}", file=sys.stderr, flush=True)
    try:
      with quiet_tfds(), tempfile.TemporaryDirectory() as scratch:
        builder.download_and_prepare(
          download_dir=scratch,
          file_format=tfds.core.FileFormat.ARRAY_RECORD,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except Exception as e:
      # Another process (a second host or test worker) may have finished the same build first.
      with quiet_tfds():
        builder = FulcrumSeries(config=config, data_dir=root_dir)
        done = builder.is_prepared()
      if not done:
        if isinstance(e, OSError):
          raise UserError(
            f"cannot write series data to {root_dir}: {e.strerror or e}; set data.data_dir "
            "(or $FULCRUM_DATA_DIR) to a writable directory"
          ) from None
        raise
  return builder, channels, file.label


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
  with quiet_tfds():
    source = builder.as_data_source(_FULL_SPLIT)
  blocks = sorted(source.__getitems__(range(len(source))), key=lambda b: int(b["start"]))
  values = np.concatenate([np.asarray(b["values"], np.float64) for b in blocks])
  dates = tuple(_text(d) for b in blocks for d in b["dates"])
  channels, values = _select(channels, values, data_cfg.columns, label)
  borders = split_borders(
    len(values), input_len, horizon, data_cfg.train_fraction, data_cfg.test_fraction
  )
  train = values[slice(*borders["train"])]
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # A constant channel is only centred (as scikit-learn).
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


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _Window(grain.transforms.Map):
  """A window's first input row → {"inputs" [L, C], "targets" [H, C]} (standardised)."""

  data: np.ndarray  # float32 [rows, C], standardised.
  input_len: int
  horizon: int

  def map(self, start: int) -> dict[str, np.ndarray]:
    full = self.data[start : start + self.input_len + self.horizon]
    return {"inputs": full[: self.input_len], "targets": full[self.input_len :]}


class SeriesIterator(_ResumableIterator):
  """The training iterator; `series` carries the normalisation to de-normalise predictions."""

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any], series: Series):
    super().__init__(parent, fingerprint)
    self.series = series


def _per_host(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size <= 0:
    raise UserError(f"train.batch_size must be positive, got {batch_size}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if batch_size % process_count:
    raise UserError(
      f"train.batch_size={batch_size} must divide by the number of hosts ({process_count}); "
      f"use a multiple of {process_count}"
    )
  return batch_size // process_count


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
  per_host = _per_host(batch_size, process_index, process_count)
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
  per_host = _per_host(batch_size, process_index, process_count)
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
