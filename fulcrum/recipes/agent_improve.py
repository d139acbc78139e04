"""Improving the behaviour-cloned agent past its demonstrations with policy gradient.

Starts from an `agent_bc` run (`improve.init_from`) and runs 5 rounds of policy gradient with a
leave-one-out baseline and PPO's clipped ratio (`agents/improve.py`): each round the agent
samples 8 episodes of every Lite task on fresh training seeds, each turn of an episode is
weighted by how much better its return (best progress + success) was than the other 7 episodes
of its task (divided by the episode's turns), and 150 optimizer steps train on those rows.
About 8 minutes a round on 2 CPU cores. Held-out success (greedy, 8 seeds a task) is reported
per round, with θ_0's in WORKDIR/base.json. Measured from the bench's agent_bc (0.542): 0.567,
0.600, 0.558, 0.417, 0.508 after rounds 0-4, i.e. no gain over behaviour cloning yet (paired
difference −0.033 ± 0.077; README's Agents section, `benchmarks/results/agents.md`).

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
