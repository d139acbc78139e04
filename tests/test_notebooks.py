"""Notebooks execute top to bottom on CPU with a tiny config."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO, UNOPTIMISED_ENV, tiny_overrides


def execute(name: str, overrides: list[str], workdir: Path, monkeypatch) -> tuple[str, bool]:
  """Runs notebooks/NAME with the test overrides; returns (printed text, whether it plotted).
  The kernel compiles the tiny models without XLA's optimisation passes (UNOPTIMISED_ENV)."""
  monkeypatch.setenv("FULCRUM_NOTEBOOK_OVERRIDES", ";".join(overrides))
  monkeypatch.setenv("FULCRUM_NOTEBOOK_WORKDIR", str(workdir))
  for key, value in UNOPTIMISED_ENV.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  ).execute()
  outputs = [o for c in nb.cells for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs)
  return text, any("image/png" in o.get("data", {}) for o in outputs)


def test_quickstart_runs(tiny_corpus, tmp_path, monkeypatch):
  overrides = tiny_overrides(
    tiny_corpus, **{"train.steps": 4, "train.eval_every": 4, "train.log_every": 2}
  )
  text, plotted = execute("quickstart.ipynb", overrides, tmp_path / "run", monkeypatch)
  assert "validation bits/byte" in text and plotted
  assert Path(tmp_path / "run" / "metrics.jsonl").exists()


def test_efficient_training_runs(tiny_corpus, tmp_path, monkeypatch):
  overrides = tiny_overrides(
    tiny_corpus,
    **{"train.steps": 3, "train.eval_every": 3, "train.log_every": 1, "model.d_model": 64},
  )
  # GaLore with 8-bit moments covers both optimizers' code; every run is one --set switch.
  runs = ("adamw", "galore8bit", "int8 QAT")
  monkeypatch.setenv("FULCRUM_NOTEBOOK_RUNS", ",".join(runs))
  text, plotted = execute("efficient_training.ipynb", overrides, tmp_path / "runs", monkeypatch)
  for name in runs:
    assert f"{name:11s} validation bits/byte" in text
  assert "÷ AdamW" in text and plotted
