"""Text generation from a trained LM with its cache."""

from fulcrum.platform.decode.generate import generate

__all__ = ["generate"]
