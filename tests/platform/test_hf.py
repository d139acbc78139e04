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
from fulcrum.platform import hf
from fulcrum.platform.errors import UserError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
NAMES = ["tiny_llama", "tiny_mistral"]


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
  """A prompt chunk (longer than the Mistral window when 11), then one token at a time."""
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
  np.testing.assert_allclose(
    np.concatenate(chunks, axis=1), logits(model, params, tokens), rtol=1e-5, atol=1e-5
  )


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
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
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
    ("gpt2", ["'gpt2'", "llama, mistral"]),
    ("no model_type", ["no model_type", "llama, mistral"]),
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
