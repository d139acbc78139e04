"""Multi-host: the launch read from the environment, and two `fulcrum train` processes on
127.0.0.1 (one CPU device each) that resume exactly after kill -9 and stop together on a
SIGTERM sent to one of them.

The end-to-end test is `slow`: five two-process launches, about 75 s on 2 idle cores (the rest
of the file takes about 15 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from fulcrum.platform.data import text_corpus
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import sharding
from tests.conftest import REPO, UNOPTIMISED_ENV, hold_workdir_lock, run_cli, tiny_overrides

EXPLICIT = {
  "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
  "JAX_NUM_PROCESSES": "4",
  "JAX_PROCESS_ID": "2",
}
# Two tasks of an srun step, as SLURM sets them.
SLURM = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "node[001-002]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
}


@pytest.fixture
def initialize(monkeypatch):
  """`jax.distributed.initialize` replaced by a recorder (its keyword arguments, per call)."""
  calls: list[dict] = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(sharding, "_tpu_pod", lambda: False)
  return calls


def test_explicit_env_passes_all_three(initialize):
  launch = sharding.maybe_initialize_distributed(EXPLICIT)
  assert initialize == [
    {
      "coordinator_address": "10.0.0.1:1234",
      "num_processes": 4,
      "process_id": 2,
      "initialization_timeout": sharding.INITIALIZATION_TIMEOUT_S + sharding.JOIN_GRACE_S,
    }
  ]
  assert launch.describe() == "process 2 of 4, coordinator 10.0.0.1:1234, from JAX_* variables"


@pytest.mark.parametrize(
  "present",
  [(k,) for k in sharding.EXPLICIT_ENV]
  + [tuple(k for k in sharding.EXPLICIT_ENV if k != gone) for gone in sharding.EXPLICIT_ENV],
)
def test_partial_explicit_env_names_what_is_missing(initialize, present):
  missing = [k for k in sharding.EXPLICIT_ENV if k not in present]
  with pytest.raises(UserError) as e:
    sharding.maybe_initialize_distributed({k: EXPLICIT[k] for k in present})
  message = str(e.value)
  verb = " is set but " if len(present) == 1 else " are set but "
  assert message.startswith(" and ".join(present) + verb)
  assert " and ".join(missing) in message and "set all three" in message
  assert "\n" not in message and not initialize


@pytest.mark.parametrize(
  "override, expected",
  [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer >= 1"),
    ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES='0' is not an integer >= 1"),
    ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1' is not an integer >= 0"),
    ({"JAX_PROCESS_ID": "4"}, "JAX_PROCESS_ID=4 is out of range for JAX_NUM_PROCESSES=4"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "is not HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:http"}, "is not HOST:PORT"),
    ({"FULCRUM_INIT_TIMEOUT_S": "soon"}, "FULCRUM_INIT_TIMEOUT_S='soon' is not a whole number"),
  ],
)
def test_bad_explicit_values_are_user_errors(initialize, override, expected):
  with pytest.raises(UserError, match=re.escape(expected)):
    sharding.maybe_initialize_distributed({**EXPLICIT, **override})
  assert not initialize


def test_explicit_env_wins_over_slurm(initialize):
  sharding.maybe_initialize_distributed({**SLURM, **EXPLICIT})
  assert initialize[0]["process_id"] == 2


def test_slurm_with_several_tasks_uses_jax_detection(initialize):
  launch = sharding.maybe_initialize_distributed({**SLURM, "FULCRUM_INIT_TIMEOUT_S": "7"})
  assert launch.source == "SLURM"
  assert initialize == [{"initialization_timeout": 7 + sharding.JOIN_GRACE_S}]


def test_single_task_slurm_and_plain_runs_do_not_initialize(initialize):
  assert sharding.maybe_initialize_distributed({**SLURM, "SLURM_NTASKS": "1"}) is None
  assert sharding.maybe_initialize_distributed({}) is None
  assert sharding.maybe_initialize_distributed({k: "" for k in EXPLICIT}) is None  # Set empty.
  assert not initialize


def test_slurm_tasks_outside_srun_train_alone_with_a_warning(initialize, caplog, monkeypatch):
  """A batch script (or a shell on an allocated node) has SLURM_NTASKS but not srun's step
  variables: jax's detection would fail on them (jax-ml/jax#30073)."""
  monkeypatch.setattr(logging.getLogger("fulcrum"), "propagate", True)
  environ = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  with caplog.at_level(logging.WARNING, logger="fulcrum"):
    assert sharding.maybe_initialize_distributed({**environ, "SLURM_NTASKS": "8"}) is None
  assert not initialize
  assert "SLURM_NTASKS=8 but SLURM_STEP_NODELIST is unset" in caplog.text
  assert "srun fulcrum train" in caplog.text


def test_tpu_pod_uses_jax_detection(initialize, monkeypatch):
  monkeypatch.setattr(sharding, "_tpu_pod", lambda: True)
  assert sharding.maybe_initialize_distributed({}).source == "Cloud TPU"
  assert list(initialize[0]) == ["initialization_timeout"]


