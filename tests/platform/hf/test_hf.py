"""Hugging Face import/export against logits computed by transformers itself.

The fixtures in tests/fixtures/hf/ were written by scripts/make_hf_fixtures.py (torch +
transformers, run once); these tests need neither.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import LM, ModelConfig, build
from fulcrum.modules.layers import Embedder
from fulcrum.platform import hf
from fulcrum.platform.errors import UserError

# Small models and many short programs: XLA's optimisation passes would dominate the runtime.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"
NAMES = ["tiny_llama", "tiny_mistral", "tiny_mamba", "tiny_recurrent_gemma"]


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
  ref = np.load(FIXTURES / name / "reference.npz")
  return ref["input_ids"], ref["logits"]


def logits(model: LM, params, tokens) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))


def flat(params) -> dict:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[LM, dict]]:
  return {name: hf.load_pretrained(FIXTURES / name) for name in NAMES}


# --- import ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(loaded, name):
  model, params = loaded[name]
  tokens, want = reference(name)
  got = logits(model, params, tokens)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_configs_are_mapped(loaded):
  llama, mistral = loaded["tiny_llama"][0].config, loaded["tiny_mistral"][0].config
  assert (llama.num_kv_heads, llama.per_head_dim, llama.window, llama.tie_embeddings) == (
    2,
    16,
    0,
    False,
  )
  assert (llama.norm_eps, llama.rope_theta, llama.hidden_dim) == (1e-5, 1e4, 96)
  assert (mistral.num_kv_heads, mistral.per_head_dim, mistral.window) == (1, 24, 8)
  assert (mistral.tie_embeddings, mistral.rope_theta, mistral.norm_eps) == (True, 1e6, 1e-6)


def test_fixture_exercises_sliding_window(loaded):
  """Without its window the Mistral fixture's logits are far off: the window is really tested."""
  model, params = loaded["tiny_mistral"]
  tokens, want = reference("tiny_mistral")
  full = build(dataclasses.replace(model.config, window=0))
  assert np.abs(logits(full, params, tokens) - want).max() > 0.1


def test_mamba_and_recurrent_gemma_configs_are_mapped(loaded):
  mamba, rg = loaded["tiny_mamba"][0].config, loaded["tiny_recurrent_gemma"][0].config
  assert (mamba.arch, mamba.num_layers, mamba.d_model, mamba.vocab_size) == ("mamba", 2, 64, 128)
  assert (mamba.ssm_state, mamba.ssm_expand, mamba.conv_width, mamba.ssm_dt_rank) == (16, 2, 4, 4)
  assert (mamba.norm_eps, mamba.tie_embeddings, mamba.scan_layers) == (1e-5, True, False)
  assert (rg.arch, rg.num_layers, rg.d_model, rg.lru_width, rg.conv_width) == (
    "griffin",
    3,
    64,
    64,
    4,
  )
  assert (rg.num_heads, rg.num_kv_heads, rg.per_head_dim, rg.mlp_dim, rg.window) == (
    4,
    1,
    16,
    48,
    8,
  )
  assert (rg.rope_theta, rg.rope_fraction, rg.attn_out_bias, rg.logits_soft_cap) == (
    1e4,
    0.5,
    True,
    15.0,
  )
  assert (rg.scale_embeddings, rg.embed_scale_bf16, rg.tie_embeddings, rg.norm_eps) == (
    True,
    True,
    True,
    1e-6,
  )


def rg_config(**changes) -> dict:
  """The tiny RecurrentGemma config.json with `changes` (... removes a key)."""
  config = json.loads((FIXTURES / "tiny_recurrent_gemma" / "config.json").read_text())
  config.update(changes)
  return {k: v for k, v in config.items() if v is not ...}


