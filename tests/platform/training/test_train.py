"""The trainer end to end: learning, resume after kill -9, sharded equality, no recompiles,
non-finite steps, gradient accumulation and preemption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.training import trainer as train_lib
from tests.conftest import REPO, UNOPTIMISED_ENV, run_cli, tiny_overrides

# Tiny models: compiling dominates, so XLA's optimisation passes are off here and in the
# subprocesses (UNOPTIMISED_ENV), which then compile exactly as this process does.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def tiny_config(corpus, **extra):
  config = recipes.get("demo")
  config_lib.apply_overrides(config, tiny_overrides(corpus, **extra))
  return config


def final_params(workdir):
  _, state, step = workdir_lib.load(workdir)
  return step, jax.device_get(state.params)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_trains_and_writes_workdir(tiny_corpus, tmp_path):
  config = tiny_config(
    tiny_corpus,
    **{
      "train.steps": 30,
      "train.log_every": 10,
      "train.eval_every": 15,
      "train.checkpoint_every": 10,
    },
  )
  result = train_lib.train(config, tmp_path)
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in train_rows] == [10, 20, 30]
  assert [r["step"] for r in eval_rows] == [15, 30]
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "param_norm"):
    assert key in train_rows[0]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]
  assert result["eval/bits_per_byte"] < 8.0  # Better than uniform over bytes.
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 30
  assert any((tmp_path / "tensorboard").iterdir())
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10, 20, 30]


def test_train_step_does_not_recompile(tiny_corpus):
  config = tiny_config(tiny_corpus)
  exp = train_lib.build_experiment(config)
  state = exp.init_state()
  step = train_lib.jit_train_step(exp)
  rng = np.random.default_rng(0)
  for _ in range(4):
    batch = {k: rng.integers(0, 256, (8, 32), dtype=np.int32) for k in ("inputs", "targets")}
    with exp.activate():
      state, _ = step(state, train_lib.global_batch(exp, batch))
  assert step._cache_size() == 1
  assert int(state.step) == 4


def test_grad_accumulation_matches_full_batch(tiny_corpus):
  """Accumulating 4 micro-batches gives the gradient (hence update) of the full batch."""
  results, state = [], None
  for accum in (1, 4):
    config = tiny_config(tiny_corpus, **{"train.grad_accum_steps": accum})
    exp = train_lib.build_experiment(config)
    if state is None:  # One initial state for both: grad_accum_steps changes no parameter.
      state = exp.init_state()
    batch = {
      k: np.random.default_rng(1).integers(0, 256, (8, 32), dtype=np.int32)
      for k in ("inputs", "targets")
    }
    with exp.activate():
      new, metrics = jax.jit(train_lib.make_train_step(exp))(
        state, train_lib.global_batch(exp, batch)
      )
    results.append((jax.device_get(new.params), float(metrics["grad_norm"])))
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    results[0][0],
    results[1][0],
  )


def test_nonfinite_updates_are_skipped_then_stop(tiny_corpus, tmp_path):
  config = tiny_config(tiny_corpus)
  exp = train_lib.build_experiment(config)
  state = exp.init_state()
  before = jax.device_get(state.params)
  step = jax.jit(train_lib.make_train_step(exp))
  batch = {k: np.zeros((8, 32), np.int32) for k in ("inputs", "targets")}
  poisoned = jax.tree.map(lambda p: p * np.float32("nan"), state.params)
  with exp.activate():
    new, metrics = step(state.replace(params=poisoned), train_lib.global_batch(exp, batch))
  assert int(new.nonfinite_run) == 1 and int(metrics["nonfinite_skipped"]) == 1
  # The update was skipped: parameters are the (poisoned) inputs, optimizer state untouched.
  assert int(new.opt_state[1][0].count) == 0
  del before
  # End to end: a learning rate that overflows stops with a clear error after N steps.
  config = tiny_config(
    tiny_corpus,
    **{
      "optimizer.learning_rate": 1e38,
      "optimizer.clip_norm": 0,
      "train.max_nan_steps": 3,
      "train.steps": 50,
    },
  )
  with pytest.raises(FloatingPointError, match="consecutive"):
    train_lib.train(config, tmp_path)


def _cli_train(workdir, corpus, extra=(), env=None):
  args = ["train", "--recipe", "demo", "--workdir", str(workdir)]
  for item in tiny_overrides(corpus, **dict(extra)):
    args += ["--set", item]
  return args


def test_resume_after_kill_equals_uninterrupted(tiny_corpus, tmp_path):
  extra = {
    "train.steps": 40,
    "train.checkpoint_every": 5,
    "train.log_every": 5,
    "train.eval_every": 0,
  }
  ref = run_cli(_cli_train(tmp_path / "ref", tiny_corpus, extra.items()), env=UNOPTIMISED_ENV)
  assert ref.returncode == 0, ref.stderr

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    [sys.executable, "-m", "fulcrum", *_cli_train(workdir, tiny_corpus, extra.items())],
    cwd=REPO,
    env={**os.environ, **UNOPTIMISED_ENV},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  ckpts = workdir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) >= 15:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "training finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert killed_at < 40

  resumed = run_cli(_cli_train(workdir, tiny_corpus, extra.items()), env=UNOPTIMISED_ENV)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stderr
  (step_a, params_a), (step_b, params_b) = final_params(tmp_path / "ref"), final_params(workdir)
  assert step_a == step_b == 40
  assert_trees_equal(params_a, params_b)
  # metrics.jsonl reads as one run: each step logged once.
  steps = [
    json.loads(r)["step"]
    for r in (workdir / "metrics.jsonl").read_text().splitlines()
    if "loss" in json.loads(r)
  ]
  assert steps == list(range(5, 45, 5))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_and_exits_cleanly(sig, tiny_corpus, tmp_path):
  extra = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.eval_every": 0}
  proc = subprocess.Popen(
    [sys.executable, "-m", "fulcrum", *_cli_train(tmp_path, tiny_corpus, extra.items())],
    cwd=REPO,
    env={**os.environ, **UNOPTIMISED_ENV},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
    time.sleep(0.1)
  time.sleep(1.0)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert signal.Signals(sig).name in err and "rerun the same command" in err
  steps = [int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000


def test_corrupt_latest_checkpoint_falls_back(tiny_corpus, tmp_path):
  config = tiny_config(tiny_corpus, **{"train.steps": 20, "train.checkpoint_every": 10})
  train_lib.train(config, tmp_path)
  # Truncate every file of the newest checkpoint.
  for f in (tmp_path / "checkpoints" / "20").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  _, _, step = workdir_lib.load(tmp_path)
  assert step == 10
  assert list((tmp_path / "checkpoints").glob("corrupt-20-*"))  # Moved aside, not deleted.
  # With every checkpoint unreadable the user gets one clear error (exit 2 from the CLI).
  for f in (tmp_path / "checkpoints" / "10").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  result = run_cli(["eval", "--workdir", str(tmp_path)])
  assert result.returncode == 2 and "could be read" in result.stderr
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("fulcrum: error:")


SHARDED_SCRIPT = """
import json, sys
import jax
from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform.training import trainer as train_lib
config = recipes.get("demo")
config_lib.apply_overrides(config, json.loads(sys.argv[1]))
out = {}
meshes = [("one", (1, 1, 1), jax.devices()[:1]),
          ("data_fsdp", (2, 4, 1), jax.devices()),
          ("data_fsdp_tensor", (2, 2, 2), jax.devices())]