def test_already_initialized_is_left_alone(initialize, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  sharding.maybe_initialize_distributed({**EXPLICIT, "JAX_PROCESS_ID": "0"})
  assert not initialize


def test_failed_initialize_is_one_line(monkeypatch):
  def fail(**kw):
    raise RuntimeError("UNKNOWN: Failed to start RPC server\nmore detail from XLA")

  monkeypatch.setattr(jax.distributed, "initialize", fail)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(UserError) as e:
    sharding.maybe_initialize_distributed({**EXPLICIT, "JAX_PROCESS_ID": "0"})
  assert "could not join the multi-host run (process 0 of 4" in str(e.value)
  assert "Failed to start RPC server" in str(e.value) and "\n" not in str(e.value)


def test_mesh_comes_from_jax_make_mesh(monkeypatch):
  """All devices: jax.make_mesh's layout, with Auto axes (logical rules, not explicit mode)."""
  import ml_collections

  made = []
  real = jax.make_mesh
  monkeypatch.setattr(jax, "make_mesh", lambda *a, **kw: made.append((a, kw)) or real(*a, **kw))
  cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  mesh = sharding.make_mesh(cfg)
  assert made and made[0][0] == ((len(jax.devices()), 1, 1), sharding.MESH_AXES)
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  assert sharding.make_mesh(cfg, jax.devices()[:1]).devices.shape == (1, 1, 1)
  with pytest.raises(UserError, match="does not fit"):
    sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))


# --- Subprocesses: the CLI, and two-process runs on 127.0.0.1 -----------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
  """This environment without any launch variables the test runner itself may carry."""
  drop = (*sharding.EXPLICIT_ENV, *sharding.SLURM_ENV, sharding.TIMEOUT_ENV, "XLA_FLAGS")
  return {k: v for k, v in os.environ.items() if k not in drop}


