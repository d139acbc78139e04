"""Plots one metric of several runs against the training step, from their metrics.jsonl files.

  .venv/bin/python scripts/plot_runs.py --metric eval/accuracy --out curves.png \\
    mamba=runs/selcopy_mamba "mamba LTI=runs/selcopy_lti" transformer=runs/selcopy_tf

Each run is LABEL=WORKDIR (or just WORKDIR, labelled by its folder name). Rows without the
metric are skipped; a run resumed after a crash has each step once (the trainer truncates
metrics.jsonl on resume), so curves are plotted as written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metric(workdir: Path, metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in WORKDIR/metrics.jsonl."""
  steps, values = [], []
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      if metric in row:
        steps.append(int(row["step"]))
        values.append(float(row[metric]))
  return steps, values


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR or WORKDIR")
  parser.add_argument("--metric", default="eval/accuracy")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--title", default="")
  parser.add_argument("--logy", action="store_true", help="log-scale y axis (losses, MSE)")
  args = parser.parse_args(argv)

  curves = []
  for spec in args.runs:
    label, _, path = spec.rpartition("=")
    workdir = Path(path)
    if not (workdir / "metrics.jsonl").is_file():
      print(f"plot_runs: error: no metrics.jsonl in {workdir}", file=sys.stderr)
      return 2
    steps, values = read_metric(workdir, args.metric)
    if not steps:
      print(f"plot_runs: error: {workdir} has no {args.metric!r} rows", file=sys.stderr)
      return 2
    curves.append((label or workdir.name, steps, values))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, steps, values in curves:
    ax.plot(steps, values, "o-", markersize=3, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel(args.metric)
  if args.logy:
    ax.set_yscale("log")
  if args.title:
    ax.set_title(args.title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
