"""Shared fixtures: a tiny text corpus and tiny-model overrides, so trainer tests take seconds."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, str]:
  """A few stdlib files copied into a temp folder, and a temp TFDS data_dir."""
  root = tmp_path_factory.mktemp("corpus")
  src = Path(sysconfig.get_paths()["stdlib"]) / "json"
  for f in sorted(src.glob("*.py")):
    shutil.copy(f, root / f.name)
  data_dir = tmp_path_factory.mktemp("tfds")
  return {"text_files": str(root / "*.py"), "data_dir": str(data_dir)}


def tiny_overrides(corpus: dict[str, str], **extra) -> list[str]:
  """`--set` strings for a 2-layer, 32-wide model on the tiny corpus."""
  values = {
    "data.text_files": corpus["text_files"],
    "data.data_dir": corpus["data_dir"],
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "train.batch_size": 8,
    "train.seq_len": 32,
    "train.eval_batches": 2,
    "train.progress": False,
    "optimizer.warmup_steps": 2,
  }
  values.update(extra)
  return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 600):
  """Runs `python -m fulcrum ARGS` in a fresh process; returns the CompletedProcess."""
  import subprocess

  full_env = {**os.environ, **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "fulcrum", *args],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=REPO,
    timeout=timeout,
  )
