"""Builds the tiny Hugging Face checkpoints that `tests/platform/hf/test_hf.py` loads.

Run once by a developer, in a separate environment that has torch and transformers (Fulcrum's
own environment never needs them), from the repository root:

  python3 -m venv /tmp/fixenv
  /tmp/fixenv/bin/pip install torch transformers numpy
  /tmp/fixenv/bin/python scripts/make_hf_fixtures.py [--only NAME ...]

It writes, for each fixture NAME (all, or those named by --only), `tests/fixtures/hf/NAME/`: the
checkpoint exactly as `model.save_pretrained` writes it (config.json + safetensors) and
`reference.npz` with `input_ids` [2, 24] and HF's float32 `logits` [2, 24, vocab] (eval mode,
eager attention), plus the `transformers_version` that produced them. Everything is seeded, so
a rerun with the same torch/transformers versions reproduces the files. The committed fixtures
were made with torch 2.13.0 (CPU) and transformers 5.24.0.

Fixtures (each folder stays under 200 KB, so weights are stored in 16-bit floats; the reference
logits are computed in float32 from the already-rounded weights, so loading them back in
float32 must reproduce the logits to float32 accuracy):

  tiny_llama    LlamaForCausalLM, 2 layers, 4 heads / 2 kv heads (GQA), untied lm_head,
                rope_theta 1e4, rms_norm_eps 1e-5, bf16 weights in one model.safetensors.
  tiny_mistral  MistralForCausalLM, 2 layers, 4 heads / 1 kv head (MQA), head_dim 24 (not
                hidden/heads), sliding_window 8 < the 24-token input, tied embeddings,
                rope_theta 1e6, f16 weights sharded over several files with an index.
  tiny_mamba    MambaForCausalLM, 2 layers, hidden 64, state 16, expand 2, conv 4,
                time_step_rank "auto" (4), tied embeddings, bf16 weights.
  tiny_recurrent_gemma
                RecurrentGemmaForCausalLM, 3 layers (recurrent, recurrent, attention), hidden 64,
                lru_width 64, 4 heads / 1 kv head (head_dim 16, RoPE on half of it),
                attention_window_size 8 < the 24-token input, MLP 96 // 2, logits_soft_cap 15,
                tied embeddings, f16 weights.

HF's default init (std 0.02) gives near-uniform logits that would hide mistakes, so weights are
redrawn at unit scale (norm scales around 1, q/k larger so attention is peaked, biases and conv
taps non-zero). The parameters that set the recurrences' decay (Mamba's A_log, D and dt_proj
bias, the RG-LRU's recurrent_param) keep HF's init plus a little noise, so the recurrences stay
in their usual regime. Each fixture's seed is --seed plus its index in FIXTURES, so --only
regenerates a fixture exactly as a full run would.
"""

from __future__ import annotations

import argparse
import inspect
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
  AutoModelForCausalLM,
  LlamaConfig,
  MambaConfig,
  MistralConfig,
  RecurrentGemmaConfig,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "hf"
BATCH, LENGTH = 2, 24

FIXTURES = {
  "tiny_llama": dict(
    config=lambda: LlamaConfig(
      vocab_size=128,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      intermediate_size=96,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      max_position_embeddings=256,
      hidden_act="silu",
    ),
    storage=torch.bfloat16,
    max_shard_size=None,
  ),
  "tiny_mistral": dict(
    config=lambda: MistralConfig(
      vocab_size=128,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=24,
      intermediate_size=96,
      rms_norm_eps=1e-6,
      rope_theta=1e6,
      sliding_window=8,
      tie_word_embeddings=True,
      max_position_embeddings=256,
      hidden_act="silu",
    ),
    storage=torch.float16,
    max_shard_size="64KB",
  ),
  "tiny_mamba": dict(
    config=lambda: MambaConfig(
      vocab_size=128,
      hidden_size=64,
      num_hidden_layers=2,
      state_size=16,
      expand=2,
      conv_kernel=4,
      time_step_rank="auto",
      layer_norm_epsilon=1e-5,
      tie_word_embeddings=True,
    ),
    storage=torch.bfloat16,
    max_shard_size=None,
    redraw="mamba",
  ),
  "tiny_recurrent_gemma": dict(
    config=lambda: RecurrentGemmaConfig(
      vocab_size=128,
      hidden_size=64,
      num_hidden_layers=3,
      block_types=["recurrent", "recurrent", "attention"],
      num_attention_heads=4,
      num_key_value_heads=1,
      lru_width=64,
      intermediate_size=96,
      conv1d_width=4,
      attention_window_size=8,
      logits_soft_cap=15.0,
      rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
      tie_word_embeddings=True,
      hidden_activation="gelu_pytorch_tanh",
    ),
    storage=torch.float16,
    max_shard_size=None,
    redraw="recurrent_gemma",
  ),
}


