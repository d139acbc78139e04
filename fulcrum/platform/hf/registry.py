"""The supported Hugging Face `model_type`s: the one list, assembled from the family modules.

A new architecture is a new family module (a `Converter`) and one entry here; the loader and
exporter in `pretrained` do not change.
"""

from __future__ import annotations

from fulcrum.platform.hf.convert import Converter
from fulcrum.platform.hf.convert_llama import LLAMA, MISTRAL, export_model_type
from fulcrum.platform.hf.convert_mamba import MAMBA
from fulcrum.platform.hf.convert_recurrent_gemma import RECURRENT_GEMMA

__all__ = ["CONVERTERS", "export_model_type"]

# config.json's model_type → its converter. Only Llama and Mistral export (`export_model_type`).
CONVERTERS: dict[str, Converter] = {
  "llama": LLAMA,
  "mistral": MISTRAL,
  "mamba": MAMBA,
  "recurrent_gemma": RECURRENT_GEMMA,
}
