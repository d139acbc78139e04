"""Fulcrum: a JAX research platform — SSMs, hybrids and transformers on one trainer."""

__version__ = "0.1.0"
