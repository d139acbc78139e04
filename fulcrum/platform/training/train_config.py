"""The `train.*` and `mesh.*` config sections: the trainer's keys, defaults and checks."""

from __future__ import annotations

import ml_collections


def train_defaults() -> ml_collections.ConfigDict:
  """Every `train.*` key with its default."""
  c = ml_collections.ConfigDict()
  c.steps = 1000  # Total optimizer steps; rerunning a finished run does nothing.
  c.batch_size = 16  # Global batch size in sequences (per optimizer step).
  c.seq_len = 256  # Tokens per training sequence.
  c.seed = 0  # Seeds parameters, data order and dropout-free rng streams.
  c.log_every = 10  # Steps between metrics.jsonl rows.
  c.eval_every = 200  # Steps between evaluations (0: only at the end).
  c.eval_batches = 8  # Validation batches per evaluation.
  c.checkpoint_every = 200  # Steps between checkpoints (a final one is always saved).
  c.keep_checkpoints = 3  # How many recent checkpoints to keep.
  c.max_nan_steps = 10  # Stop after this many consecutive non-finite updates.
  c.grad_accum_steps = 1  # Micro-batches per step; batch_size must divide by it.
  c.progress = True  # Show a progress bar (loss, tokens/s).
  c.async_checkpointing = True  # Save checkpoints in a background thread.
  c.profile_steps = ""  # "A:B": a jax.profiler trace of steps A to B in WORKDIR/profile/.
  c.init_from = ""  # A new run's params: "" fresh | hf:FOLDER | workdir:DIR (see init_from.py).
  return c


POSITIVE = (
  "steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "max_nan_steps",
  "grad_accum_steps", "checkpoint_every", "eval_batches",
)  # fmt: skip
# `jax.random.PRNGKey` takes a signed 64-bit seed; the synthetic tasks' NumPy streams refuse
# negative ones.
MAX_SEED = 2**63 - 1


def profile_range(spec: str) -> tuple[int, int] | None:
  """`train.profile_steps` as (first, last) step, None when empty; ValueError naming the fix."""
  if not spec.strip():
    return None
  first, sep, last = spec.partition(":")
  try:
    first_step, last_step = int(first), int(last)
  except ValueError:
    first_step = last_step = 0
  if not sep or not 1 <= first_step <= last_step:
    raise ValueError(
      f"train.profile_steps={spec!r} must be A:B, the first and last step to trace with "
      "1 <= A <= B (e.g. 10:12), or empty for no trace"
    )
  return first_step, last_step


# What `train.init_from` may name, "KIND:PATH": each KIND with what its PATH is.
INIT_SOURCES = {
  "hf": "FOLDER (a Hugging Face checkpoint folder)",
  "workdir": "DIR (another run's workdir: its newest checkpoint)",
}


def init_source(spec: str) -> tuple[str, str] | None:
  """`train.init_from` as (kind, path), None when empty; ValueError naming the fix."""
  if not spec.strip():
    return None
  kind, sep, path = spec.strip().partition(":")
  if not sep or kind not in INIT_SOURCES or not path.strip():
    kinds = ", ".join(f"{k}:{what}" for k, what in INIT_SOURCES.items())
    raise ValueError(f"train.init_from={spec!r} must be {kinds}, or empty for a fresh init")
  return kind, path.strip()


def validate_train(t: ml_collections.ConfigDict) -> None:
  """Checks the `train.*` section; raises ValueError naming the fix."""
  init_source(t.init_from)
  profile = profile_range(t.profile_steps)
  if profile and profile[1] > t.steps:
    raise ValueError(
      f"train.profile_steps={t.profile_steps!r} ends after train.steps={t.steps}; "
      "trace steps that run"
    )
  for key in POSITIVE:
    if t[key] <= 0:
      raise ValueError(f"train.{key} must be positive, got {t[key]}")
  if t.eval_every < 0:
    raise ValueError(f"train.eval_every must be >= 0, got {t.eval_every}")
  if not 0 <= t.seed <= MAX_SEED:
    raise ValueError(f"train.seed must be an integer in [0, 2**63 - 1], got {t.seed}")
  if t.batch_size % t.grad_accum_steps:
    raise ValueError(
      f"train.batch_size={t.batch_size} must divide by train.grad_accum_steps={t.grad_accum_steps}"
    )


def mesh_defaults() -> ml_collections.ConfigDict:
  """Every `mesh.*` key with its default (`sharding.make_mesh` reads them)."""
  c = ml_collections.ConfigDict()
  c.data = -1  # Data-parallel axis size; -1 = every device not used by fsdp/tensor.
  c.fsdp = 1  # Fully-sharded data-parallel axis size.
  c.tensor = 1  # Tensor-parallel axis size.
  return c


def validate_mesh(m: ml_collections.ConfigDict) -> None:
  """Checks the `mesh.*` section; raises ValueError naming the fix."""
  for key in ("fsdp", "tensor"):
    if m[key] < 1:
      raise ValueError(f"mesh.{key} must be >= 1, got {m[key]}")
  if m.data != -1 and m.data < 1:
    raise ValueError(f"mesh.data must be -1 (auto) or >= 1, got {m.data}")
