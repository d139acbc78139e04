"""Fault injection on a workdir: a second writer, checkpoints that do not fit, refused resumes,
bit flips, empty iterator states, non-finite updates, failed saves, read-only and garbage files,
a double Ctrl-C and grain workers outliving a killed run. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import checkpoint as checkpoint_lib
from fulcrum.platform.training import trainer as train_lib
from tests.conftest import REPO, UNOPTIMISED_ENV, hold_workdir_lock, run_cli, tiny_overrides

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def tiny_config(corpus, **extra):
  config = recipes.get("demo")
  base = {"train.steps": 20, "train.checkpoint_every": 10, "train.eval_every": 0}
  config_lib.apply_overrides(config, tiny_overrides(corpus, **{**base, **extra}))
  return config


def cli_args(workdir, corpus, **extra):
  base = {"train.steps": 20, "train.checkpoint_every": 10, "train.eval_every": 0}
  args = ["train", "--recipe", "demo", "--workdir", str(workdir)]
  for item in tiny_overrides(corpus, **{**base, **extra}):
    args += ["--set", item]
  return args


def snapshot(workdir: Path) -> dict[str, bytes]:
  """Every file under `workdir` (except the lock), for before/after comparisons."""
  return {
    str(p.relative_to(workdir)): p.read_bytes()
    for p in sorted(workdir.rglob("*"))
    if p.is_file() and p.name != "train.lock"
  }


def one_line_error(result, fragment):
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("fulcrum: error:") and fragment in last, result.stderr


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
  """A finished 20-step run (checkpoints 10 and 20); tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("trained")
  train_lib.train(tiny_config(tiny_corpus), workdir)
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# --- one writer per workdir -------------------------------------------------------------------


def test_a_second_train_on_a_locked_workdir_is_refused(tiny_corpus, tmp_path):
  holder = hold_workdir_lock(tmp_path)
  try:
    result = run_cli(cli_args(tmp_path, tiny_corpus), env=UNOPTIMISED_ENV)
    one_line_error(result, "in use by another `fulcrum train`")
    assert f"pid {holder.pid}" in result.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
  finally:
    holder.kill()
    holder.wait()
  # The holder died by SIGKILL: its lock is gone with it, and the next run takes the workdir.
  with workdir_lib.Lock(workdir_lib.resolve(tmp_path)):
    pass


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path):
  (tmp_path / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999}))
  with workdir_lib.Lock(workdir_lib.resolve(tmp_path)) as lock:
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid()


# --- checkpoints that do not fit are refused, never moved aside -------------------------------


def test_a_checkpoint_of_another_model_is_refused_not_moved(run_copy, tiny_corpus):
  (run_copy / "config.json").unlink()
  before = snapshot(run_copy)
  with pytest.raises(UserError, match="saved by a run with other settings.*params/"):
    train_lib.train(tiny_config(tiny_corpus, **{"model.d_model": 48}), run_copy)
  assert snapshot(run_copy) == before  # Nothing renamed, no config.json, metrics intact.


def test_a_refused_resume_leaves_config_json_as_it_was(run_copy, tiny_corpus):
  before = (run_copy / "config.json").read_text()
  with pytest.raises(UserError, match="data pipeline differs"):
    train_lib.train(tiny_config(tiny_corpus, **{"train.steps": 30, "train.seq_len": 16}), run_copy)
  assert (run_copy / "config.json").read_text() == before


