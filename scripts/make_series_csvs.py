"""Exports the small real time series that `fulcrum.platform.data.series` serves by name.

Run once by a developer, in a separate environment that has statsmodels (Fulcrum's own
environment never needs it), from the repository root:

  python3 -m venv /tmp/seriesenv
  /tmp/seriesenv/bin/pip install statsmodels
  /tmp/seriesenv/bin/python scripts/make_series_csvs.py

Every dataset comes from the copy bundled inside the statsmodels package (no network), and is
written in the ETT layout that LTSF-Linear reads: a `date` column (ISO `YYYY-MM-DD`), then one
column per channel, one row per time step, oldest first. The committed CSVs were made with
statsmodels 0.15.0 and pandas 3.1.1; the output is deterministic, so a rerun reproduces them.

  co2_weekly          Mauna Loa CO2 (ppm), weekly, 1958-03-29 .. 2001-12-29, 2284 rows. The 59
                      missing weeks are filled by linear interpolation between the nearest
                      observed weeks (the weeks are evenly spaced, so this is interpolation in
                      time); the series has no gap at either end.
  sunspots_monthly    Monthly mean sunspot number, 1749-01 .. 2009-06, 3126 rows, parsed from
                      statsmodels' raw NGDC file `sunspots/src/sunspots_monthly.dat` (NGDC
                      itself interpolated February 1824; values after 2008-12 are preliminary).
  sunspots_yearly     Yearly sunspot number, 1700 .. 2008, 309 rows; no gaps.
  us_macro_quarterly  12 US macroeconomic series, quarterly, 1959Q1 .. 2009Q3, 203 rows; no
                      gaps. The date is the first day of the quarter.

It also writes `README.md` next to the CSVs: provenance, licence and the gap handling above.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels
import statsmodels.api as sm

OUT = Path(__file__).resolve().parents[1] / "fulcrum" / "platform" / "data" / "series"
MACRO_CHANNELS = [
  "realgdp",
  "realcons",
  "realinv",
  "realgovt",
  "realdpi",
  "cpi",
  "m1",
  "tbilrate",
  "unemp",
  "pop",
  "infl",
  "realint",
]
README = """\
# Committed time series

Small real series in the ETT layout (`date` column, then one column per channel, oldest row
first) that `fulcrum.platform.data.series` serves by name (`data.series=NAME`). They are
exported from the copies bundled inside the statsmodels package (statsmodels {sm_version},
pandas {pd_version}) by `scripts/make_series_csvs.py`; rerunning it reproduces these files.

| name | channels | rows | span | source | licence |
|---|---|---|---|---|---|
{rows}

Provenance, as recorded by statsmodels:

- `co2_weekly`: "Mauna Loa Weekly Atmospheric CO2 Data", continuous air samples at Mauna Loa
  Observatory, Hawaii. Keeling, C.D. and T.P. Whorf (2004), Atmospheric CO2 concentrations
  derived from flask air samples at sites in the SIO network, in Trends: A Compendium of Data
  on Global Change, CDIAC, Oak Ridge National Laboratory, U.S. Department of Energy. Public
  domain (U.S. government / NOAA-CDIAC record). Gaps: {co2_gaps} of the weeks are missing in
  the source; each is filled by linear interpolation between the nearest observed weeks.
- `sunspots_monthly` and `sunspots_yearly`: sunspot numbers from the U.S. National
  Geophysical Data Center (NOAA/NGDC, now NCEI), which distributed the SILSO (Royal
  Observatory of Belgium) international sunspot number series. Public domain. No gaps: NGDC
  itself interpolated February 1824 from January and March; monthly values after 2008-12 are
  marked preliminary in the source. Monthly rows are dated the first of the month; yearly rows
  the first of January.
- `us_macro_quarterly`: United States macroeconomic data 1959Q1-2009Q3 compiled by Skipper
  Seabold for statsmodels from FRED (Federal Reserve Bank of St. Louis) and the U.S. Bureau of
  Labor Statistics (unemployment). Public domain (U.S. government data). No gaps. Rows are
  dated the first day of each quarter. Channels: real GDP, real personal consumption, real
  private investment, real federal government spending (billions of chained 2005 USD), real
  disposable income, CPI, M1, 3-month T-bill rate, unemployment rate (%), population
  (millions), inflation rate, real interest rate.
