"""SPIN: self-play fine-tuning (Chen et al. 2024) with generation from the live parameters.

  loss.py     the SPIN objective (logistic / hinge) and sequence log-probabilities
  spin_config.py  the `spin.*` section
  pairs.py    gold/generated pairs: sampled with the compiled `generate`, scored once by the
              opponent θ_t, stored with the iteration (so no second model sits in memory)
  driver.py   the iterations: generate → score → train θ_{t+1} (the trainer, `task = spin`)

`task = spin` (`training/tasks/spin_pairs.py`) is what each iteration's run trains on.
"""
