"""Import and export of Hugging Face checkpoints: a config.json plus safetensors weights.

`load_pretrained(folder)` turns a local Hugging Face checkpoint folder (Llama, Mistral, Mamba or
RecurrentGemma) into a Fulcrum model and plain float32 params; `save_pretrained(model, params,
folder)` writes a Fulcrum transformer back out in the Hugging Face Llama (or, with a sliding
window, Mistral) format. Mamba and RecurrentGemma (Griffin/Hawk) are import only.

The folder, read in this order:

  convert.py                  the vocabulary: `Layout`s, `Rule`, `Converter`, config.json helpers
  convert_llama.py            Llama and Mistral (import and export)
  convert_mamba.py            Mamba (import)
  convert_recurrent_gemma.py  RecurrentGemma: Griffin or Hawk (import)
  registry.py                 `CONVERTERS`: model_type → converter, the one list
  pretrained.py               `load_pretrained` / `save_pretrained`, the same for every family
  safetensors_io.py           safetensors read and written with numpy alone, memory-mapped

A new architecture is a new family module and one `CONVERTERS` entry; the loader does not change.
"""

from fulcrum.platform.hf.pretrained import load_pretrained, save_pretrained
from fulcrum.platform.hf.registry import CONVERTERS, export_model_type
from fulcrum.platform.hf.safetensors_io import (
  SAFETENSORS_DTYPES,
  SafetensorsFile,
  open_checkpoint,
  read_safetensors,
  write_safetensors,
)

__all__ = [
  "CONVERTERS",
  "SAFETENSORS_DTYPES",
  "SafetensorsFile",
  "export_model_type",
  "load_pretrained",
  "open_checkpoint",
  "read_safetensors",
  "save_pretrained",
  "write_safetensors",
]