@pytest.mark.parametrize(
  "block_types,num_layers,arch",
  [
    (["recurrent", "recurrent", "attention"], 7, "griffin"),
    (["recurrent", "recurrent", "attention"] * 2, 6, "griffin"),
    (["recurrent", "recurrent", "attention"], 2, "hawk"),  # Layers 0 and 1 only: no attention.
    (["recurrent"], 5, "hawk"),
    (..., 3, "griffin"),  # RecurrentGemmaConfig's default.
  ],
)
def test_recurrent_gemma_block_types(block_types, num_layers, arch):
  config = rg_config(block_types=block_types, num_hidden_layers=num_layers)
  assert hf.CONVERTERS["recurrent_gemma"].to_config(config)["arch"] == arch


def test_recurrent_gemma_transformers_4_config_keys(loaded):
  """transformers 4.x wrote rope_theta and partial_rotary_factor at the top level (or no factor:
  RecurrentGemma's default is 0.5); a config.json without head_dim derives it."""
  want = hf.CONVERTERS["recurrent_gemma"].to_config(rg_config())
  for extra in ({"partial_rotary_factor": 0.5}, {}):
    config = rg_config(rope_parameters=..., head_dim=..., rope_theta=1e4, **extra)
    assert hf.CONVERTERS["recurrent_gemma"].to_config(config) == want
  config = rg_config(rope_parameters=..., rope_theta=500.0, partial_rotary_factor=0.25)
  got = hf.CONVERTERS["recurrent_gemma"].to_config(config)
  assert (got["rope_theta"], got["rope_fraction"]) == (500.0, 0.25)


def test_recurrent_gemma_fixture_exercises_its_conventions(loaded):
  """Each RecurrentGemma convention matters on the fixture: getting it wrong is far off.

  The window is transformers' (a query sees `attention_window_size` keys, itself included), not
  DeepMind's (one more); RoPE rotates half of each head; logits are soft-capped; the final norm
  scales by 1 + w.
  """
  model, params = loaded["tiny_recurrent_gemma"]
  tokens, want = reference("tiny_recurrent_gemma")
  for changes in [
    dict(window=9),  # DeepMind's convention for window_size 8.
    dict(window=7),
    dict(window=0),
    dict(rope_fraction=1.0),
    dict(logits_soft_cap=0.0),
  ]:
    wrong = build(dataclasses.replace(model.config, **changes))
    assert np.abs(logits(wrong, params, tokens) - want).max() > 0.5, changes
  plain_final_norm = {**params, "final_norm": {"scale": params["final_norm"]["scale"] - 1}}
  assert np.abs(logits(model, plain_final_norm, tokens) - want).max() > 0.5
  assert np.abs(want).max() > 10  # The cap (15) bends the largest logits ...
  assert np.abs(want).std() < 5  # ... without flattening them all.


def test_mamba_fixture_exercises_the_conv_tap_order(loaded):
  model, params = loaded["tiny_mamba"]
  tokens, want = reference("tiny_mamba")
  mixer = params["blocks_0"]["mixer"]
  conv = {**mixer["conv1d"], "kernel": mixer["conv1d"]["kernel"][::-1]}
  flipped = {**params, "blocks_0": {**params["blocks_0"], "mixer": {**mixer, "conv1d": conv}}}
  assert np.abs(logits(model, flipped, tokens) - want).max() > 0.5


def test_embedding_scale_is_rounded_to_bfloat16_like_recurrent_gemma():
  """transformers (and DeepMind) scale by a bfloat16 sqrt(hidden_size): 9.8125 for 96."""
  table = np.random.default_rng(0).normal(size=(4, 96)).astype(np.float32)
  tokens = jnp.arange(4)[None]
  for bf16, scale in [(True, 9.8125), (False, np.float32(np.sqrt(96)))]:
    embedder = Embedder(4, 96, scale_by_sqrt_dim=True, scale_in_bf16=bf16)
    got = embedder.apply({"params": {"embedding": table}}, tokens)
    np.testing.assert_array_equal(got[0], table * np.float32(scale))


