"""Everything that runs modules: config, data, training, optimizers, decoding, attribution, HF.

`fulcrum.platform.train(config, workdir)` is the trainer's entry point (`launch.train`: the
trainer, or SPIN's driver for a SPIN recipe). It is imported on first use, so that importing a
light module of this package (the config machinery, errors) does not import the trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
  if name == "train":
    from fulcrum.platform.launch import train

    return train
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