"""


def sunspots_monthly(path: Path) -> pd.DataFrame:
  """Parses NGDC's fixed-width table: one line per year, up to 12 monthly means."""
  dates, values = [], []
  for line in path.read_text().splitlines():
    fields = line.split()
    if not fields or not re.fullmatch(r"\d{4}", fields[0]):
      continue  # Headers, rules, blank lines and notes.
    year = int(fields[0])
    months = [float(v) for v in fields[1:]]
    if not 1 <= len(months) <= 12:
      raise ValueError(f"unexpected line in {path}: {line!r}")
    for month, value in enumerate(months, start=1):
      dates.append(f"{year:04d}-{month:02d}-01")
      values.append(value)
  frame = pd.DataFrame({"date": dates, "sunspots": values})
  # Each year must follow the last without a missing month: the table has no gaps.
  expected = pd.date_range(dates[0], periods=len(dates), freq="MS").strftime("%Y-%m-%d")
  if list(expected) != dates:
    raise ValueError("the monthly sunspot table skips a month")
  return frame


def co2_weekly() -> tuple[pd.DataFrame, int]:
  raw = sm.datasets.co2.load_pandas().data
  steps = pd.Series(raw.index).diff().dropna().unique()
  if len(steps) != 1 or steps[0] != pd.Timedelta(days=7):
    raise ValueError("the CO2 weeks are not evenly spaced")
  gaps = int(raw["co2"].isna().sum())
  co2 = raw["co2"].interpolate(method="linear", limit_area="inside")
  if co2.isna().any():
    raise ValueError("the CO2 series has a gap at an end; interpolation cannot fill it")
  frame = pd.DataFrame({"date": raw.index.strftime("%Y-%m-%d"), "co2": co2.to_numpy()})
  return frame, gaps


def sunspots_yearly() -> pd.DataFrame:
  raw = sm.datasets.sunspots.load_pandas().data
  years = raw["YEAR"].astype(int)
  return pd.DataFrame(
    {"date": [f"{y:04d}-01-01" for y in years], "sunspots": raw["SUNACTIVITY"].to_numpy()}
  )


def us_macro_quarterly() -> pd.DataFrame:
  raw = sm.datasets.macrodata.load_pandas().data
  quarters = zip(raw["year"], raw["quarter"], strict=True)
  dates = [f"{int(y):04d}-{3 * int(q) - 2:02d}-01" for y, q in quarters]
  frame = pd.DataFrame({"date": dates})
  for name in MACRO_CHANNELS:
    frame[name] = raw[name].to_numpy()
  return frame


def write(frame: pd.DataFrame, path: Path) -> None:
  values = frame.drop(columns="date").to_numpy(np.float64)
  if not np.isfinite(values).all():
    raise ValueError(f"{path.name} still has missing values")
  # %.10g keeps every digit the sources carry (at most 8 significant) without float noise.
  frame.to_csv(path, index=False, float_format="%.10g", lineterminator="\n")
  size = path.stat().st_size
  if size > 200_000:
    raise ValueError(f"{path.name} is {size} bytes; keep committed series under 200 KB")
  print(f"wrote {path} ({len(frame)} rows, {values.shape[1]} channels, {size} bytes)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=OUT, help="folder for the CSVs and README.md")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  src = Path(sm.datasets.__file__).parent / "sunspots" / "src" / "sunspots_monthly.dat"
  co2, co2_gaps = co2_weekly()
  frames = {
    "co2_weekly": (co2, "weekly", "NOAA / Scripps (CDIAC)"),
    "sunspots_monthly": (sunspots_monthly(src), "monthly", "NOAA NGDC (SILSO numbers)"),
    "sunspots_yearly": (sunspots_yearly(), "yearly", "NOAA NGDC (SILSO numbers)"),
    "us_macro_quarterly": (us_macro_quarterly(), "quarterly", "FRED, U.S. BLS"),
  }
  rows = []
  for name, (frame, freq, source) in frames.items():
    write(frame, args.out / f"{name}.csv")
    span = f"{frame['date'].iloc[0]} .. {frame['date'].iloc[-1]} ({freq})"
    rows.append(
      f"| `{name}` | {frame.shape[1] - 1} | {len(frame)} | {span} | {source} | public domain |"
    )
  readme = README.format(
    sm_version=statsmodels.__version__,
    pd_version=pd.__version__,
    rows="\n".join(rows),
    co2_gaps=co2_gaps,
  )
  (args.out / "README.md").write_text(readme)
  print(f"wrote {args.out / 'README.md'}")


if __name__ == "__main__":
  main()