@pytest.mark.parametrize("name", NAMES)
def test_params_are_plain_float32_in_the_init_tree(loaded, name):
  model, params = loaded[name]
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  init = nn.unbox(init["params"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True):
    assert type(p) is np.ndarray and p.dtype == np.float32 and p.shape == q.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prefill", [1, 11])
def test_decoding_with_cache_reproduces_full_pass(loaded, name, prefill):
  """A prompt chunk (longer than the Mistral and RecurrentGemma windows when 11), then one
  token at a time; Mamba and the RG-LRU carry their recurrent and conv states over."""
  model, params = loaded[name]
  tokens, _ = reference(name)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cache = model.init_cache(b, t)
  step = jax.jit(lambda x, pos, c: model.apply({"params": params}, x, pos, c, method=LM.decode))
  chunks, start = [], 0
  for end in [prefill, *range(prefill + 1, t + 1)]:
    out, cache = step(tokens[:, start:end], positions[:, start:end], cache)
    chunks.append(np.asarray(out))
    start = end
  decoded = np.concatenate(chunks, axis=1)
  np.testing.assert_allclose(decoded, logits(model, params, tokens), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(decoded, reference(name)[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_keeps_float32_params(name):
  model, params = hf.load_pretrained(str(FIXTURES / name), dtype="bfloat16")
  assert model.config.dtype == "bfloat16"
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  tokens, want = reference(name)
  got = logits(model, params, tokens)
  assert got.dtype == np.float32
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def copy_fixture(name: str, tmp_path: Path) -> Path:
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  return folder


def edit_config(folder: Path, **changes) -> None:
  config = json.loads((folder / "config.json").read_text())
  for key, value in changes.items():
    if value is ...:
      config.pop(key, None)
    else:
      config[key] = value
  (folder / "config.json").write_text(json.dumps(config))


def test_transformers_4_config_keys(loaded, tmp_path):
  """transformers 4.x writes rope_theta and rope_scaling instead of 5.x's rope_parameters."""
  folder = copy_fixture("tiny_mistral", tmp_path)
  edit_config(folder, rope_parameters=..., rope_theta=1e6, rope_scaling=None)
  model, params = hf.load_pretrained(folder)
  assert model.config == loaded["tiny_mistral"][0].config
  tokens, want = reference("tiny_mistral")
  np.testing.assert_allclose(logits(model, params, tokens), want, rtol=0, atol=1e-4)


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,model_type", [("tiny_llama", "llama"), ("tiny_mistral", "mistral")])
def test_save_load_round_trip_is_exact(loaded, tmp_path, name, model_type):
  model, params = loaded[name]
  out = hf.save_pretrained(model, params, tmp_path / "out")
  names = ["config.json", "generation_config.json", "model.safetensors"]
  assert sorted(p.name for p in out.iterdir()) == names
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == model_type and config["architectures"][0].startswith(
    model_type.capitalize()
  )
  assert hf.SafetensorsFile(out / "model.safetensors").metadata == {"format": "pt"}
  again, params2 = hf.load_pretrained(out)
  assert again.config == model.config
  assert flat(params2).keys() == flat(params).keys()
  for key, value in flat(params).items():
    np.testing.assert_array_equal(flat(params2)[key], value, err_msg=key)
  tokens, _ = reference(name)
  np.testing.assert_array_equal(logits(again, params2, tokens), logits(model, params, tokens))


def test_save_scanned_model_with_boxed_params(tmp_path):
  """A freshly initialised scan_layers model (boxed, stacked params) exports per layer."""
  config = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    window=5,
    scan_layers=True,
    tie_embeddings=False,
  )
  model = build(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  # Random values in the boxed tree `init` makes (a real init of a scanned model compiles slowly).
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) / 4, shapes)
  assert isinstance(variables["params"]["blocks"]["block"]["attn"]["q"]["kernel"], nn.Partitioned)
  hf.save_pretrained(model, variables, tmp_path)
  again, params = hf.load_pretrained(tmp_path)
  assert not again.config.scan_layers and again.config.window == 5
  stacked = nn.unbox(variables["params"])["blocks"]["block"]
  for i in range(3):
    for key, value in flat(params[f"blocks_{i}"]).items():
      np.testing.assert_array_equal(value, flat(stacked)[key][i], err_msg=key)
  np.testing.assert_allclose(
    logits(again, params, tokens),
    np.asarray(jax.jit(model.apply)(variables, tokens)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_save_in_bfloat16_rounds_the_weights(loaded, tmp_path):
  model, params = loaded["tiny_llama"]  # Stored in bf16 by transformers: exact in bf16 again.
  hf.save_pretrained(model, params, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert hf.SafetensorsFile(tmp_path / "model.safetensors")["lm_head.weight"].dtype == np.dtype(
    ml_dtypes.bfloat16
  )
  _, params2 = hf.load_pretrained(tmp_path)
  for key, value in flat(params).items():
    np.testing.assert_array_equal(flat(params2)[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["tiny_mamba", "tiny_recurrent_gemma"])
def test_save_refuses_import_only_architectures(loaded, tmp_path, name):
  model, params = loaded[name]
  with pytest.raises(UserError, match=f"cannot export model.arch '{model.config.arch}'.*import"):
    hf.save_pretrained(model, params, tmp_path)
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  "changes",
  [
    dict(logits_soft_cap=30.0),
    dict(scale_embeddings=True),
    dict(rope_fraction=0.5),
    dict(attn_out_bias=True),
  ],
)
def test_save_refuses_transformer_options_llama_lacks(loaded, tmp_path, changes):
  model, params = loaded["tiny_llama"]
  ((key, value),) = changes.items()
  with pytest.raises(UserError, match=f"model.{key}={value!r}.*Llama"):
    hf.save_pretrained(build(dataclasses.replace(model.config, **changes)), params, tmp_path)
  assert not any(tmp_path.iterdir())


def test_save_rejects_params_of_another_model(loaded, tmp_path):
  model, _ = loaded["tiny_llama"]
  _, other = loaded["tiny_mistral"]
  with pytest.raises(UserError, match="blocks_0/attn/q/kernel"):
    hf.save_pretrained(model, other, tmp_path)


# --- safetensors -------------------------------------------------------------------------------


def memory_mapped(array: np.ndarray) -> bool:
  while array is not None and not isinstance(array, np.memmap):
    array = array.base
  return array is not None


@pytest.mark.parametrize(
  "dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.uint8, np.bool_]
)
def test_safetensors_round_trip(tmp_path, dtype):
  rng = np.random.default_rng(0)
  tensors = {
    "a.weight": rng.normal(size=(3, 5)) * 100,
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 4)),
    "z.vector": rng.normal(size=7),
  }
  tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
  tensors["mixed_f64"] = rng.normal(size=(2, 2))  # Another item size in the same file.
  hf.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
  raw = (tmp_path / "x.safetensors").read_bytes()
  assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0
  got = hf.read_safetensors(tmp_path / "x.safetensors")
  assert got.keys() == tensors.keys()
  for key, value in tensors.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value)
    assert memory_mapped(got[key]), key


def test_reads_files_written_by_the_safetensors_library():
  shard = hf.SafetensorsFile(FIXTURES / "tiny_mistral" / "model-00001-of-00003.safetensors")
  assert shard.metadata == {"format": "pt"}
  assert all(shard[k].dtype == np.float16 for k in shard)
  single = hf.read_safetensors(FIXTURES / "tiny_llama" / "model.safetensors")
  assert single["lm_head.weight"].shape == (128, 64)
  assert single["lm_head.weight"].dtype == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize(
  "content,why",
  [
    (b"\x01\x02", "shorter than"),
    ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
    ((4).to_bytes(8, "little") + b"nope", "not JSON"),
    (b"", "shorter than"),
  ],
)
def test_corrupt_safetensors_is_a_user_error(tmp_path, content, why):
  (tmp_path / "bad.safetensors").write_bytes(content)
  with pytest.raises(UserError, match=why):
    hf.SafetensorsFile(tmp_path / "bad.safetensors")


def test_safetensors_header_lies_are_user_errors(tmp_path):
  header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
  (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"0" * 12)
  with pytest.raises(UserError, match="12 bytes for shape"):
    hf.SafetensorsFile(tmp_path / "bad.safetensors")


# --- bad input -----------------------------------------------------------------------------------


def rewrite_weights(folder: Path, edit) -> None:
  """Rewrites model.safetensors after `edit(tensors)` changes the dict of arrays in place."""
  tensors = {k: np.array(v) for k, v in hf.read_safetensors(folder / "model.safetensors").items()}
  edit(tensors)
  hf.write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


def _break(case: str, folder: Path) -> Path:
  """Damages a copy of tiny_llama (or tiny_mistral for shard cases) as `case` says."""
  if case == "missing":
    return folder / "nowhere"
  if case == "a file":
    return folder / "config.json"
  if case == "no config":
    (folder / "config.json").unlink()
  elif case == "bad json":
    (folder / "config.json").write_text("{not json")
  elif case == "pickle only":
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
  elif case == "no weights":
    (folder / "model.safetensors").unlink()
  elif case == "gpt2":
    edit_config(folder, model_type="gpt2")
  elif case == "no model_type":
    edit_config(folder, model_type=...)
  elif case == "classifier":
    edit_config(folder, architectures=["LlamaForSequenceClassification"])
  elif case in ("attention_bias", "mlp_bias"):
    edit_config(folder, **{case: True})
  elif case == "hidden_act":
    edit_config(folder, hidden_act="gelu")
  elif case == "rope_scaling":
    edit_config(folder, rope_scaling={"rope_type": "llama3", "factor": 8.0})
  elif case == "rope_parameters":
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  elif case == "no hidden_size":
    edit_config(folder, hidden_size=...)
  elif case == "missing tensor":
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  elif case == "wrong shape":
    rewrite_weights(folder, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
  elif case == "unexpected tensor":
    bias = np.zeros(64, np.float32)
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": bias}))
  elif case == "int weights":
    rewrite_weights(folder, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  elif case == "untied without lm_head":
    edit_config(folder, tie_word_embeddings=False)
  elif case == "missing shard":
    (folder / "model-00002-of-00003.safetensors").unlink()
  return folder


MISTRAL_CASES = {"untied without lm_head", "missing shard"}


@pytest.mark.parametrize(
  "case,expected",
  [
    ("missing", ["does not exist", "checkpoint folder"]),
    ("a file", ["is a file, not a folder"]),
    ("no config", ["no config.json", "config.json + *.safetensors"]),
    ("bad json", ["not valid JSON"]),
    ("pickle only", ["pytorch_model.bin", "convert them to safetensors"]),
    ("no weights", ["no *.safetensors"]),
    ("gpt2", ["'gpt2'", "llama, mamba, mistral, recurrent_gemma"]),
    ("no model_type", ["no model_type", "llama, mamba, mistral, recurrent_gemma"]),
    ("classifier", ["LlamaForSequenceClassification", "LlamaForCausalLM"]),
    ("attention_bias", ["attention_bias=true", "attention_bias=false"]),
    ("mlp_bias", ["mlp_bias=true"]),
    ("hidden_act", ['hidden_act="gelu"', "silu"]),
    ("rope_scaling", ['rope_scaling.rope_type="llama3"', "RoPE"]),
    ("rope_parameters", ['rope_parameters.rope_type="yarn"']),
    ("no hidden_size", ["'hidden_size'"]),
    ("missing tensor", ["'model.layers.1.mlp.up_proj.weight'", "missing"]),
    ("wrong shape", ["'model.norm.weight'", "(63,)", "(64,)"]),
    ("unexpected tensor", ["'model.layers.0.self_attn.q_proj.bias'"]),
    ("int weights", ["'model.norm.weight'", "int32"]),
    ("untied without lm_head", ["'lm_head.weight'", "missing"]),
    ("missing shard", ["model-00002-of-00003.safetensors", "download"]),
  ],
)
def test_bad_checkpoints_raise_one_line_user_errors(tmp_path, case, expected):
  folder = copy_fixture("tiny_mistral" if case in MISTRAL_CASES else "tiny_llama", tmp_path)
  path = _break(case, folder)
  with pytest.raises(UserError) as info:
    hf.load_pretrained(path)
  message = str(info.value)
  assert "\n" not in message
  for text in expected:
    assert text in message, (text, message)


def test_bad_dtype_is_a_user_error():
  with pytest.raises(UserError, match="float32, bfloat16 or float16"):
    hf.load_pretrained(FIXTURES / "tiny_llama", dtype="int8")


@pytest.mark.parametrize(
  "name,changes,expected",
  [
    ("tiny_mamba", dict(use_conv_bias=False), ["use_conv_bias=false", "use_conv_bias=true"]),
    ("tiny_mamba", dict(use_bias=True), ["use_bias=true", "use_bias=false"]),
    ("tiny_mamba", dict(hidden_act="gelu"), ['hidden_act="gelu"', "silu"]),
    ("tiny_mamba", dict(time_step_rank="low"), ['time_step_rank="low"', '"auto"']),
    ("tiny_mamba", dict(intermediate_size=100), ["intermediate_size=100", "whole factor"]),
    ("tiny_mamba", dict(architectures=["MambaModel"]), ["MambaModel", "MambaForCausalLM"]),
    (
      "tiny_recurrent_gemma",
      dict(block_types=["recurrent", "attention"]),
      ['block_types=["recurrent", "attention"]', "(recurrent, recurrent, attention)"],
    ),
    (
      "tiny_recurrent_gemma",
      dict(block_types=["attention", "recurrent", "recurrent"]),
      ["block_types=", "from layer 0", "attention, recurrent, recurrent"],
    ),
    ("tiny_recurrent_gemma", dict(block_types=["mlp"]), ['block_types=["mlp"]']),
    ("tiny_recurrent_gemma", dict(attention_bias=True), ["attention_bias=true"]),
    ("tiny_recurrent_gemma", dict(hidden_activation="gelu"), ['hidden_activation="gelu"']),
    (
      "tiny_recurrent_gemma",
      dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.1875}),
      ["partial_rotary_factor=0.1875", "even"],
    ),
    (
      "tiny_recurrent_gemma",
      dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
      ['rope_parameters.rope_type="linear"', "RoPE"],
    ),
    ("tiny_recurrent_gemma", dict(logits_soft_cap=None), ["logits_soft_cap=null"]),
    ("tiny_recurrent_gemma", dict(lru_width=66), ["lru_width=66", "num_attention_heads=4"]),
    ("tiny_recurrent_gemma", dict(num_key_value_heads=3), ["num_key_value_heads=3"]),
  ],
)
def test_unsupported_mamba_and_recurrent_gemma_configs(tmp_path, name, changes, expected):
  folder = copy_fixture(name, tmp_path)
  edit_config(folder, **changes)
  with pytest.raises(UserError) as info:
    hf.load_pretrained(folder)
  message = str(info.value)
  assert "\n" not in message
  for text in expected:
    assert text in message, (text, message)


def test_all_recurrent_block_types_need_recurrent_weights(tmp_path):
  """block_types ["recurrent"] makes the fixture a Hawk, whose layer 2 weights are missing."""
  folder = copy_fixture("tiny_recurrent_gemma", tmp_path)
  edit_config(folder, block_types=["recurrent"])
  with pytest.raises(UserError, match="model.layers.2.temporal_block.*missing"):
    hf.load_pretrained(folder)
