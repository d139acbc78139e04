"""Shared fixtures: a tiny text corpus and tiny-model overrides, so trainer tests take seconds."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_compilation_cache() -> None:
  """One persistent XLA compilation cache per test session, shared by the xdist workers and the
  `fulcrum` subprocesses they start (which inherit the environment): many tests compile the same
  tiny programs in separate processes (measured: tests/platform/training/test_faults.py 79 s ->
  65 s from a cold cache). A bounded size turns on the cache's file lock, which makes writes by
  concurrent processes safe. A cache the user configured is left alone."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  try:
    import filelock  # noqa: F401  (the cache's lock)
  except ImportError:
    return
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
  settings = {
    "jax_compilation_cache_dir": os.path.join(tempfile.gettempdir(), f"fulcrum-xla-{run}"),
    "jax_persistent_cache_min_compile_time_secs": 0.2,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_compilation_cache_max_size": 2**31,
  }
  os.environ.update({name.upper(): str(value) for name, value in settings.items()})
  if "jax" in sys.modules:  # Imported before this file (a plugin, a script): set it in process.
    import jax

    for name, value in settings.items():
      jax.config.update(name, value)


_shared_compilation_cache()


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


def train_recipe(recipe: str, overrides: list[str], path: Path) -> str:
  """Trains `recipe` with `--set` style overrides into `path` in process; returns the path."""
  from fulcrum import recipes
  from fulcrum.platform import config as config_lib
  from fulcrum.platform.training import trainer

  config = recipes.get(recipe)
  config_lib.apply_overrides(config, overrides)
  trainer.train(config, path)
  return str(path)


def hold_workdir_lock(workdir: Path):
  """A process holding `workdir`'s train.lock (as a running `fulcrum train` would) until killed."""
  import subprocess
  import sys

  script = (
    "import sys, time\nfrom fulcrum.platform import workdir as w\n"
    "with w.Lock(w.resolve(sys.argv[1])):\n  print('locked', flush=True)\n  time.sleep(600)\n"
  )
  holder = subprocess.Popen(
    [sys.executable, "-c", script, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline().strip() == "locked"
  return holder


def run_cli(
  args: list[str], env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = REPO
):
  """Runs `python -m fulcrum ARGS` in a fresh process (in `cwd`); returns the CompletedProcess."""
  import subprocess

  full_env = {**os.environ, **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "fulcrum", *args],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=cwd,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def unoptimised_compiles():
  """XLA's optimisation passes off for a module of many tiny programs, each run for
  microseconds (the decoding tests): the passes would take about half of the runtime. Use with
  `pytestmark = pytest.mark.usefixtures("unoptimised_compiles")`."""
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


# The same setting for a subprocess (`fulcrum train`, a notebook kernel): its environment.
UNOPTIMISED_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def random_params(model, seed: int):
  """Gaussian parameters of `model`'s shapes (no compiled init: it costs seconds a model), with
  long-memory recurrences: RG-LRU decays a^8 in [0.9, 0.999] as initialised, and Mamba's
  A = -exp(A_log) near -0.05, so outputs depend on tokens well back (and a broken cache shows)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn

  shapes = nn.unbox(
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  )
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1].key == "a_param":  # softplus(a_param) = -log(a) / 8.
      x = np.log(np.expm1(-np.log(rng.uniform(0.9, 0.999, s.shape)) / 8))
    elif path[-1].key == "A_log":
      x = rng.normal(-3.0, 0.25, s.shape)
    else:
      x = rng.normal(0.0, s.shape[-2] ** -0.5 if len(s.shape) >= 2 else 0.2, s.shape)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture
def cli(capsys):
  """Runs `fulcrum ARGS` in this process: (exit code, stdout, stderr). Restores the logging
  `main` reconfigures."""
  from fulcrum import cli as cli_lib

  names = ("fulcrum", "absl", "orbax", "jax", "grain", "tensorflow_datasets", "etils")
  saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in names}
  saved_propagate = logging.getLogger("fulcrum").propagate

  def run(*args):
    code = cli_lib.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err

  yield run
  for n, (handlers, level) in saved.items():
    logging.getLogger(n).handlers[:] = handlers
    logging.getLogger(n).setLevel(level)
  logging.getLogger("fulcrum").propagate = saved_propagate


@pytest.fixture(scope="session")
def gcs_bucket():
  """`gs://fulcrum-test`, a bucket in a local GCS emulator (tests/gcs_emulator.py) run for the
  session. The environment points every client at it (epath, orbax's tensorstore,
  tensorboardX), and subprocesses inherit it. Skipped only without the `dev` extra."""
  import importlib.util
  import socket
  import subprocess
  import time
  import urllib.request

  from tests.gcs_emulator import environment

  for module in ("gcp_storage_emulator", "gcsfs"):  # Not imported: gcsfs reads its env then.
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is missing; it comes with the dev extra: pip install -e '.[dev]'")

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  bucket, url = "fulcrum-test", f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
    [sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port), bucket],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  saved = {k: os.environ.get(k) for k in environment(url)}
  try:
    for _ in range(300):  # Until it answers its health check (or exits).
      if server.poll() is not None:
        pytest.fail(f"the GCS emulator exited with status {server.returncode}")
      try:
        urllib.request.urlopen(url + "/", timeout=1).close()
        break
      except OSError:
        time.sleep(0.1)
    else:
      pytest.fail(f"the GCS emulator did not answer at {url}")
    os.environ.update(environment(url))
    yield f"gs://{bucket}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    # The server is not stopped here: it ends itself once this process is gone. Objects that
    # upload once more at interpreter exit (tensorboardX's gs:// event writer, kept alive by its
    # atexit hook) would otherwise retry against a dead port for two minutes.
