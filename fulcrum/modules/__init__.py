"""Flax linen modules: pure functions of (params, inputs). Never imports fulcrum.platform."""

from fulcrum.modules.attention import Attention, AttentionImpl, KVCache
from fulcrum.modules.config import ModelConfig
from fulcrum.modules.griffin import RecurrentResidualBlock
from fulcrum.modules.lm import LM, build
from fulcrum.modules.mamba import MambaBlock, MambaCache

__all__ = [
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
