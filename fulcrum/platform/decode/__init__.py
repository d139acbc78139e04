"""The decoding engine: one `generate()` for every architecture and strategy (greedy, sampling,
lookahead, speculative, Speculative Cascades), with optional KV-cache quantization (KVQuant)."""

from fulcrum.platform.decode.generate import STRATEGIES, Generation, generate
from fulcrum.platform.decode.sampling import Sampling

__all__ = ["STRATEGIES", "Generation", "Sampling", "generate"]
