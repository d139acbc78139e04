"""Everything that runs modules: config, data, training, optimizers, decoding, attribution, HF.

`fulcrum.platform.train(config, workdir)` is the trainer's entry point
(`fulcrum.platform.training.trainer.train`). It is imported on first use, so that importing a
light module of this package (the config machinery, errors) does not import the trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
  if name == "train":
    from fulcrum.platform.training.trainer import train

    return train
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
