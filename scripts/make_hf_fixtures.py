"""Builds the tiny Hugging Face checkpoints that `tests/platform/test_hf.py` loads.

Run once by a developer, in a separate environment that has torch and transformers (Fulcrum's
own environment never needs them), from the repository root:

  python3 -m venv /tmp/fixenv
  /tmp/fixenv/bin/pip install torch transformers numpy
  /tmp/fixenv/bin/python scripts/make_hf_fixtures.py

It writes, for each fixture NAME, `tests/fixtures/hf/NAME/`: the checkpoint exactly as
`model.save_pretrained` writes it (config.json + safetensors) and `reference.npz` with
`input_ids` [2, 24] and HF's float32 `logits` [2, 24, vocab] (eval mode, eager attention), plus
the `transformers_version` that produced them. Everything is seeded, so a rerun with the same
torch/transformers versions reproduces the files. The committed fixtures were made with
torch 2.13.0 (CPU) and transformers 5.24.0.

Fixtures (each folder stays under 200 KB, so weights are stored in 16-bit floats; the reference
logits are computed in float32 from the already-rounded weights, so loading them back in
float32 must reproduce the logits to float32 accuracy):

  tiny_llama    LlamaForCausalLM, 2 layers, 4 heads / 2 kv heads (GQA), untied lm_head,
                rope_theta 1e4, rms_norm_eps 1e-5, bf16 weights in one model.safetensors.
  tiny_mistral  MistralForCausalLM, 2 layers, 4 heads / 1 kv head (MQA), head_dim 24 (not
                hidden/heads), sliding_window 8 < the 24-token input, tied embeddings,
                rope_theta 1e6, f16 weights sharded over several files with an index.

HF's default init (std 0.02) gives near-uniform logits that would hide mistakes, so weights are
redrawn at unit scale (norm scales around 1, q/k larger so attention is peaked).
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
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

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
}


def redraw_weights(model: torch.nn.Module, storage: torch.dtype, seed: int) -> None:
  """Unit-scale random weights, rounded to the storage dtype (kept in float32)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        value = 1.0 + 0.2 * noise
      elif "embed_tokens" in name:  # Also the output layer when tied: keep logits O(10).
        value = 0.25 * noise
      else:  # torch Linear weight [out, in].
        gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
        value = noise * gain / math.sqrt(p.shape[1])
      p.copy_(value.to(storage).to(torch.float32))


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
  redraw_weights(model, spec["storage"], seed)
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(0, config.vocab_size, size=(BATCH, LENGTH), dtype=np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(input_ids)).logits.to(torch.float32).numpy()

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
  args = parser.parse_args()
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  for i, (name, spec) in enumerate(FIXTURES.items()):
    make(name, spec, args.seed + i)


if __name__ == "__main__":
  main()
