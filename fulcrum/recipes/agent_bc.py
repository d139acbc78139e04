"""Behaviour cloning of an LM agent on the farming world's Lite tasks.

A 2-layer, 128-wide byte-level transformer learns to write the scripted planner's action for the
context the agent reads each turn (its last 4 actions, the text observation opening with the task
in words, the prompt mark), from 16 planner episodes per Lite task. Evaluation plays every Lite
task on 4 held-out seeds with grammar-constrained greedy actions in one compiled rollout:
`eval/success` (overall and per domain), `eval/progress`, `eval/invalid_action_rate` (0 by
construction), and `eval/action_accuracy` on held-out demonstrations. Expected: success ≈ 0.5
(measured 0.56 ± 0.06 over 16 seeds a task; random 0.18, planner 1.00; combat is the weak domain)
and action accuracy ≈ 0.72; ~10 min of train steps on 2 quiet CPU cores plus ~3 min of planner
demonstrations (the first time: they are cached in data.data_dir); `benchmarks/results/agents.md`.

  fulcrum train --recipe agent_bc --workdir runs/agent_bc
  fulcrum agent eval --workdir runs/agent_bc --tasks lite --episodes 8
"""

from fulcrum.recipes._bases import base_config


def get_config():
  c = base_config()
  c.task = "agent"
  c.agent.tasks = "lite"
  c.agent.demos_per_task = 16
  c.train.seq_len = 408  # 4 history lines of 17 bytes + 320-byte observation + mark + action.
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.log_every = 20
  c.train.eval_every = 300
  c.train.checkpoint_every = 300
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  return c
