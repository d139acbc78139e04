"""SPIN beyond the default transformer: every architecture, LoRA adapters, a model imported from
a Hugging Face checkpoint, and bad input through the CLI. Tiny models, a few steps each; one
SFT run per architecture, shared by the module."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from fulcrum import modules, recipes
from fulcrum.modules import ModelConfig
from fulcrum.platform import config as config_lib
from fulcrum.platform import hf, launch
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.optim import lora
from fulcrum.platform.selfplay import driver
from fulcrum.platform.selfplay import pairs as pairs_lib
from fulcrum.platform.training.tasks import get_task
from tests.conftest import REPO, random_params
from tests.platform.optim.test_lora import state_owners
from tests.platform.selfplay.test_spin import TINY

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

SFT_STEPS = 3
SPIN_STEPS = 2
SPIN = {
  "spin.iterations": 1,
  "spin.num_prompts": 8,
  "spin.steps": SPIN_STEPS,
  "train.async_checkpointing": False,
}
# Each architecture's SFT model keys beyond TINY's. Griffin's residual/recurrent/attention
# pattern needs a multiple of 3 layers when they are scanned; unscanned, 3 layers hold one of
# each. Mamba's SFT run stacks its layers while SPIN keeps its own unscanned default (how a run
# computes is its own): θ_0 must be placed into the SPIN run's layout. Hawk's blocks are
# Griffin's recurrent blocks (Griffin runs them beside local attention), so Griffin covers both.
ARCHS = {
  "transformer": {},
  "mamba": {"model.scan_layers": True},
  "griffin": {"model.num_layers": 3, "model.scan_layers": False},
}


def _config(recipe: str, root, **extra):
  config = recipes.get(recipe)
  values = {
    **TINY,
    "data.data_dir": str(root / "tfds"),
    "data.instruct_eval_prompts": 8,
    "train.eval_batches": 1,
    **extra,
  }
  config_lib.apply_overrides(config, [f"{k}={v}" for k, v in values.items()])
  return config


def _sft(root, name: str, **extra):
  """A short `instruct_sft` run in root/name (a row per step); returns (workdir, last metrics)."""
  workdir = root / name
  steps = {"train.steps": SFT_STEPS, "train.log_every": 1}
  config = _config("instruct_sft", root, **{**steps, **extra})
  result = launch.train(config, workdir)
  assert result["step"] == SFT_STEPS and 0.0 <= result["eval/exact_match"] <= 1.0
  return workdir, result


def _spin(root, source, name: str, **extra):
  """One SPIN iteration from SFT workdir `source` in root/name; returns the driver's result."""
  config = _config("spin", root, **{**SPIN, "spin.init_from": str(source), **extra})
  return launch.train(config, root / name)


