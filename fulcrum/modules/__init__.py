"""Flax linen modules: pure functions of (params, inputs). Never imports fulcrum.platform."""

from fulcrum.modules.attention import Attention, AttentionImpl, KVCache
from fulcrum.modules.griffin import RecurrentResidualBlock
from fulcrum.modules.lm import LM
from fulcrum.modules.mamba import MambaBlock, MambaCache
from fulcrum.modules.model_config import ModelConfig
from fulcrum.modules.models import ARCHS, build

__all__ = [
  "ARCHS",
  "LM",
  "Attention",
  "AttentionImpl",
  "KVCache",
  "MambaBlock",
  "MambaCache",
  "ModelConfig",
  "RecurrentResidualBlock",
  "build",
]
