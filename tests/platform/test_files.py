"""`files.write_atomic`: a write interrupted at any point leaves the old file whole."""

from __future__ import annotations

import os

import pytest

from fulcrum.platform import files


def test_write_atomic_replaces_the_file(tmp_path):
  path = tmp_path / "f.json"
  files.write_atomic(path, "old")
  files.write_atomic(path, b"new")
  assert path.read_text() == "new"
  assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch, fails):
  """A kill (here KeyboardInterrupt) before or at the rename: old contents, no temp file."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("row 1\nrow 2\n")

  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, fails, interrupted)
  with pytest.raises(KeyboardInterrupt):
    files.write_atomic(path, "row 1\n")
  monkeypatch.undo()
  assert path.read_text() == "row 1\nrow 2\n"
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_is_local():
  assert files.is_local("/tmp/run") and not files.is_local("gs://bucket/run")
