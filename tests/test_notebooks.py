"""Notebooks execute top to bottom on CPU with a tiny config; their Colab parts (badge, install
cell, TPU runtime metadata) are in step with their owners (scripts/sync_notebooks.py)."""

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, UNOPTIMISED_ENV, tiny_overrides
from tests.platform.agents.test_rollout import TINY_AGENT
from tests.platform.selfplay.test_spin import TINY


def execute(name: str, overrides: list[str], workdir: Path, monkeypatch) -> tuple[str, bool]:
  """Runs notebooks/NAME with the test overrides; returns (printed text, whether it plotted).
  The kernel compiles the tiny models without XLA's optimisation passes (UNOPTIMISED_ENV); its
  install cell finds Fulcrum importable from the checkout and installs nothing."""
  monkeypatch.delenv("FULCRUM_SOURCE", raising=False)
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
  assert "fulcrum is installed" in text and "jax.devices(): [CpuDevice" in text
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


def test_self_play_runs(tmp_path, monkeypatch):
  overrides = {**TINY, "data.data_dir": str(tmp_path / "tfds"), "train.steps": 4}
  overrides |= {"data.instruct_eval_prompts": 8, "train.eval_batches": 1}
  spin = {"spin.iterations": 1, "spin.num_prompts": 8, "spin.steps": 2}
  monkeypatch.setenv("FULCRUM_NOTEBOOK_SPIN", ";".join(f"{k}={v}" for k, v in spin.items()))
  text, plotted = execute(
    "self_play.ipynb", [f"{k}={v}" for k, v in overrides.items()], tmp_path / "runs", monkeypatch
  )
  assert "SFT exact match" in text and "| SPIN iteration 0 |" in text and plotted
  assert "SPIN iteration 1" not in text  # FULCRUM_NOTEBOOK_SPIN reached the spin run.
  assert (tmp_path / "runs" / "spin" / "iterations" / "0" / "spin.json").exists()
  assert "(right)" in text or "(wrong)" in text  # The final model answered.


def test_agents_runs(tmp_path, monkeypatch):
  overrides = {**TINY_AGENT, "train.steps": 4, "train.eval_every": 0}
  text, plotted = execute(
    "agents.ipynb", [f"{k}={v}" for k, v in overrides.items()], tmp_path / "runs", monkeypatch
  )
  assert "Harvest 3 parsnips." in text and "planner: solved in" in text
  assert "step 4: held-out action accuracy" in text  # FULCRUM_NOTEBOOK_OVERRIDES reached it.
  # The cloned agent's table (evaluation.render): the two tasks' domains, one episode each.
  for row in ("domain", "exploration", "farming", "overall", "episodes 2,", "random agent:"):
    assert row in text, row
  assert plotted and "--- turn 0" in text and "Till 3 tiles." in text
  for name in ("episode.txt", "episode.gif"):
    assert (tmp_path / "runs" / name).stat().st_size > 0


@pytest.fixture
def sync_notebooks():
  path = REPO / "scripts" / "sync_notebooks.py"
  spec = importlib.util.spec_from_file_location("sync_notebooks", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_notebooks_are_in_step_with_their_owners(sync_notebooks):
  assert sync_notebooks.problems() == []
  url = sync_notebooks.repository_url()
  assert url.startswith("https://github.com/")
  for path in (REPO / "notebooks").glob("*.ipynb"):
    nb = nbformat.read(path, as_version=4)
    owner_repo = url.removeprefix("https://github.com/")
    link = f"colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}"
    assert link in nb.cells[0].source
    assert nb.metadata["accelerator"] == "TPU" and nb.metadata["kernelspec"]["name"] == "python3"


def test_sync_finds_and_mends_a_stale_notebook(sync_notebooks, tmp_path, monkeypatch):
  folder = tmp_path / "notebooks"
  shutil.copytree(REPO / "notebooks", folder)
  monkeypatch.setattr(sync_notebooks, "NOTEBOOKS", folder)
  monkeypatch.setattr(sync_notebooks, "INSTALL_CELL", folder / "install_cell.py")
  nb = nbformat.read(folder / "quickstart.ipynb", as_version=4)
  del nb.cells[0]  # The badge.
  nb.metadata.pop("accelerator")
  nbformat.write(nb, folder / "quickstart.ipynb")
  cell = folder / "install_cell.py"
  cell.write_text(cell.read_text().replace('JAX_MIN = "', 'JAX_MIN = "1'))
  assert sync_notebooks.main(["--check"]) == 1
  assert sorted(sync_notebooks.problems()) == [
    "agents.ipynb: the first code cell is not notebooks/install_cell.py",
    "efficient_training.ipynb: the first code cell is not notebooks/install_cell.py",
    "install_cell.py: JAX_MIN is not pyproject's jax>=0.7",
    "quickstart.ipynb: the first cell is not its Open in Colab badge",
    "quickstart.ipynb: the first code cell is not notebooks/install_cell.py",
    "quickstart.ipynb: the metadata is not the Colab TPU runtime",
    "self_play.ipynb: the first code cell is not notebooks/install_cell.py",
  ]
  assert sync_notebooks.main([]) == 1  # The notebooks mended; JAX_MIN is for a person to fix.
  assert sync_notebooks.problems() == ["install_cell.py: JAX_MIN is not pyproject's jax>=0.7"]
