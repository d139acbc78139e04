"""Flax linen modules: pure functions of (params, inputs). Never imports fulcrum.platform."""

from fulcrum.modules.attention import Attention, AttentionImpl, KVCache
from fulcrum.modules.config import ModelConfig
from fulcrum.modules.lm import LM, build

__all__ = ["LM", "Attention", "AttentionImpl", "KVCache", "ModelConfig", "build"]
