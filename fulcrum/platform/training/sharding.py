"""The device mesh, logical-axis rules and multi-host initialisation.

Modules name their axes logically (`embed`, `heads`, `mlp`, ...); this file alone maps those
names onto the physical mesh axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fulcrum.platform.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes. Batch splits over data and fsdp; parameters shard their `embed`
# dimension over fsdp (ZeRO-3 style) and their head/MLP/vocab dimensions over tensor.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
)


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` on multi-host runs (TPU pods, SLURM, env-configured)."""
  multi_host = any(
    k in os.environ
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_ID")
  )
  if multi_host and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; `mesh.data = -1` takes every remaining device."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
  data = mesh_cfg.data if mesh_cfg.data != -1 else n // (fsdp * tensor)
  if data < 1 or data * fsdp * tensor != n:
    raise UserError(
      f"mesh data={mesh_cfg.data} fsdp={fsdp} tensor={tensor} does not fit {n} device(s); "
      "make data*fsdp*tensor equal the device count (mesh.data=-1 fills it in)"
    )
  grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES)


def logical_sharding(tree, mesh: Mesh):
  """NamedShardings for a pytree of `nn.LogicallyPartitioned` leaves (e.g. from eval_shape)."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [batch, ...] array across the data and fsdp axes."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
