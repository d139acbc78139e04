"""LM agents and their environments."""
