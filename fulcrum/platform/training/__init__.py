"""Training: the trainer loop, checkpoints, sharding, metrics files and the tasks it trains.

`fulcrum.platform.train` is `trainer.train`; this package's `__init__` imports nothing, so its
leaf modules (e.g. `train_config`) can be imported without the trainer.
"""