for name, mesh, devices in [m for m in meshes if m[0] in sys.argv[2].split(",")]:
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  exp = train_lib.build_experiment(config, devices)
  state = exp.init_state()
  it = __import__("fulcrum.platform.data", fromlist=["x"]).make_train_iterator(
    config.data, seq_len=config.train.seq_len, batch_size=config.train.batch_size, seed=0)
  with exp.activate():
    step = train_lib.jit_train_step(exp)
    losses = []
    for _ in range(5):
      state, m = step(state, train_lib.global_batch(exp, next(it)))
      losses.append(float(m["loss"]))
  sharded = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  opt_sharded = {str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)}
  out[name] = {"losses": losses, "specs": sorted(sharded), "opt_specs": sorted(opt_sharded)}
print(json.dumps(out))
"""


# Per optimizer: overrides, and the meshes compared with one device. GaLore with 8-bit moments
# runs on the (2, 2, 2) mesh only, which shards over fsdp and tensor at once.
SHARDED_OPTIMIZERS = {
  "adamw": ({}, ("data_fsdp", "data_fsdp_tensor")),
  # The projectors refresh at steps 0, 2, 4 of the 5.
  "galore8bit": (
    {
      "optimizer.galore.rank": 8,
      "optimizer.galore.update_proj_gap": 2,
      "optimizer.quant.block_size": 64,
      "optimizer.quant.min_size": 512,
    },
    ("data_fsdp_tensor",),
  ),
}


@pytest.mark.parametrize("optimizer", list(SHARDED_OPTIMIZERS))
def test_sharded_training_matches_single_device(tiny_corpus, optimizer):
  settings, meshes = SHARDED_OPTIMIZERS[optimizer]
  overrides = tiny_overrides(
    tiny_corpus,
    **{"model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2},
    **{"optimizer.name": optimizer, **settings},
  )
  env = {
    **os.environ,
    **UNOPTIMISED_ENV,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  out = subprocess.run(
    [sys.executable, "-c", SHARDED_SCRIPT, json.dumps(overrides), ",".join(("one", *meshes))],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for mesh in meshes:
    np.testing.assert_allclose(result[mesh]["losses"], result["one"]["losses"], rtol=1e-5)
  # Parameters and optimizer state (Adam moments, GaLore projectors, 8-bit codes) really sharded.
  if "data_fsdp" in meshes:
    assert any("fsdp" in s for s in result["data_fsdp"]["specs"])
    assert any("fsdp" in s for s in result["data_fsdp"]["opt_specs"])
  both = result["data_fsdp_tensor"]
  for axis in ("fsdp", "tensor"):
    assert any(axis in s for s in both["specs"]) and any(axis in s for s in both["opt_specs"])


# galore8bit's unprojected leaves (the embedding) hold 8-bit full-size moments: adam8bit's state.
RESUME_OPTIMIZERS = {
  "galore": {"optimizer.galore.rank": 4, "optimizer.galore.update_proj_gap": 3},
  "galore8bit": {
    "optimizer.galore.rank": 4,
    "optimizer.galore.update_proj_gap": 3,
    "optimizer.quant.block_size": 32,
    "optimizer.quant.min_size": 128,
  },
}


@pytest.mark.parametrize("optimizer", list(RESUME_OPTIMIZERS))
def test_resume_with_optimizer_equals_uninterrupted(optimizer, tiny_corpus, tmp_path):
  """Stopping after a checkpoint and resuming gives bit-identical weights: GaLore's step count,
  projectors and low-rank moments and the 8-bit codes and scales all round-trip through orbax
  (the projectors refresh at steps 9 and 12, after the resume at step 8)."""
  extra = {
    "optimizer.name": optimizer,
    **RESUME_OPTIMIZERS[optimizer],
    "train.steps": 14,
    "train.checkpoint_every": 8,
    "train.eval_every": 0,
  }
  train_lib.train(tiny_config(tiny_corpus, **extra), tmp_path / "ref")
  # A copy without the final checkpoint: the rerun resumes from step 8 and trains 8 → 14 again.
  shutil.copytree(tmp_path / "ref", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "14")
  train_lib.train(tiny_config(tiny_corpus, **extra), tmp_path / "cut")
  step_a, params_a = final_params(tmp_path / "ref")
  _, state, step_b = workdir_lib.load(tmp_path / "cut")
  assert step_a == step_b == 14
  assert_trees_equal(params_a, jax.device_get(state.params))
  kinds = {type(x).__name__ for x in jax.tree.leaves(state.opt_state, is_leaf=_quantized)}
  assert ("QuantizedArray" in kinds) == optimizer.endswith("8bit")


def _quantized(x):
  from fulcrum.platform.optim import QuantizedArray

  return isinstance(x, QuantizedArray)
