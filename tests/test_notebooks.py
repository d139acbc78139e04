"""Notebooks execute top to bottom on CPU with a tiny config."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO, tiny_overrides


def test_quickstart_runs(tiny_corpus, tmp_path, monkeypatch):
  overrides = tiny_overrides(
    tiny_corpus, **{"train.steps": 4, "train.eval_every": 4, "train.log_every": 2}
  )
  monkeypatch.setenv("FULCRUM_NOTEBOOK_OVERRIDES", ";".join(overrides))
  monkeypatch.setenv("FULCRUM_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  ).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "validation bits/byte" in outputs
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert Path(tmp_path / "run" / "metrics.jsonl").exists()


def test_efficient_training_runs(tiny_corpus, tmp_path, monkeypatch):
  overrides = tiny_overrides(
    tiny_corpus,
    **{"train.steps": 3, "train.eval_every": 3, "train.log_every": 1, "model.d_model": 64},
  )
  monkeypatch.setenv("FULCRUM_NOTEBOOK_OVERRIDES", ";".join(overrides))
  monkeypatch.setenv("FULCRUM_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  nb = nbformat.read(REPO / "notebooks" / "efficient_training.ipynb", as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  ).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  for name in ("adamw", "galore", "adam8bit", "galore8bit", "int8 QAT"):
    assert f"{name:11s} validation bits/byte" in outputs
  assert "÷ AdamW" in outputs
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
