"""Improving the behaviour-cloned agent past its demonstrations: DAgger on its own rollouts.

Starts from an `agent_bc` run (`improve.init_from`) and runs 3 rounds (`agents/improve.py`):
each round the agent samples 8 episodes of every Lite task on fresh training seeds and plays the
same seeds greedily, as it is evaluated; the planner labels every state either rollout reached,
and the round trains 300 steps (Adam 1e-3) on those labels, every earlier round's
(`improve.aggregate`: DAgger's aggregate dataset) and the 16 planner episodes a task that
behaviour cloning learnt from. The policy-gradient term is off (`improve.pg_weight = 0`):
measured, it made later rounds worse (README's Agents section). ~10 minutes a round on 2 CPU
cores. Held-out success (greedy, 8 seeds a task) per round, with θ_0's in WORKDIR/base.json;
`benchmarks/results/agents.md` compares the final agent with the cloned one on 16 seeds a task.

  make agent                                  # trains runs/agent_bc first
  fulcrum train --recipe agent_improve --workdir runs/agent_improve \\
      --set improve.init_from=runs/agent_bc
  fulcrum agent eval --workdir runs/agent_improve --tasks lite --episodes 8
"""

from fulcrum.recipes import agent_bc


def get_config():
  c = agent_bc.get_config()
  c.task = "agent_improve"
  c.improve.init_from = "runs/agent_bc"
  c.improve.iterations = 3
  c.improve.episodes = 8
  c.improve.steps = 300
  c.improve.relabel = True
  c.improve.aggregate = True
  c.improve.pg_weight = 0.0
  c.improve.demo_weight = 1.0
  c.improve.demos_per_task = 16
  c.agent.eval_episodes = 8
  c.train.log_every = 25
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  return c
