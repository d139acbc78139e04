"""Actor-critic networks for PPO (`ppo.backbone`): an MLP that sees one observation, or a
sequence model (Mamba's selective SSM, Hawk's RG-LRU) that carries a memory over the episode.

Both take the same arguments: `(obs [n, T, f], first [n, T] bool, memory) -> (logits [n, T, A],
value [n, T], memory)`, where `first` marks the observation that opens an episode. The recurrent
network steps its block stack one observation at a time (the blocks' decode path, with their
caches as the memory), zeroing the memory where an episode opens; the same code runs in the
rollout (T = 1, the memory carried from step to step) and in the update (T = the rollout's
length, from the memory the rollout started with), so the update recomputes exactly the
log-probabilities the rollout acted with. The MLP ignores `first` and has no memory (`()`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fulcrum.modules.blocks import block_name, block_pattern
from fulcrum.modules.layers import RMSNorm
from fulcrum.modules.model_config import ModelConfig

RECURRENT = ("mamba", "hawk")  # Backbones with a memory (model.arch names).


def _heads(h, actions: int, width: int):
  """Policy logits and value from features `h` (a tanh layer each, PPO's usual init)."""

  def hidden(x, name):
    dense = nn.Dense(width, kernel_init=nn.initializers.orthogonal(math.sqrt(2)), name=name)
    return nn.tanh(dense(x))

  logits = nn.Dense(actions, kernel_init=nn.initializers.orthogonal(0.01), name="policy")
  value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0), name="value")
  return logits(hidden(h, "actor_head")), value(hidden(h, "critic_head"))[..., 0]


class ActorCritic(nn.Module):
  """Policy logits and value from one observation vector (separate tanh MLP towers)."""

  actions: int
  width: int = 256
  depth: int = 2

  def initial_memory(self, batch: int) -> tuple:
    del batch
    return ()

  @nn.compact
  def __call__(self, obs, first=None, memory=()):
    del first

    def tower(x, name):
      for i in range(self.depth):
        dense = nn.Dense(self.width, kernel_init=nn.initializers.orthogonal(math.sqrt(2)),
                         name=f"{name}_{i}")  # fmt: skip
        x = nn.tanh(dense(x))
      return x

    logits = nn.Dense(self.actions, kernel_init=nn.initializers.orthogonal(0.01), name="policy")
    value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0), name="value")
    return logits(tower(obs, "actor")), value(tower(obs, "critic"))[..., 0], memory


class _Step(nn.Module):
  """One observation per environment through the block stack, with its caches."""

  config: ModelConfig
  actions: int

  @nn.compact
  def __call__(self, memory, inputs):
    obs, first = inputs  # [n, f], [n].
    c = self.config
    keep = ~first

    def reset(m):  # An opening observation starts from the empty state.
      return m * keep.reshape((-1,) + (1,) * (m.ndim - 1)).astype(m.dtype)

    memory = jax.tree.map(reset, memory)
    # Position 0 opens a sequence (the RG-LRU's gate convention); 1 continues one.
    positions = keep.astype(jnp.int32)[:, None]
    h = nn.Dense(c.d_model, name="input_proj")(obs.astype(jnp.float32))[:, None]
    pattern = block_pattern(c.arch)
    new = []
    for i, cache in enumerate(memory):
      h, cache = pattern[i % len(pattern)](c, name=block_name(i))(h, positions, cache)
      new.append(cache)
    h = RMSNorm(c.norm_eps, name="final_norm")(h[:, 0])
    logits, value = _heads(h, self.actions, c.d_model)
    return tuple(new), (logits, value)


class RecurrentActorCritic(nn.Module):
  """A Mamba or Hawk block stack over the episode's observations, with policy and value heads."""

  config: ModelConfig
  actions: int

  def initial_memory(self, batch: int) -> tuple[Any, ...]:
    """The empty memory of `batch` environments: each layer's cache."""
    pattern = block_pattern(self.config.arch)
    return tuple(
      pattern[i % len(pattern)](self.config, parent=None).init_cache(batch, 1)
      for i in range(self.config.num_layers)
    )

  @nn.compact
  def __call__(self, obs, first, memory):
    steps = nn.scan(_Step, variable_broadcast="params", split_rngs={"params": False},
                    in_axes=1, out_axes=1)  # fmt: skip
    memory, (logits, value) = steps(self.config, self.actions, name="steps")(memory, (obs, first))
    return logits, value, memory


def backbone_config(arch: str, width: int, depth: int) -> ModelConfig:
  """The block stack of a recurrent backbone: `depth` layers `width` wide."""
  return ModelConfig(arch=arch, d_model=width, num_layers=depth, num_heads=1)


def build(backbone: str, actions: int, width: int, depth: int) -> nn.Module:
  """The actor-critic `ppo.backbone` names."""
  if backbone == "mlp":
    return ActorCritic(actions, width, depth)
  if backbone in RECURRENT:
    return RecurrentActorCritic(backbone_config(backbone, width, depth), actions)
  raise ValueError(f"unknown PPO backbone {backbone!r}; choose mlp or one of {RECURRENT}")
