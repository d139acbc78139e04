"""`train.init_from`: runs that start from a Hugging Face checkpoint or another run's params.

The Hugging Face fixtures (tests/fixtures/hf/, one per family) have a 128-token vocabulary, so
those runs train a synthetic task; the `workdir:` source is a tiny byte-level run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import hf, sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.training import init_from
from fulcrum.platform.training import trainer as train_lib
from fulcrum.platform.training.experiment import build_experiment
from tests.conftest import REPO, UNOPTIMISED_ENV, tiny_overrides, train_recipe

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"
FAMILIES = ["tiny_llama", "tiny_mistral", "tiny_mamba", "tiny_recurrent_gemma"]
HF_RECIPE = "synthetic_induction_heads"  # Its 18 tokens fit the fixtures' 128.


def synthetic_config(*overrides: str):
  config = recipes.get(HF_RECIPE)
  config_lib.apply_overrides(
    config,
    ["train.batch_size=4", "train.seq_len=16", "data.length=16", "train.eval_batches=1"]
    + ["train.progress=False", *overrides],
  )
  return config


def experiment(config):
  """The resolved, validated config and its experiment (what `train` builds)."""
  config = init_from.resolve_config(config)
  sections.validate(config)
  return config, build_experiment(config)


def apply(exp, params, tokens) -> np.ndarray:
  with exp.activate():
    return np.asarray(jax.jit(exp.model.apply)({"params": params}, jnp.asarray(tokens)))


def flat(params) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# --- hf: ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_hf_source_gives_its_logits(name, scan_layers):
  config, exp = experiment(
    synthetic_config(f"train.init_from=hf:{FIXTURES / name}", f"model.scan_layers={scan_layers}")
  )
  assert config.model.scan_layers is scan_layers  # The run's own, not the checkpoint's.
  params = init_from.initial_params(config, exp)
  for leaf, want in zip(
    jax.tree.leaves(params), jax.tree.leaves(exp.abstract_state.params), strict=True
  ):
    assert (leaf.shape, leaf.dtype, leaf.sharding) == (want.shape, want.dtype, want.sharding)
  model, reference = hf.load_pretrained(FIXTURES / name)
  tokens = np.load(FIXTURES / name / "reference.npz")["input_ids"]
  want = np.asarray(jax.jit(model.apply)({"params": reference}, jnp.asarray(tokens)))
  np.testing.assert_allclose(apply(exp, params, tokens), want, rtol=1e-5, atol=1e-5)


def test_resolve_config_takes_the_checkpoints_model(caplog):
  config = synthetic_config(
    f"train.init_from=hf:{FIXTURES / 'tiny_llama'}",
    "model.d_model=32",
    "model.dtype=bfloat16",
    "model.remat=True",
  )
  with caplog.at_level(logging.WARNING, logger="fulcrum"):
    resolved = init_from.resolve_config(config)
  assert config.model.d_model == 32  # The given config is left alone.
  m = resolved.model
  assert (m.arch, m.d_model, m.num_layers, m.num_kv_heads, m.vocab_size) == (
    "transformer",
    64,
    2,
    2,
    128,
  )
  assert (m.tie_embeddings, m.mlp_dim, m.norm_eps) == (False, 96, 1e-5)
  assert (m.dtype, m.remat) == ("bfloat16", True)  # How the run computes stays the run's.
  assert "d_model: 32 -> 64" in caplog.text
  fresh = synthetic_config()
  assert init_from.resolve_config(fresh) is fresh  # No source: nothing to resolve.


def test_an_hf_source_with_a_tokenizer_gives_the_run_its_tokenizer(tmp_path):
  folder = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "tiny_llama", folder)
  config = synthetic_config(f"train.init_from=hf:{folder}")
  assert init_from.resolve_config(config).data.tokenizer == "bytes"  # No tokenizer.json there.
  shutil.copy(REPO / "tests" / "fixtures" / "tokenizer" / "tokenizer.json", folder)
  assert init_from.resolve_config(config).data.tokenizer == f"hf:{folder}"
  config = synthetic_config(f"train.init_from=hf:{folder}", f"data.tokenizer=hf:{REPO}")
  assert init_from.resolve_config(config).data.tokenizer == f"hf:{REPO}"  # The run's choice.


def test_resolve_config_keeps_lora_keys():
  config = synthetic_config(f"train.init_from=hf:{FIXTURES / 'tiny_llama'}", "model.lora_rank=4")
  assert init_from.resolve_config(config).model.lora_rank == 4


def test_hf_source_with_lora_keeps_fresh_adapters():
  if "lora_rank" not in sections.model_defaults():
    pytest.skip("needs model.lora_rank")
  config, exp = experiment(
    synthetic_config(f"train.init_from=hf:{FIXTURES / 'tiny_llama'}", "model.lora_rank=4")
  )
  fresh = exp.init_state().params
  params = init_from.initial_params(config, exp, fresh)
  got, fresh_flat = flat(params), flat(fresh)
  adapters = [k for k in got if k.split("/")[-1].startswith("lora_")]
  assert adapters
  for key in adapters:
    np.testing.assert_array_equal(got[key], fresh_flat[key])
  # lora_b starts at zero, so the adapted model is the checkpoint's model.
  model, reference = hf.load_pretrained(FIXTURES / "tiny_llama")
  tokens = np.load(FIXTURES / "tiny_llama" / "reference.npz")["input_ids"]
  want = np.asarray(jax.jit(model.apply)({"params": reference}, jnp.asarray(tokens)))
  np.testing.assert_allclose(apply(exp, params, tokens), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="lora_"):
    init_from.initial_params(config, exp)  # Adapters need the fresh params.


def test_training_from_hf_starts_from_it_and_resumes_without_it(tmp_path):
  """The trainer's first step sees the checkpoint's params (param_norm is taken before the
  update); a resumed run reads its own checkpoint, so the source may be gone by then."""
  source = shutil.copytree(FIXTURES / "tiny_mamba", tmp_path / "source")
  _, reference = hf.load_pretrained(source)
  workdir = tmp_path / "run"
  overrides = [f"train.init_from=hf:{source}", "train.log_every=1", "train.eval_every=0"]
  train_lib.train(synthetic_config("train.steps=1", *overrides), workdir)
  rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
  norm = float(optax.tree.norm(reference))
  assert rows[0]["step"] == 1
  np.testing.assert_allclose(rows[0]["param_norm"], norm, rtol=1e-5)
  assert json.loads((workdir / "config.json").read_text())["model"]["arch"] == "mamba"
  shutil.rmtree(source)
  result = train_lib.train(synthetic_config("train.steps=2", *overrides), workdir)
  assert result["step"] == 2


def test_fresh_run_differs_from_the_source(tmp_path):
  """The check above can fail: without train.init_from the first step's norm is another."""
  _, reference = hf.load_pretrained(FIXTURES / "tiny_mamba")
  config = synthetic_config("train.steps=1", "train.log_every=1", "train.eval_every=0")
  config_lib.apply_overrides(config, ["model.arch=mamba", "model.d_model=64", "model.num_layers=2"])
  train_lib.train(config, tmp_path)
  row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert abs(row["param_norm"] - float(optax.tree.norm(reference))) > 1e-2