def _rows(workdir) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flat(params) -> dict[tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def _check_iteration(workdir, source) -> None:
  """One finite row; iteration 0's checkpoint at spin.steps; its stored opponent log-probs are
  a fresh pass of θ_0 (the SFT run's newest checkpoint) over the stored rows."""
  rows = _rows(workdir)
  assert [r["iteration"] for r in rows] == [0]
  numbers = {k: v for k, v in rows[0].items() if isinstance(v, float)}
  assert {"eval/exact_match", "spin/loss", "spin/reward_accuracy", "spin/logp_real"} <= set(numbers)
  for key, value in numbers.items():
    assert np.isfinite(value), key
  _, _, step = workdir_lib.load(driver.iteration_dir(workdir, 0))
  assert step == SPIN_STEPS
  arrays, meta = pairs_lib.load(driver.iteration_dir(workdir, 0) / "pairs.npz")
  assert meta["new_pairs"] == 8
  exp, theta_0, _ = workdir_lib.load(source)
  for side in pairs_lib.SIDES:
    fresh = pairs_lib.score(exp.model, theta_0.params, pairs_lib.side_rows(arrays, side))
    np.testing.assert_allclose(arrays[f"opponent_{side}"], fresh, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("spin_archs")


@pytest.fixture(scope="module")
def sft_run(root):
  """`sft_run(arch)`: the SFT workdir of a tiny `arch` model (trained once per module)."""
  runs = {}

  def get(arch: str):
    if arch not in runs:
      runs[arch], _ = _sft(root, f"sft_{arch}", **{"model.arch": arch, **ARCHS[arch]})
    return runs[arch]

  return get


# --- every architecture ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_spin_trains_every_architecture(root, sft_run, arch):
  source = sft_run(arch)
  out = _spin(root, source, f"spin_{arch}")
  assert "SPIN iteration 0" in out["table"]
  model = workdir_lib.read_config(root / f"spin_{arch}").model
  assert (model.arch, model.scan_layers) == (arch, False)  # θ_0's model, the run's layout.
  _check_iteration(root / f"spin_{arch}", source)


def test_pairs_are_read_in_the_training_thread(root, tmp_path):
  """An iteration's batches come without prefetch threads: grain's default (16 threads reading
  500 batches ahead) held the GIL through the train step's compile, 3-4x slower on 2 cores."""
  seq_len = TINY["train.seq_len"]
  rows = {f"{side}_{k}": np.zeros((8, seq_len), np.int32) for side in pairs_lib.SIDES
          for k in pairs_lib.ROW_KEYS}  # fmt: skip
  opponent = {f"opponent_{side}": np.zeros((8,), np.float32) for side in pairs_lib.SIDES}
  pairs_lib.save(tmp_path / "pairs.npz", {**rows, **opponent}, {"iteration": 0})
  config = _config("spin", root, **{"spin.pairs": str(tmp_path / "pairs.npz")})
  before = threading.active_count()
  batches = get_task(config).train_iterator(0, 1)
  assert next(batches)["real_inputs"].shape == (TINY["train.batch_size"], seq_len)
  assert threading.active_count() == before


# --- LoRA ---------------------------------------------------------------------------------------


def test_spin_with_lora_trains_only_the_adapters(root, sft_run):
  """SPIN with model.lora_rank=4 from a full SFT run: the driver takes the SFT model section
  and keeps the run's lora_* keys; the base weights stay θ_0's bit for bit."""
  source = sft_run("transformer")
  _spin(root, source, "spin_lora", **{"model.lora_rank": 4})
  assert workdir_lib.read_config(root / "spin_lora").model.lora_rank == 4
  _check_iteration(root / "spin_lora", source)  # Adapters start as the identity.
  _, theta_0, _ = workdir_lib.load(source)
  _, state, _ = workdir_lib.load(driver.iteration_dir(root / "spin_lora", 0))
  before, after = _flat(theta_0.params), _flat(state.params)
  adapters = {k for k in after if k[-1] in lora.ADAPTERS}
  assert adapters and set(after) - adapters == set(before)
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value, err_msg="/".join(key))
  assert all(np.abs(after[k]).max() > 0 for k in adapters if k[-1] == lora.LORA_B)  # Trained.
  assert state_owners(state.opt_state) == set(lora.ADAPTERS)


def test_lora_sft_trains_only_the_adapters(root):
  workdir, result = _sft(root, "sft_lora", **{"model.lora_rank": 4, "model.lora_targets": "q,v"})
  assert np.isfinite(result["loss"])
  exp, state, _ = workdir_lib.load(workdir)
  fresh, trained = _flat(exp.init_state().params), _flat(state.params)
  adapters = {k for k in trained if k[-1] in lora.ADAPTERS}
  assert {k[-2] for k in adapters} == {"q", "v"}
  for key, value in fresh.items():
    if key in adapters:
      assert key[-1] == lora.LORA_A or np.abs(trained[key]).max() > 0, key
    else:  # The base weights are their seeded init, untouched.
      np.testing.assert_array_equal(trained[key], value, err_msg="/".join(key))
  assert state_owners(state.opt_state) == set(lora.ADAPTERS)


# --- a Hugging Face source ---------------------------------------------------------------------


def test_spin_from_a_hugging_face_import(root, tmp_path):
  """SFT from `train.init_from=hf:` (a Fulcrum transformer exported with the byte vocabulary,
  shaped unlike TINY), then SPIN from that SFT run: both take the checkpoint's model."""
  model = modules.build(ModelConfig(vocab_size=256, d_model=48, num_layers=1, num_heads=2))
  params = random_params(model, 0)
  folder = hf.save_pretrained(model, params, tmp_path / "hf")
  source, _ = _sft(root, "sft_hf", **{"train.init_from": f"hf:{folder}"})
  first = _rows(source)[0]  # param_norm is taken before the step's update.
  assert first["step"] == 1
  np.testing.assert_allclose(first["param_norm"], float(optax.tree.norm(params)), rtol=1e-5)
  _spin(root, source, "spin_hf")
  resolved = workdir_lib.read_config(root / "spin_hf").model
  assert (resolved.d_model, resolved.num_layers) == (48, 1)
  _check_iteration(root / "spin_hf", source)


# --- bad input ----------------------------------------------------------------------------------


BAD_INPUT = {
  "lora_targets": (
    "instruct_sft",
    ["model.lora_rank=4", "model.lora_targets=in_proj"],
    "model.lora_targets='in_proj' names no weight matmul of transformer",
  ),
  "tokenizer_vocab": (
    "instruct_sft",
    [f"data.tokenizer=hf:{REPO / 'tests' / 'fixtures' / 'tokenizer'}"],
    "model.vocab_size=256 is smaller than the 512 tokens",
  ),
  "init_from": ("instruct_sft", ["train.init_from=bogus:x"], "train.init_from='bogus:x' must be"),
  "beta": ("spin", ["spin.beta=0"], "spin.beta must be positive"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line(cli, tmp_path, case):
  recipe, overrides, message = BAD_INPUT[case]
  sets = [x for o in overrides for x in ("--set", o)]
  code, _, err = cli("train", "--recipe", recipe, "--workdir", tmp_path / "w", *sets)
  assert code == 2 and message in err, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "w" / "config.json").exists()


def test_spin_from_a_workdir_without_a_checkpoint(cli, tmp_path):
  untrained = tmp_path / "untrained"  # What a run killed before its first checkpoint leaves.
  untrained.mkdir()
  sft_config = _config("instruct_sft", tmp_path)
  (untrained / "config.json").write_text(config_lib.to_json(sft_config))
  base = ["train", "--recipe", "spin", "--workdir", tmp_path / "w"]
  code, _, err = cli(*base, "--set", f"spin.init_from={untrained}")
  assert code == 2 and f"spin.init_from={untrained}: " in err and "no checkpoints" in err, err
  assert "train.init_from" not in err  # The key that was set, not the driver's own.
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "w" / "config.json").exists()
