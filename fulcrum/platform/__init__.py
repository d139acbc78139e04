"""Everything that runs modules: config, data, trainer, checkpoints, sharding, decoding.

`fulcrum.platform.train(config, workdir)` is the trainer's entry point. (Importing it here
also makes the name refer to the function rather than to the `train` submodule.)
"""

from fulcrum.platform.train import train

__all__ = ["train"]
