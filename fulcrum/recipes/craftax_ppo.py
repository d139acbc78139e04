"""PPO on Craftax-Classic (Crafter's 22 achievements in JAX, pip `craftax`), an MLP policy.

64 environments × 64 steps per update, 4 epochs of 8 minibatches, GAE(0.99, 0.8), clip 0.2,
entropy 0.01, Adam 2e-4 annealed to 0: Craftax's PPO baseline scaled to a CPU (its paper trains
1e9 steps on a GPU; this runs 1e6: ~5 minutes at ~3,300 env steps/s on 2 CPU cores, plus ~1
minute of compilation). Reports each achievement's success rate over the episodes of the last
10% of training and the Crafter score in WORKDIR/achievements.json. Measured: Crafter score
4.4% (random 1.7%), wood 0.94, table 0.73, wood pickaxe 0.16, wood sword 0.20
(`fulcrum bench craftax`, benchmarks/results/craftax.md).

  fulcrum train --recipe craftax_ppo --workdir runs/craftax_ppo
  fulcrum train --recipe craftax_ppo --workdir runs/craftax_ppo --set ppo.total_steps=5000000
"""

from fulcrum.recipes._bases import base_config


def get_config():
  c = base_config()
  c.task = "ppo"
  c.ppo.env = "craftax_classic"
  c.ppo.backbone = "mlp"
  c.ppo.total_steps = 1_000_000
  return c
