"""The device mesh, logical-axis rules and multi-host initialisation.

Modules name their axes logically (`embed`, `heads`, `mlp`, ...); this file alone maps those
names onto the physical mesh axes `data`, `fsdp` and `tensor`.

A multi-host run is launched by its environment (`launch_from_env`), in this order:

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID   all three, on every process
  srun under SLURM with more than one task                    jax's SLURM detection
  every host of a multi-host Cloud TPU slice                  jax's TPU detection

and anything else is a single-process run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fulcrum.platform.errors import UserError

log = logging.getLogger("fulcrum")

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

# An explicit launch: every process sets all three (jax itself reads only the address).
EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py); srun sets them all, a
# batch script or a shell opened on an allocated node only some.
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# Seconds a process waits for the others to join (jax's default; `$FULCRUM_INIT_TIMEOUT_S`
# overrides it): hosts of a pod or a SLURM step start within seconds of each other, but a slow
# image pull or file system can take minutes.
INITIALIZATION_TIMEOUT_S = 300
TIMEOUT_ENV = "FULCRUM_INIT_TIMEOUT_S"
# jax's own deadline is this much later than ours, so ours ends the process first (one line).
JOIN_GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a multi-process run, as its environment says.

  `coordinator_address`, `num_processes` and `process_id` are set for an explicit launch and
  None where jax's cluster detection finds them (SLURM, TPU).
  """

  source: str  # "JAX_* variables", "SLURM" or "Cloud TPU".
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def describe(self) -> str:
    if self.coordinator_address is None:
      return f"launched by {self.source}"
    return (
      f"process {self.process_id} of {self.num_processes}, coordinator "
      f"{self.coordinator_address}, from {self.source}"
    )


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
  text = environ[name].strip()
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise UserError(
      f"{name}={text!r} is not an integer >= {minimum}; set it to one on every process"
    )
  return value


def _explicit_launch(environ: Mapping[str, str]) -> Launch | None:
  present = [k for k in EXPLICIT_ENV if environ.get(k, "").strip()]
  if not present:
    return None
  missing = [k for k in EXPLICIT_ENV if k not in present]
  if missing:
    verb = "is" if len(present) == 1 else "are"
    neg = "is" if len(missing) == 1 else "are"
    raise UserError(
      f"{' and '.join(present)} {verb} set but {' and '.join(missing)} {neg} not; set all "
      "three on every process (e.g. JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 "
      "JAX_PROCESS_ID=0, then 1 on the second), or none for a single-process run"
    )
  address = environ["JAX_COORDINATOR_ADDRESS"].strip()
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(
      f"JAX_COORDINATOR_ADDRESS={address!r} is not HOST:PORT; use process 0's address and a "
      "free port, e.g. 10.0.0.1:1234"
    )
  num = _env_int(environ, "JAX_NUM_PROCESSES", 1)
  pid = _env_int(environ, "JAX_PROCESS_ID", 0)
  if pid >= num:
    raise UserError(
      f"JAX_PROCESS_ID={pid} is out of range for JAX_NUM_PROCESSES={num}; give the processes "
      f"the ids 0 to {num - 1}"
    )
  return Launch("JAX_* variables", address, num, pid)


def _slurm_launch(environ: Mapping[str, str]) -> Launch | None:
  """A SLURM step of several tasks; a single task (or no SLURM) is a single-process run."""
  if "SLURM_JOB_ID" not in environ:
    return None
  try:
    tasks = int(environ.get("SLURM_NTASKS", "1"))
  except ValueError:
    tasks = 1
  if tasks <= 1:
    return None
  missing = [k for k in SLURM_ENV if k not in environ]
  if missing:
    log.warning(
      "SLURM_NTASKS=%d but %s unset (not started by srun): training in this process alone; "
      "start every task with `srun fulcrum train ...` to use them all",
      tasks,
      " and ".join(missing) + (" is" if len(missing) == 1 else " are"),
    )
    return None
  return Launch("SLURM")


def _tpu_pod() -> bool:
  """Whether this is one host of a multi-host Cloud TPU slice, by jax's own TPU detection (a
  private module, so anything failing there means no). It returns at once off a TPU VM."""
  try:
    from jax._src import clusters

    for env in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
      if env.is_env_present():
        return env.get_process_count() > 1
  except Exception as e:  # noqa: BLE001 (a jax internal: its failure must not stop training)
    log.debug("Cloud TPU detection failed: %s", e)
  return False


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
  """The multi-process launch `environ` (default `os.environ`) describes, or None.

  Raises:
    UserError: a partial or malformed `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/
      `JAX_PROCESS_ID` set.
  """
  environ = os.environ if environ is None else environ
  launch = _explicit_launch(environ) or _slurm_launch(environ)
  if launch is None and _tpu_pod():
    launch = Launch("Cloud TPU")
  return launch


