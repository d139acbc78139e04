"""Optimizers as optax transforms, built from the recipe's `optimizer.*` section."""

from fulcrum.platform.optim.factory import learning_rate_schedule, make_optimizer

__all__ = ["learning_rate_schedule", "make_optimizer"]