# --- workdir: ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_run(tiny_corpus, tmp_path_factory) -> Path:
  """A tiny byte-level run of 3 steps (checkpoints at 2 and 3)."""
  path = tmp_path_factory.mktemp("source")
  overrides = {"train.steps": 3, "train.checkpoint_every": 2, "train.eval_every": 0}
  return Path(train_recipe("demo", tiny_overrides(tiny_corpus, **overrides), path))


def byte_config(corpus, *overrides: str):
  config = recipes.get("demo")
  config_lib.apply_overrides(config, [*tiny_overrides(corpus), *overrides])
  return config


@pytest.mark.parametrize("scan_layers", [False, True])
def test_workdir_source_gives_its_newest_params(source_run, tiny_corpus, scan_layers):
  config, exp = experiment(
    byte_config(
      tiny_corpus,
      f"train.init_from=workdir:{source_run}",
      "model.d_model=64",  # Conflicts with the source's 32: the source's wins.
      f"model.scan_layers={scan_layers}",
    )
  )
  assert config.model.d_model == 32
  params = init_from.initial_params(config, exp)
  _, state, step = workdir_lib.load(source_run)
  assert step == 3
  want = state.params
  if scan_layers:  # Compare in the source's (unscanned) layout.
    got = jax.tree.map(np.asarray, jax.device_get(params))
    unscanned = {}
    for i in range(config.model.num_layers):
      unscanned[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], got["blocks"]["block"])
    params = {**{k: v for k, v in got.items() if k != "blocks"}, **unscanned}
  got, want = flat(params), flat(want)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for leaf, abstract in zip(
    jax.tree.leaves(init_from.initial_params(config, exp)),
    jax.tree.leaves(exp.abstract_state.params),
    strict=True,
  ):
    assert leaf.sharding == abstract.sharding


def test_training_from_workdir_restarts_the_optimizer(source_run, tiny_corpus, tmp_path):
  config = byte_config(
    tiny_corpus,
    f"train.init_from=workdir:{source_run}",
    "train.steps=1",
    "train.log_every=1",
    "train.eval_every=0",
  )
  train_lib.train(config, tmp_path)
  _, state, _ = workdir_lib.load(source_run)
  row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  np.testing.assert_allclose(row["param_norm"], float(optax.tree.norm(state.params)), rtol=1e-5)
  _, new_state, step = workdir_lib.load(tmp_path)
  assert step == 1 and int(new_state.step) == 1  # The new run counts its own steps.


