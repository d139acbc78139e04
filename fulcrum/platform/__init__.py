"""Everything that runs modules: config, data, trainer, checkpoints, sharding, decoding.

`fulcrum.platform.train(config, workdir)` is the trainer's entry point; it lives in
`fulcrum.platform.trainer` so that the function name never collides with a submodule name.
"""

from fulcrum.platform.trainer import train

__all__ = ["train"]
