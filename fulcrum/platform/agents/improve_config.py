"""The `improve.*` config section: policy-gradient improvement of an LM agent (a leave-one-out
baseline and a clipped ratio, on its own rollouts), read when `task = agent_improve`."""

from __future__ import annotations

import math

import ml_collections


def config_defaults() -> ml_collections.ConfigDict:
  """Every `improve.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.init_from = ""  # The agent workdir (e.g. agent_bc's) the policy starts from (θ_0).
  c.iterations = 3  # Rollout → update rounds (θ_0 → θ_1 → ... → θ_T).
  c.episodes = 8  # Episodes per task per iteration: the group the baseline is taken over.
  c.temperature = 1.0  # Action sampling in the rollouts (the policy's own distribution).
  c.steps = 150  # Optimizer steps per iteration (train.steps of each iteration's run).
  c.clip = 0.2  # PPO's ε: the ratio to θ_t's action probability is clipped to [1 − ε, 1 + ε].
  c.success_bonus = 1.0  # Return = the episode's best progress + success_bonus · success.
  c.demo_weight = 0.0  # Adds demo_weight · (planner demonstrations' NLL) as an anchor.
  c.demos_per_task = 4  # Planner episodes per task for that anchor (when demo_weight > 0).
  c.relabel = False  # DAgger: the planner's action in every state the rollouts reached joins
  # the demonstrations (weight demo_weight), so the agent learns to recover from its own errors.
  c.relabel_greedy = True  # With relabel: θ_t also plays every task greedily (as evaluated) on
  # the rollouts' seeds, and the planner labels those states too.
  c.aggregate = False  # With relabel: each round also trains on every earlier round's labelled
  # states (DAgger's aggregate dataset), not only its own.
  c.pg_weight = 1.0  # Weight of the policy-gradient loss; 0 keeps no rollout rows (relabelling
  # and demonstrations only: plain DAgger).
  c.rollouts = ""  # Set by the driver: the rollout file an iteration's run trains on.
  return c


def validate_config(s: ml_collections.ConfigDict) -> None:
  """Checks the `improve.*` section; raises ValueError naming the fix."""
  checks = [
    (s.iterations >= 1, f"improve.iterations must be >= 1, got {s.iterations}"),
    (s.episodes >= 2, f"improve.episodes must be >= 2 (the baseline leaves one episode out), "
     f"got {s.episodes}"),
    (math.isfinite(s.temperature) and s.temperature > 0,
     f"improve.temperature must be positive (the agent explores by sampling), got {s.temperature}"),
    (s.steps >= 1, f"improve.steps must be >= 1, got {s.steps}"),
    (0 < s.clip < 1, f"improve.clip must be in (0, 1), got {s.clip}"),
    (math.isfinite(s.success_bonus) and s.success_bonus >= 0,
     f"improve.success_bonus must be >= 0, got {s.success_bonus}"),
    (math.isfinite(s.demo_weight) and s.demo_weight >= 0,
     f"improve.demo_weight must be >= 0, got {s.demo_weight}"),
    (s.demos_per_task >= 1, f"improve.demos_per_task must be >= 1, got {s.demos_per_task}"),
    (not s.relabel or s.demo_weight > 0,
     "improve.relabel trains on the planner's labels with improve.demo_weight: set it > 0"),
    (not s.aggregate or s.relabel,
     "improve.aggregate keeps earlier rounds' relabelled states: set improve.relabel=true"),
    (math.isfinite(s.pg_weight) and s.pg_weight >= 0,
     f"improve.pg_weight must be >= 0, got {s.pg_weight}"),
    (s.pg_weight > 0 or s.demo_weight > 0,
     "improve.pg_weight=0 and improve.demo_weight=0 leave nothing to train on"),
  ]  # fmt: skip
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