def llama_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
  """Llama/Mistral: norm scales around 1, q/k larger so attention is peaked."""
  if name.endswith("norm.weight"):
    return 1.0 + 0.2 * noise
  if "embed_tokens" in name:  # Also the output layer when tied: keep logits O(10).
    return 0.25 * noise
  gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
  return noise * gain / math.sqrt(p.shape[1])  # torch Linear weight [out, in].


def mamba_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
  """Mamba: A_log, D and the dt bias stay near HF's init."""
  if name.endswith(("norm.weight", "norm_f.weight")):
    return 1.0 + 0.2 * noise
  if "embeddings" in name:  # Also the (tied) output layer.
    return 0.25 * noise
  if name.endswith(("A_log", "dt_proj.bias")):  # log(1..N); softplus⁻¹(dt), dt ~ 1e-3..0.1.
    return p.float() + 0.1 * noise
  if name.endswith(".D"):
    return 1.0 + 0.2 * noise
  if name.endswith("conv1d.weight"):  # [f, 1, w]
    return noise / math.sqrt(p.shape[-1])
  if name.endswith("conv1d.bias"):
    return 0.2 * noise
  return noise / math.sqrt(p.shape[1])  # Linear [out, in]: in_proj, x_proj, dt_proj, out_proj.


def recurrent_gemma_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
  """RecurrentGemma: norms scale by 1 + w; recurrent_param stays near HF's init."""
  if name.endswith("norm.weight"):
    return 0.2 * noise
  if "embed_tokens" in name:  # Scaled by sqrt(64) = 8 on input; the tied output layer.
    return 0.25 * noise
  if name.endswith("recurrent_param"):  # softplus of it = -log a, a in [0.9, 0.999].
    return p.float() + 0.1 * noise
  if name.endswith(("gate_weight", "conv_1d.weight")):  # [heads, i, i] and [f, 1, w].
    return noise / math.sqrt(p.shape[-1])
  if name.endswith("bias"):
    return 0.2 * noise
  gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
  return noise * gain / math.sqrt(p.shape[1])  # torch Linear weight [out, in].


REDRAW = {"mamba": mamba_value, "recurrent_gemma": recurrent_gemma_value}


def redraw_weights(model: torch.nn.Module, value_fn, storage: torch.dtype, seed: int) -> None:
  """Seeded unit-scale weights by `value_fn(name, param, noise)`, rounded to `storage`."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(value_fn(name, p, noise).to(storage).to(torch.float32))


def save(model: torch.nn.Module, folder: Path, max_shard_size: str | None) -> None:
  kwargs = {}
  params = inspect.signature(model.save_pretrained).parameters
  if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors.
    kwargs["safe_serialization"] = True
  if max_shard_size:
    kwargs["max_shard_size"] = max_shard_size
  model.save_pretrained(folder, **kwargs)


def make(name: str, spec: dict, seed: int) -> None:
  folder = OUT / name
  shutil.rmtree(folder, ignore_errors=True)
  torch.manual_seed(seed)
  config = spec["config"]()
  model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model = model.to(torch.float32).eval()
  redraw_weights(model, REDRAW.get(spec.get("redraw"), llama_value), spec["storage"], seed)
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(0, config.vocab_size, size=(BATCH, LENGTH), dtype=np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(input_ids)).logits.to(torch.float32).numpy()
    if "redraw" in spec:  # The stateful models: their cache-free forward must agree.
      uncached = model(torch.from_numpy(input_ids), use_cache=False).logits.numpy()
      assert np.abs(uncached - logits).max() < 1e-5, f"{name}: use_cache changes the logits"

  save(model.to(spec["storage"]), folder, spec["max_shard_size"])
  np.savez(
    folder / "reference.npz",
    input_ids=input_ids.astype(np.int32),
    logits=logits,
    transformers_version=np.array(transformers.__version__),
  )

  # The saved files must reproduce the logits when HF itself reloads them.
  again = AutoModelForCausalLM.from_pretrained(
    folder, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    reloaded = again(torch.from_numpy(input_ids)).logits.numpy()
  err = float(np.abs(reloaded - logits).max())
  assert err == 0.0, f"{name}: reloaded logits differ by {err}"
  size = sum(f.stat().st_size for f in folder.iterdir())
  files = ", ".join(sorted(f.name for f in folder.iterdir()))
  print(f"{name}: {size / 1024:.1f} KB ({files}); |logits| max {np.abs(logits).max():.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--only", nargs="+", choices=list(FIXTURES), help="fixtures to write (default: all)"
  )
  args = parser.parse_args()
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  for i, (name, spec) in enumerate(FIXTURES.items()):
    if args.only is None or name in args.only:
      make(name, spec, args.seed + i)


if __name__ == "__main__":
  main()