def _timeout(environ: Mapping[str, str]) -> int:
  text = environ.get(TIMEOUT_ENV, "").strip()
  if not text:
    return INITIALIZATION_TIMEOUT_S
  if not text.isdigit() or int(text) < 1:
    raise UserError(f"{TIMEOUT_ENV}={text!r} is not a whole number of seconds >= 1")
  return int(text)


def _wait_for_coordinator(address: str, timeout: int) -> None:
  """Waits until something listens at `address` (process 0's coordinator), or raises."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
          f"nothing answers at JAX_COORDINATOR_ADDRESS={address} after {timeout}s "
          f"({e.strerror or e}); start process 0 (JAX_PROCESS_ID=0) with the same address, or "
          f"fix the address ({TIMEOUT_ENV} sets the wait)"
        ) from None
      time.sleep(0.25)


class _JoinDeadline:
  """Ends the process with one line (exit 2) when joining outlasts the timeout.

  jax aborts the process with a C++ stack trace when its own deadline passes (peers that
  never start); its deadline is `JOIN_GRACE_S` later, so this line comes first. `initialize`
  releases the GIL while it waits, so the timer thread runs.
  """

  def __init__(self, launch: Launch, timeout: int):
    self._timer = threading.Timer(timeout, self._expire, args=(launch, timeout))
    self._timer.daemon = True

  @staticmethod
  def _expire(launch: Launch, timeout: int) -> None:
    sys.stderr.write(
      f"fulcrum: error: the multi-host run did not assemble within {timeout}s ("
      f"{launch.describe()}); start every process with the same settings, or raise "
      f"{TIMEOUT_ENV}\n"
    )
    sys.stderr.flush()
    os._exit(2)

  def __enter__(self) -> _JoinDeadline:
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> Launch | None:
  """Joins the multi-host run the environment describes (`launch_from_env`); returns it.

  Calls `jax.distributed.initialize`, with the explicit variables or with jax's own cluster
  detection, and waits up to `$FULCRUM_INIT_TIMEOUT_S` (default 300) seconds for every
  process to join; past that the process ends with one line and exit status 2 (jax itself
  would abort). Does nothing on a single-process run or when jax is already initialised.

  Raises:
    UserError: a partial or malformed explicit launch, the coordinator unreachable, or joining
      failed (port in use, JAX used before this call).
  """
  environ = os.environ if environ is None else environ
  launch = launch_from_env(environ)
  if launch is None or jax.distributed.is_initialized():
    return launch
  timeout = _timeout(environ)
  if launch.coordinator_address and launch.process_id != 0:
    _wait_for_coordinator(launch.coordinator_address, timeout)
  kwargs = {k: v for k, v in dataclasses.asdict(launch).items() if k != "source" and v is not None}
  try:
    with _JoinDeadline(launch, timeout):
      jax.distributed.initialize(**kwargs, initialization_timeout=timeout + JOIN_GRACE_S)
  except (RuntimeError, ValueError, TypeError) as e:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(
      f"could not join the multi-host run ({launch.describe()}): {why}; check that the "
      "coordinator's port is free on process 0 and that nothing in JAX ran before `train`"
    ) from None
  log.info(
    "joined a multi-host run: process %d of %d (%s)",
    jax.process_index(),
    jax.process_count(),
    launch.describe(),
  )
  return launch


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; `mesh.data = -1` takes every remaining device.

  Over all devices (`devices=None`) the layout is `jax.make_mesh`'s: topology-aware on TPU, and
  each process's devices contiguous along the leading (data) axis. An explicit `devices` list
  is laid out in the order given. The axes are `Auto`: shardings follow the logical rules.
  """
  grid_devices = jax.devices() if devices is None else list(devices)
  n = len(grid_devices)
  fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
  data = mesh_cfg.data if mesh_cfg.data != -1 else n // (fsdp * tensor)
  if data < 1 or data * fsdp * tensor != n:
    raise UserError(
      f"mesh data={mesh_cfg.data} fsdp={fsdp} tensor={tensor} does not fit {n} device(s); "
      "make data*fsdp*tensor equal the device count (mesh.data=-1 fills it in)"
    )
  shape, types = (data, fsdp, tensor), (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  return Mesh(np.asarray(grid_devices).reshape(shape), MESH_AXES, axis_types=types)


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
