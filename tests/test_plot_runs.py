"""scripts/plot_runs.py: curves from metrics.jsonl files, clear errors for bad workdirs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def plot_runs():
  spec = importlib.util.spec_from_file_location("plot_runs", REPO / "scripts" / "plot_runs.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_run(folder, rows):
  folder.mkdir()
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


def test_reads_only_rows_with_the_metric(plot_runs, tmp_path):
  run = write_run(
    tmp_path / "a",
    [
      {"step": 50, "loss": 2.0},
      {"step": 100, "eval/accuracy": 0.5},
      {"step": 200, "eval/accuracy": 0.9},
    ],
  )
  assert plot_runs.read_metric(run, "eval/accuracy") == ([100, 200], [0.5, 0.9])


def test_writes_a_png(plot_runs, tmp_path):
  a = write_run(
    tmp_path / "a", [{"step": 1, "eval/accuracy": 0.1}, {"step": 2, "eval/accuracy": 0.2}]
  )
  b = write_run(tmp_path / "b", [{"step": 1, "eval/accuracy": 0.3}])
  out = tmp_path / "plots" / "curves.png"
  assert plot_runs.main([f"first={a}", str(b), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_workdir_and_missing_metric_exit_2(plot_runs, tmp_path, capsys):
  run = write_run(tmp_path / "a", [{"step": 1, "loss": 1.0}])
  assert plot_runs.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
  assert plot_runs.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith("plot_runs: error: no metrics.jsonl")
  assert "has no 'eval/accuracy' rows" in err[1]
  assert not (tmp_path / "x.png").exists()