def test_cli_partial_env_exits_2_with_one_line(tmp_path):
  result = run_cli(
    ["train", "--recipe", "demo", "--workdir", str(tmp_path / "run")],
    env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fulcrum: error: JAX_COORDINATOR_ADDRESS is set")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("process_id", [0, 1], ids=["peers_missing", "coordinator_missing"])
def test_join_timeout_is_one_line(process_id):
  """Process 1 finds no coordinator (a UserError); process 0 waits for peers that never come
  (jax would abort with a C++ stack trace: the deadline ends the process first)."""
  env = {
    **_clean_env(),
    "JAX_PLATFORMS": "cpu",
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": str(process_id),
    sharding.TIMEOUT_ENV: "2",
  }
  script = (
    "import sys\nfrom fulcrum.platform.errors import UserError\n"
    "from fulcrum.platform.training import sharding\n"
    "try:\n  sharding.maybe_initialize_distributed()\n"
    "except UserError as e:\n  print(f'fulcrum: error: {e}', file=sys.stderr)\n  sys.exit(2)\n"
    "print('joined')\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and "joined" not in result.stdout
  assert len(lines) == 1 and lines[0].startswith("fulcrum: error:"), result.stderr
  assert ("did not assemble within 2s" if process_id == 0 else "nothing answers at") in lines[0]


STEPS, EVERY = 20, 5  # Checkpoints (and metrics rows) at 5, 10, 15, 20.


class TwoHosts:
  """`fulcrum train` as processes 0 and 1 of a run on 127.0.0.1 (one CPU device each)."""

  def __init__(self, workdir, corpus, started: list[subprocess.Popen]):
    self.workdir, self.started, self.launches = workdir, started, 0
    overrides = tiny_overrides(
      corpus,
      **{
        "mesh.data": 2,
        "train.steps": STEPS,
        "train.checkpoint_every": EVERY,
        "train.log_every": EVERY,
        "train.eval_every": 0,
      },
    )
    self.args = ["train", "--recipe", "demo", "--workdir", str(workdir)]
    for item in overrides:
      self.args += ["--set", item]

  def _log_path(self, i: int):
    return self.workdir.parent / f"{self.workdir.name}-{self.launches}-p{i}.log"

  def start(self) -> list[subprocess.Popen]:
    self.launches += 1
    env = {
      **_clean_env(),
      **UNOPTIMISED_ENV,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
      "JAX_NUM_PROCESSES": "2",
      sharding.TIMEOUT_ENV: "120",
    }
    procs = []
    for i in (0, 1):
      with open(self._log_path(i), "w") as log:
        procs.append(
          subprocess.Popen(
            [sys.executable, "-m", "fulcrum", *self.args],
            env={**env, "JAX_PROCESS_ID": str(i)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )
    self.started.extend(procs)
    return procs

  def log(self, i: int) -> str:
    return self._log_path(i).read_text()

  def finish(self, procs, timeout: int = 240) -> None:
    """Waits for both; both must exit 0."""
    for i, proc in enumerate(procs):
      try:
        proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        pytest.fail(f"process {i} did not finish:\n{self.log(i)}")
    for i, proc in enumerate(procs):
      assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{self.log(i)}"

  def checkpoints(self) -> list[int]:
    root = self.workdir / "checkpoints"
    return sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []

  def metrics(self) -> list[dict]:
    """metrics.jsonl's rows (a row being written by a live run is left out)."""
    path = self.workdir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
      try:
        rows.append(json.loads(line))
      except ValueError:
        break
    return rows


@pytest.fixture
def started():
  """Every process a test starts; any still running at teardown is killed."""
  procs: list[subprocess.Popen] = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _wait_until(condition, procs, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not condition():
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      pytest.fail(f"the run ended or stalled before {what}")
    time.sleep(0.05)


def _trajectory(rows: list[dict], stopped_at: int) -> list[tuple]:
  """What a resumed run must reproduce exactly: every row's last-step values, eval, and the
  loss (a mean since the previous row) of rows whose interval does not span `stopped_at`."""
  keys = ("grad_norm", "param_norm", "update_norm", "learning_rate", "eval/loss")
  spans = lambda r: "loss" in r and r["step"] - EVERY < stopped_at < r["step"]
  return [(r["step"], None if spans(r) else r.get("loss"), *(r.get(k) for k in keys)) for r in rows]


@pytest.fixture(scope="module")
def prepared_corpus(tiny_corpus):
  """The corpus built once here, so two processes never race to build it."""
  text_corpus.prepare(tiny_corpus["text_files"], tiny_corpus["data_dir"])
  return tiny_corpus


@pytest.mark.slow
def test_two_hosts_resume_exactly_after_kill_and_sigterm(prepared_corpus, tmp_path, started):
  """Run A trains to STEPS uninterrupted, beside run B, which is
  1. killed (SIGKILL, both processes) after its first checkpoint, and rerun;
  2. sent SIGTERM on process 1 only once the rerun has logged a row: JAX's preemption notifier
     tells process 0 through the coordination service, both save the same step and exit 0;
  3. rerun to STEPS. B's metrics then equal A's exactly."""
  a = TwoHosts(tmp_path / "a", prepared_corpus, started)
  b = TwoHosts(tmp_path / "b", prepared_corpus, started)
  a_procs = a.start()

  procs = b.start()
  _wait_until(lambda: b.checkpoints(), procs, "its first checkpoint")
  for proc in procs:
    os.kill(proc.pid, signal.SIGKILL)
  for proc in procs:
    proc.wait()
  killed_at = b.checkpoints()[-1]
  assert EVERY <= killed_at < STEPS
  data = b.workdir / "checkpoints" / str(killed_at) / "data"
  names = sorted(p.name for p in data.glob("process_*"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]

  procs = b.start()

  def new_row() -> bool:  # Rows launch 1 logged past its checkpoint are gone once "model:" is.
    rows = b.metrics() if all("fulcrum: model:" in b.log(i) for i in (0, 1)) else []
    return bool(rows) and rows[-1]["step"] > killed_at

  _wait_until(new_row, procs, "a new row")
  os.kill(procs[1].pid, signal.SIGTERM)
  b.finish(procs)
  assert all(f"resumed from step {killed_at}" in b.log(i) for i in (0, 1))
  saved = [re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", b.log(i)) for i in (0, 1)]
  assert saved[0] == saved[1] and len(saved[0]) == 1, [b.log(i) for i in (0, 1)]
  stopped_at = int(saved[0][0])
  assert killed_at < stopped_at < STEPS and b.checkpoints()[-1] == stopped_at

  b.finish(b.start())
  assert all(f"resumed from step {stopped_at}" in b.log(i) for i in (0, 1))
  a.finish(a_procs)
  rows_a, rows_b = a.metrics(), b.metrics()
  assert [r["step"] for r in rows_a] == [*range(EVERY, STEPS + 1, EVERY), STEPS]  # + eval row.
  assert _trajectory(rows_b, stopped_at) == _trajectory(rows_a, stopped_at)
  assert rows_b[-1]["eval/loss"] == rows_a[-1]["eval/loss"]
  assert rows_b[-2]["loss"] == rows_a[-2]["loss"] or stopped_at > STEPS - EVERY


def test_two_hosts_refused_by_a_held_lock_both_exit_2(prepared_corpus, tmp_path, started):
  """Process 0 takes the lock for the run; when another run holds it, both hosts stop with one
  line (before: process 1 waited at the mesh until JAX's heartbeat timeout, then a C++ abort)."""
  run = TwoHosts(tmp_path / "run", prepared_corpus, started)
  run.workdir.mkdir()
  started.append(hold_workdir_lock(run.workdir))
  procs = run.start()
  for i, proc in enumerate(procs):
    try:
      proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {i} did not stop:\n{run.log(i)}")
  for i, proc in enumerate(procs):
    errors = [line for line in run.log(i).splitlines() if line.startswith("fulcrum: error:")]
    assert proc.returncode == 2 and len(errors) == 1, run.log(i)
    assert "Traceback" not in run.log(i)
  assert "in use by another `fulcrum train`" in run.log(0)
  assert "process 0 could not take" in run.log(1)