def test_a_run_that_fails_at_start_leaves_no_config_json(tiny_corpus, tmp_path):
  bad = tiny_config(tiny_corpus, **{"data.text_files": str(tmp_path / "missing/*.py")})
  with pytest.raises(UserError):
    train_lib.train(bad, tmp_path)
  assert not (tmp_path / "config.json").exists()
  # The corrected command, with another model, is not refused by the failed one.
  train_lib.train(tiny_config(tiny_corpus, **{"train.steps": 2, "model.d_model": 16}), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 16


# --- silent corruption ------------------------------------------------------------------------


def _largest_array_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def test_a_bit_flip_in_checkpoint_data_is_caught(run_copy):
  target = _largest_array_file(run_copy / "checkpoints" / "20")
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))
  _, state, step = workdir_lib.load(run_copy)
  assert step == 10  # The flipped checkpoint failed its checksum; the previous one is used.
  assert list((run_copy / "checkpoints").glob("corrupt-20-*"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.parametrize("damage", ["truncated", "arrays deleted"])
def test_resuming_past_a_damaged_checkpoint_is_quiet(run_copy, tiny_corpus, damage):
  """Before: up to 1,233 lines of "Event loop is closed" tracebacks (arrays deleted)."""
  state = run_copy / "checkpoints" / "20" / "state"
  if damage == "truncated":
    target = _largest_array_file(run_copy / "checkpoints" / "20")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  else:
    for path in (state / "d").iterdir():
      path.unlink()
  result = run_cli(cli_args(run_copy, tiny_corpus, **{"train.steps": 22}), env=UNOPTIMISED_ENV)
  assert result.returncode == 0, result.stderr
  assert "checkpoint 20 is corrupt" in result.stderr
  for noise in ("Traceback", "Exception ignored", "Event loop is closed", "tensorstore_spec"):
    assert noise not in result.stderr, result.stderr
  assert list((run_copy / "checkpoints").glob("corrupt-20-*"))


def test_only_the_leftovers_of_a_failed_read_are_silenced(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  checkpoint_lib._quiet_closed_loop_callbacks()
  checkpoint_lib._quiet_closed_loop_callbacks()  # Idempotent: one filter, not a chain.

  async def ours():
    pass

  orbax_code = ours.__code__.replace(co_filename="/site-packages/orbax/checkpoint/x.py")
  orbax_read = types.FunctionType(orbax_code, {})()
  mine = ours()
  for error, source in [
    (RuntimeError("Event loop is closed"), None),
    (Exception("read failed"), orbax_read),
    (RuntimeError("other"), None),
    (ValueError("x"), mine),
  ]:
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, object=source))
  orbax_read.close()
  mine.close()
  assert seen == ["other", "x"]


@pytest.mark.parametrize("iterator", [None, {}], ids=["null", "empty"])
def test_an_empty_data_iterator_state_is_corrupt(run_copy, iterator):
  path = run_copy / "checkpoints" / "20" / "data" / "process_0-of-1.json"
  payload = json.loads(path.read_text())
  payload["iterator"] = iterator
  path.write_text(json.dumps(payload))
  assert workdir_lib.load(run_copy)[2] == 10


def test_an_edited_data_iterator_state_fails_its_checksum(run_copy):
  path = run_copy / "checkpoints" / "20" / "data" / "process_0-of-1.json"
  payload = json.loads(path.read_text())
  payload["iterator"]["injected"] = 1
  path.write_text(json.dumps(payload))
  assert workdir_lib.load(run_copy)[2] == 10


def test_a_workdir_of_another_process_count_reads_but_does_not_resume(run_copy, tiny_corpus):
  """As if trained on 2 hosts: eval and decode read it from one; a resume needs 2 processes."""
  for step in ("10", "20"):
    data = run_copy / "checkpoints" / step / "data"
    saved = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for i in range(2):
      (data / f"process_{i}-of-2.json").write_text(saved)
  assert workdir_lib.load(run_copy)[2] == 20
  before = snapshot(run_copy)
  with pytest.raises(UserError, match="another number of processes .*process_0-of-2.json"):
    train_lib.train(tiny_config(tiny_corpus, **{"train.steps": 30}), run_copy)
  assert snapshot(run_copy) == before


# --- non-finite parameters are never saved ----------------------------------------------------


@pytest.mark.parametrize(
  "setting, named",
  [
    # Untied, the embedding rows of bytes the batch lacks get exact zero gradients: 0/0 in Adam.
    ({"optimizer.eps": 0.0, "model.tie_embeddings": False}, "optimizer.eps=0.0"),
    ({"optimizer.learning_rate": "inf"}, "optimizer.learning_rate=inf"),
  ],
  ids=["eps=0", "learning_rate=inf"],
)
def test_a_non_finite_update_is_skipped_and_named(tiny_corpus, tmp_path, setting, named):
  config = tiny_config(
    tiny_corpus, **{**setting, "train.max_nan_steps": 3, "train.checkpoint_every": 2}
  )
  with pytest.raises(FloatingPointError, match=f"optimizer update was not finite.*{named}"):
    train_lib.train(config, tmp_path)
  # Whatever was saved before the run stopped holds finite parameters only.
  if (tmp_path / "checkpoints").exists() and any((tmp_path / "checkpoints").iterdir()):
    _, state, _ = workdir_lib.load(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_non_finite_state_is_never_saved(run_copy, tiny_corpus):
  exp, state, step = workdir_lib.load(run_copy)
  poisoned = state.replace(params=jax.tree.map(lambda p: p * np.float32("nan"), state.params))
  ckpt = checkpoint_lib.Checkpointer(run_copy / "checkpoints", async_save=False)
  try:
    with pytest.raises(FloatingPointError, match="non-finite"):
      ckpt.save(step + 10, poisoned, {"any": 1})
  finally:
    ckpt.close()
  assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["10", "20"]


# --- a failed save stops the run ---------------------------------------------------------------


def test_a_failed_save_stops_the_run_with_one_error(tiny_corpus, tmp_path, monkeypatch):
  saves = []
  original = checkpoint_lib.DataHandler.save

  def failing_save(self, directory, args):
    saves.append(1)
    if len(saves) == 2:
      raise OSError(28, "No space left on device")
    return original(self, directory, args)

  monkeypatch.setattr(checkpoint_lib.DataHandler, "save", failing_save)
  config = tiny_config(tiny_corpus, **{"train.steps": 40, "train.log_every": 5})
  with pytest.raises(UserError, match="checkpoint at step 20 .* failed .*No space left"):
    train_lib.train(config, tmp_path)
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) <= 20  # It stopped at the failed save.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]


def test_an_unwritable_checkpoints_folder_is_refused_at_start(tiny_corpus, tmp_path, monkeypatch):
  # chmod does not stop root (CI runs as root), so the filesystem refuses through epath instead.
  real_write = epath.Path.write_text

  def refuse(self, *args, **kwargs):
    if self.parent.name == "checkpoints":
      raise PermissionError(13, "Permission denied")
    return real_write(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", refuse)
  with pytest.raises(UserError, match="checkpoints is not writable .*Permission denied"):
    train_lib.train(tiny_config(tiny_corpus), tmp_path)
  assert not (tmp_path / "config.json").exists()
  assert not (tmp_path / "metrics.jsonl").exists()


# --- read-only and garbage files ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_a_read_only_workdir_file_is_one_line(run_copy, tiny_corpus, name, monkeypatch):
  real_access = os.access
  target = str(run_copy / name)
  monkeypatch.setattr(
    os, "access", lambda p, mode: False if os.fspath(p) == target else real_access(p, mode)
  )
  with pytest.raises(UserError, match=f"{name} is read-only"):
    workdir_lib.prepare(run_copy, tiny_config(tiny_corpus))


@pytest.mark.parametrize("content", ["", "{not json", "null", "[1, 2]"])
@pytest.mark.parametrize("command", ["eval", "decode", "attribute"])
def test_garbage_config_json_is_one_line(run_copy, content, command, capsys):
  (run_copy / "config.json").write_text(content)
  args = {
    "eval": ["eval", "--workdir", str(run_copy)],
    "decode": ["decode", "--workdir", str(run_copy), "--prompt", "def"],
    "attribute": [
      "attribute",
      "--workdir",
      str(run_copy),
      "--input",
      "def f",
      "--method",
      "saliency",
    ],
  }[command]
  from fulcrum import cli as cli_lib

  assert cli_lib.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("fulcrum: error:") and "config.json" in err[0], err


def test_training_over_a_garbage_config_json_rewrites_it(run_copy, tiny_corpus):
  (run_copy / "config.json").write_text("{not json")
  result = train_lib.train(tiny_config(tiny_corpus, **{"train.steps": 22}), run_copy)
  assert result["step"] == 22
  assert json.loads((run_copy / "config.json").read_text())["train"]["steps"] == 22


# --- signals and worker processes --------------------------------------------------------------


def _start(args, tmp_path, env=None):
  return subprocess.Popen(
    [sys.executable, "-m", "fulcrum", *args],
    cwd=REPO,
    env={**os.environ, **UNOPTIMISED_ENV, **(env or {})},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_rows(workdir: Path, proc, timeout=300):
  deadline = time.time() + timeout
  path = workdir / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if path.exists() and path.read_text().strip():
      return
    time.sleep(0.1)
  raise AssertionError(f"no metrics row: {proc.poll()} {proc.stderr.read() if proc.stderr else ''}")


def test_two_ctrl_c_exit_with_one_line(tiny_corpus, tmp_path):
  extra = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.log_every": 1}
  proc = _start(cli_args(tmp_path, tiny_corpus, **extra), tmp_path)
  _wait_for_rows(tmp_path, proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode in (0, 130), err  # 0 when the save finished before the second one.
  assert "Traceback" not in err and "Exception" not in err, err
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]


def _children(pid: int) -> set[int]:
  out = set()
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.add(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc")
def test_grain_workers_end_when_the_run_is_killed(tiny_corpus, tmp_path):
  extra = {"train.steps": 100000, "train.log_every": 1, "data.num_workers": 2}
  proc = _start(cli_args(tmp_path, tiny_corpus, **extra), tmp_path)
  _wait_for_rows(tmp_path, proc)
  workers = set()
  for pid in _children(proc.pid):
    workers |= {pid} | _children(pid)
  assert workers, "no grain worker processes found"
  proc.kill()
  proc.wait()
  deadline = time.time() + 30
  while time.time() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.2)
  left = [p for p in workers if _alive(p)]
  for pid in left:
    os.kill(pid, signal.SIGKILL)
  assert not left, f"grain workers outlived the killed run: {left}"
