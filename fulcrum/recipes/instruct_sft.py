"""Supervised fine-tuning on checkable instructions: the model SPIN starts from.

A 4-layer, 128-wide byte-level transformer trained with the loss on the responses only, on
generated problems (arithmetic, lists, counting, base conversion, questions over stdlib
snippets; `fulcrum.platform.data.instruct`). Expected: a middling held-out exact match (room for
SPIN to improve), measured on 1,000 validation prompts answered greedily; see
`benchmarks/results/spin.md` for the measured value and runtime on 2 CPU cores.

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
