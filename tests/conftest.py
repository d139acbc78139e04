"""Shared fixtures: a tiny text corpus and tiny-model overrides, so trainer tests take seconds."""

from __future__ import annotations

import logging
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
