"""metrics.jsonl survives kills and faults (atomic resume rewrite, torn last line, unwritable
file); TensorBoard and Weights & Biases are optional sinks; the trainer logs the interval's mean
loss, the devices, MFU where the device's peak is known, and a profile of chosen steps."""

from __future__ import annotations

import errno
import io
import json
import logging
import sys
import types

import jax
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import metrics, telemetry
from fulcrum.platform.training import trainer as train_lib
from tests.conftest import tiny_overrides

NO_SINKS = {"log": {"tensorboard": False, "wandb": False}}


def log_config(**values):
  config = sections.base_config()
  config.log.update(values)
  return config


def write_rows(path, steps, tail=b""):
  rows = b"".join(json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n" for s in steps)
  path.write_bytes(rows + tail)


def steps_in(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# --- metrics.jsonl ------------------------------------------------------------------------------


def test_resume_drops_rows_past_the_restored_step(tmp_path):
  write_rows(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5])
  writer = metrics.MetricsWriter(tmp_path, resume_step=3, config=log_config(tensorboard=False))
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]


class _DiskFillsHalfway:
  """A file whose first write stores half of the data, then fails as a full disk does."""

  def __init__(self, file):
    self._file = file

  def write(self, data):
    self._file.write(data[: len(data) // 2])
    self._file.flush()
    raise OSError(errno.ENOSPC, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


def test_a_failed_resume_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch):
  """The disk fills up during the rewrite: one-line error, every row still there (the old
  in-place rewrite truncated the file first)."""
  path = tmp_path / "metrics.jsonl"
  write_rows(path, [1, 2, 3, 4, 5])
  before = path.read_bytes()
  real_open = io.open

  def open_filling_the_disk(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return _DiskFillsHalfway(f) if "w" in mode else f

  monkeypatch.setattr(io, "open", open_filling_the_disk)
  with pytest.raises(UserError, match="No space left on device"):
    metrics.MetricsWriter(tmp_path, resume_step=2, config=log_config(tensorboard=False))
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # No temporary file left.


def test_a_torn_last_line_is_dropped_and_the_run_goes_on(tmp_path, caplog):
  """The run was killed in the middle of an append: the partial row is dropped (it used to
  crash every resume in json.loads); a bad row elsewhere is kept as it is."""
  path = tmp_path / "metrics.jsonl"
  write_rows(path, [1, 2], tail=b"not json\n")
  with path.open("ab") as f:
    f.write(json.dumps({"step": 3}).encode() + b'\n{"step": 4, "loss": 0.2\xe2')
  caplog.set_level(logging.WARNING, logger="fulcrum")
  writer = metrics.MetricsWriter(tmp_path, resume_step=5, config=log_config(tensorboard=False))
  writer.write(6, {"loss": 0.1})
  writer.close()
  lines = path.read_text().splitlines()
  assert lines[2] == "not json"
  assert [json.loads(line)["step"] for i, line in enumerate(lines) if i != 2] == [1, 2, 3, 6]
  assert "torn last line" in caplog.text and "line 3 is not a JSON row" in caplog.text


def test_unwritable_metrics_file_is_one_line_before_training(cli, tiny_corpus, tmp_path):
  """A metrics.jsonl that cannot be opened (here a directory, which even root cannot write)
  stops `fulcrum train` with one line, exit 2, before any step; it used to be a traceback."""
  (tmp_path / "metrics.jsonl").mkdir()
  args = ["train", "--recipe", "demo", "--workdir", tmp_path]
  for item in tiny_overrides(tiny_corpus, **{"train.steps": 2}):
    args += ["--set", item]
  code, out, err = cli(*args)
  assert code == 2, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("fulcrum: error:") and "metrics.jsonl" in last, err
  assert "Traceback" not in err
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# --- TensorBoard and Weights & Biases are optional ----------------------------------------------


def test_training_logs_without_tensorboard_installed(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails.
  caplog.set_level(logging.WARNING, logger="fulcrum")
  writer = metrics.MetricsWriter(tmp_path, config=log_config())
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert steps_in(tmp_path / "metrics.jsonl") == [1]
  assert metrics.TENSORBOARD_INSTALL in caplog.text
  assert metrics.TENSORBOARD_INSTALL in metrics.tensorboard_command(tmp_path)


def test_tensorboard_command_says_how_to_get_the_viewer(tmp_path, monkeypatch):
  (tmp_path / "tensorboard").mkdir()
  command = f"tensorboard --logdir {tmp_path / 'tensorboard'}"
  assert metrics.tensorboard_command(tmp_path) == command
  find_spec = metrics.importlib.util.find_spec
  monkeypatch.setattr(
    metrics.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
  )
  text = metrics.tensorboard_command(tmp_path)
  assert text.startswith(command) and metrics.TENSORBOARD_INSTALL in text


class _FakeWandb(types.ModuleType):
  """The part of the wandb API the writer uses, recording the calls."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0

  def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
    return kwargs

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, row, step):
    self.logged.append((step, row))

  def finish(self):
    self.finished += 1


def test_wandb_logs_rows_and_resumes_the_same_run(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = log_config(tensorboard=False, wandb=True, wandb_project="proj")
  writer = metrics.MetricsWriter(tmp_path, config=config)
  writer.write(2, {"loss": 1.5, "note": "text"})
  writer.close()
  writer = metrics.MetricsWriter(tmp_path, resume_step=2, config=config)
  writer.close()
  writer = metrics.MetricsWriter(tmp_path, resume_step=0, config=config)  # A fresh run.
  writer.close()
  first, resumed, fresh = fake.inits
  assert first["project"] == "proj" and first["config"]["log"]["wandb"] is True
  assert resumed["id"] == first["id"] and fresh["id"] != first["id"]
  assert fake.logged == [(2, {"loss": 1.5})] and fake.finished == 3


def test_wandb_on_other_processes_and_when_missing(tmp_path, monkeypatch):
  config = log_config(tensorboard=False, wandb=True)
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(UserError, match=r"fulcrum\[wandb\]"):
    metrics.MetricsWriter(tmp_path, config=config)
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  writer = metrics.MetricsWriter(tmp_path / "host1", config=config)  # Only process 0 logs.
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "host1").exists()


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
  """The real client in offline mode (no network): the run lands in WORKDIR/wandb/."""
  for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = metrics.MetricsWriter(tmp_path, config=log_config(tensorboard=False, wandb=True))
  writer.write(1, {"loss": 2.0})
  writer.close()
  runs = list((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_log_section_validation():
  config = sections.base_config()
  config_lib.apply_overrides(config, ["log.wandb=true", "log.wandb_project= "])
  with pytest.raises(UserError, match="log.wandb_project"):
    sections.validate(config)


# --- What the trainer logs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tiny_corpus, tmp_path_factory, unoptimised_compiles):
  """The same 4 steps twice: logged every step (profiling steps 2-3, with a made-up peak for
  CPU devices so MFU is computed) and logged once (CPU's real table: no MFU)."""
  runs = {}
  for name, extra in [
    ("every_step", {"train.log_every": 1, "train.profile_steps": "2:3"}),
    ("once", {"train.log_every": 4}),
  ]:
    config = recipes.get("demo")
    config_lib.apply_overrides(
      config,
      tiny_overrides(tiny_corpus, **{"train.steps": 4, "train.eval_every": 0, **extra}),
    )
    workdir = tmp_path_factory.mktemp(name)
    patch = pytest.MonkeyPatch()
    if name == "every_step":
      patch.setitem(telemetry.TPU_PEAK_FLOPS, "cpu", 1e12)
    handler, logger = _Records(), logging.getLogger("fulcrum")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
      train_lib.train(config, workdir)
    finally:
      logger.removeHandler(handler)
      logger.setLevel(level)
      patch.undo()
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    runs[name] = (workdir, [r for r in rows if "loss" in r], handler.messages, config)
  return runs


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_logged_loss_is_the_mean_of_the_interval(two_runs):
  """One row for steps 1-4 carries their mean loss (it carried step 4's alone)."""
  per_step = [r["loss"] for r in two_runs["every_step"][1]]
  (row,) = two_runs["once"][1]
  assert len(per_step) == 4 and len(set(per_step)) == 4
  assert row["loss"] == pytest.approx(sum(per_step) / 4, rel=1e-6)
  assert row["loss"] != pytest.approx(per_step[-1], rel=1e-3)


def test_devices_are_named_at_start(two_runs):
  messages = two_runs["once"][2]
  assert "devices: 1 x cpu (cpu)" in messages


def test_mfu_is_the_step_flops_over_the_peak(two_runs):
  workdir, rows, _, config = two_runs["every_step"]
  exp = train_lib.build_experiment(config)
  state = exp.abstract_state
  batch = {k: jax.ShapeDtypeStruct((8, 32), "int32") for k in ("inputs", "targets")}
  with exp.activate():
    flops = telemetry.step_flops(train_lib.jit_train_step(exp), state, batch)
  assert flops > 6 * 8 * 32 * 30_000  # ~6 x tokens x parameters, and more for attention.
  for row in rows:
    assert row["mfu"] == pytest.approx(flops / row["step_time_s"] / 1e12, rel=1e-6)
  assert all("mfu" not in r for r in two_runs["once"][1])  # CPU: no known peak, no key.


def test_profile_steps_write_a_trace(two_runs):
  workdir = two_runs["every_step"][0]
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1
  assert any("profile of steps 2-3" in m for m in two_runs["every_step"][2])