def test_workdir_source_of_another_shape(source_run, tiny_corpus):
  """An experiment that does not fit the source (config not resolved from it)."""
  config = byte_config(tiny_corpus, f"train.init_from=workdir:{source_run}", "model.d_model=64")
  exp = build_experiment(config)
  with pytest.raises(UserError, match=r"param \S+ is float32\[.*\] in .* but float32\[.*64"):
    init_from.initial_params(config, exp)
  config = byte_config(tiny_corpus, f"train.init_from=workdir:{source_run}", "model.num_layers=3")
  with pytest.raises(UserError, match="param blocks_2/.* is not in"):
    init_from.initial_params(config, build_experiment(config))


SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from fulcrum import recipes
from fulcrum.platform import config as config_lib, sections
from fulcrum.platform.training import init_from
from fulcrum.platform.training.experiment import build_experiment
recipe, overrides, tokens = json.loads(sys.argv[1])
out = {}
for scan in (False, True):
  config = recipes.get(recipe)
  config_lib.apply_overrides(config, [*overrides, f"model.scan_layers={scan}"])
  config = init_from.resolve_config(config)
  sections.validate(config)
  exp = build_experiment(config)
  params = init_from.initial_params(config, exp)
  with exp.activate():
    logits = jax.jit(exp.model.apply)({"params": params}, jnp.asarray(tokens))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)})
  out[str(scan)] = {"logits": np.asarray(logits).tolist(), "specs": specs}
print(json.dumps(out))
"""


def sharded_logits(recipe: str, overrides: list[str], tokens: np.ndarray) -> dict:
  """SHARDED_SCRIPT on 8 CPU devices: the logits of the placed params, scanned and not."""
  env = {
    **os.environ,
    **UNOPTIMISED_ENV,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  args = json.dumps([recipe, overrides, tokens.tolist()])
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_SCRIPT, args],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_sources_placed_on_a_sharded_mesh(source_run, tiny_corpus):
  """Both sources on 8 devices (data 2 x fsdp 2 x tensor 2; a workdir of 1 kv head: data 2 x
  fsdp 4) give the source's logits, in shardings that really split the params."""
  tokens = np.arange(4 * 16).reshape(4, 16) % 18
  name = "tiny_llama"
  mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  out = sharded_logits(HF_RECIPE, [f"train.init_from=hf:{FIXTURES / name}", *mesh], tokens)
  model, reference = hf.load_pretrained(FIXTURES / name)
  want = np.asarray(jax.jit(model.apply)({"params": reference}, jnp.asarray(tokens)))
  for got in out.values():
    assert any("'fsdp', 'tensor'" in spec for spec in got["specs"])
    np.testing.assert_allclose(np.asarray(got["logits"]), want, rtol=1e-5, atol=1e-5)

  mesh = ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"]
  overrides = [*tiny_overrides(tiny_corpus), f"train.init_from=workdir:{source_run}", *mesh]
  out = sharded_logits("demo", overrides, tokens)
  exp, state, _ = workdir_lib.load(source_run)
  want = apply(exp, state.params, tokens)
  for got in out.values():
    assert any("fsdp" in spec for spec in got["specs"])
    np.testing.assert_allclose(np.asarray(got["logits"]), want, rtol=1e-5, atol=1e-5)


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tests/fixtures/hf/tiny_llama", "hub:x", "hf:", "workdir: "])
def test_malformed_init_from(spec):
  config = synthetic_config()
  with config.unlocked():
    config.train.init_from = spec
  with pytest.raises(UserError, match="train.init_from=.* must be hf:FOLDER .*workdir:DIR"):
    init_from.resolve_config(config)
  with pytest.raises(UserError, match="train.init_from"):
    sections.validate(config)


def test_missing_or_unusable_sources(tmp_path, source_run):
  def resolve(spec):
    return init_from.resolve_config(synthetic_config(f"train.init_from={spec}"))

  with pytest.raises(UserError, match="does not exist; pass a local Hugging Face checkpoint"):
    resolve(f"hf:{tmp_path / 'nowhere'}")
  with pytest.raises(UserError, match="has no config.json"):
    resolve(f"workdir:{tmp_path / 'nowhere'}")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(source_run / "config.json", untrained / "config.json")
  with pytest.raises(UserError, match="no checkpoint"):
    resolve(f"workdir:{untrained}")
  (untrained / "checkpoints").mkdir()
  with pytest.raises(UserError, match="holds no checkpoint; train it first"):
    resolve(f"workdir:{untrained}")


def test_hf_checkpoint_of_another_shape(tmp_path):
  """Weights that do not fit the run's model: the first array is named."""
  config, exp = experiment(synthetic_config(f"train.init_from=hf:{FIXTURES / 'tiny_llama'}"))
  other = shutil.copytree(FIXTURES / "tiny_mistral", tmp_path / "mistral")
  with config.unlocked():
    config.train.init_from = f"hf:{other}"
  with pytest.raises(UserError, match="tensor 'model.embed_tokens.weight'|param .* shape"):
    init_from.initial_params(config, exp)
