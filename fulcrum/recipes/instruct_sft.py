"""Supervised fine-tuning on checkable instructions: the model SPIN starts from.

A 4-layer, 128-wide byte-level transformer trained with the loss on the responses only, on
generated problems (arithmetic, lists, counting, base conversion, questions over stdlib
snippets; `fulcrum.platform.data.instruct`). Expected: a middling held-out exact match (room for
SPIN to improve) on 1,000 validation prompts answered greedily — measured 0.308 (0.306 on 2,000
test prompts) after 2,000 steps, ~13 min of train steps on 2 quiet CPU cores (0.39 s/step);
`benchmarks/results/spin.md`.

  fulcrum train --recipe instruct_sft --workdir runs/instruct_sft
  fulcrum decode --workdir runs/instruct_sft --prompt $'add 482 and 39\n=' --strategy greedy
"""

from fulcrum.recipes._bases import instruct_config


def get_config():
  c = instruct_config()
  c.train.steps = 2000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 500
  return c
