"""Series CSVs and their storage: the committed or user CSV, checked, built once into TFDS.

A series is a CSV in the ETT layout that LTSF-Linear reads: a `date` column, then one numeric
column per channel, one row per time step, oldest first (rows are taken in file order; dates are
kept as text and never parsed). `data.series` picks one of the committed series in `series/`
next to this file (see its README for provenance); `data.csv_path` points at the user's own
CSV instead (it wins when set). Either is built once into ArrayRecord by the TF-free TFDS
builder `FulcrumSeries` under `DATA_DIR/fulcrum_series/NAME-HASH/1.0.0/`, one example per block
of up to `BLOCK_ROWS` consecutive rows ({"start", "dates", "values"}), so that loading a long
series decodes a few examples, not one per step; HASH is of the CSV's bytes, so an edited file
is rebuilt. `fulcrum.platform.data.series` splits, standardises and windows what `read_rows`
returns.
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

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fulcrum.platform.data.text_corpus import quiet_tfds, resolve_data_dir
from fulcrum.platform.errors import UserError

SERIES_DIR = Path(__file__).parent / "series"  # Committed CSVs (scripts/make_series_csvs.py).
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


def read_rows(builder: FulcrumSeries) -> tuple[tuple[str, ...], np.ndarray]:
  """Every row of a prepared series, in time order.

  Args:
    builder: the builder `prepare` returned.

  Returns:
    (dates, float64 values [rows, channels]).
  """
  with quiet_tfds():
    source = builder.as_data_source(_FULL_SPLIT)
  blocks = sorted(source.__getitems__(range(len(source))), key=lambda b: int(b["start"]))
  values = np.concatenate([np.asarray(b["values"], np.float64) for b in blocks])
  dates = tuple(_text(d) for b in blocks for d in b["dates"])
  return dates, values


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
