"""A workdir's config.json is written atomically once a run is accepted and checked on resume;
loading names the fix."""

from __future__ import annotations

import json
import os

import pytest

from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.errors import UserError


def _config(**model):
  c = sections.base_config()
  for key, value in model.items():
    c.model[key] = value
  return c


def _accepted(path, config):
  """What `train` does around the checkpoint checks: prepare, then accept."""
  workdir = workdir_lib.prepare(path, config)
  workdir_lib.accept(workdir, config)
  return workdir


def test_prepare_alone_writes_nothing_a_refused_run_would_leave(tmp_path):
  workdir = workdir_lib.prepare(tmp_path / "run", _config(d_model=64))
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
  assert not any((workdir / "checkpoints").iterdir())  # No probe left either.


def test_accept_writes_the_resolved_config(tmp_path):
  workdir = _accepted(tmp_path / "run", _config(d_model=64))
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["model"]["d_model"] == 64
  assert workdir_lib.read_config(workdir).model.d_model == 64
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]


def test_a_failed_config_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
  """A write that fails part way (disk full at flush) must not leave half a config.json."""
  workdir = _accepted(tmp_path / "run", _config(d_model=64))
  before = (workdir / "config.json").read_text()

  def disk_full(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", disk_full)
  with pytest.raises(UserError, match="No space left on device"):
    workdir_lib.accept(workdir, _config(d_model=64))
  assert (workdir / "config.json").read_text() == before
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json"]


def test_prepare_refuses_a_different_model(tmp_path):
  workdir = _accepted(tmp_path / "run", _config(d_model=64))
  with pytest.raises(UserError, match="different model.*model.d_model: 64 -> 32"):
    workdir_lib.prepare(workdir, _config(d_model=32))


def test_prepare_refuses_another_optimizer_state_layout(tmp_path):
  workdir = _accepted(tmp_path / "run", _config())
  other = _config()
  other.optimizer.name = "adam8bit"
  with pytest.raises(UserError, match="optimizer state has another layout.*optimizer.name"):
    workdir_lib.prepare(workdir, other)


def test_loading_a_workdir_without_a_run_names_the_fix(tmp_path):
  with pytest.raises(UserError, match="has no config.json; pass the --workdir of a"):
    workdir_lib.load(tmp_path)
  _accepted(tmp_path, _config(d_model=32, num_layers=1))
  with pytest.raises(UserError, match="holds no checkpoint; train first"):
    workdir_lib.load(tmp_path)


def test_missing_kv_cache_calibration_names_the_command(tmp_path):
  with pytest.raises(UserError, match="run `fulcrum calibrate --workdir .* --bits 3` first"):
    workdir_lib.kv_cache_specs(tmp_path, None, 5, "kvquant", 3)
