"""Improving the behaviour-cloned agent past its demonstrations: DAgger relabelling and policy
gradient on its own rollouts.

Starts from an `agent_bc` run (`improve.init_from`) and runs 3 rounds (`agents/improve.py`):
each round the agent samples 8 episodes of every Lite task on fresh training seeds and plays the
same seeds greedily; the planner labels every state either rollout reached (DAgger, weight 1,
beside 4 planner episodes a task), and each sampled turn is also weighted by how much better its
episode's return (best progress + success) was than the other 7 of its task, on PPO's clipped
ratio. 150 optimizer steps a round, ~8 minutes a round on 2 CPU cores. Held-out success (greedy,
8 seeds a task) per round, with θ_0's in WORKDIR/base.json. Measured from the bench's agent_bc
(0.542): 0.642, 0.550, 0.483 after rounds 0-2: the first round gains +0.10, later rounds lose it
(README's Agents section, `benchmarks/results/agents.md`).

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
  c.improve.steps = 150
  c.improve.relabel = True
  c.improve.demo_weight = 1.0
  c.agent.eval_episodes = 8
  c.train.log_every = 25
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 10
  return c
