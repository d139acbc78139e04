"""Checkable instruction data: the prompt format, the `data.instruct_*` keys and the splits.

Problems come from `instruct_problems` (one generator, solver and checker per family; the
names are re-exported here). A data config fixes three splits, generated once from
`data.instruct_seed` by the TF-free TFDS builder `FulcrumInstruct` and stored as ArrayRecord
under `DATA_DIR/fulcrum_instruct/CONFIG/1.0.0/`, where CONFIG carries a hash of everything the
problems depend on (seed, sizes, families, generator version, difficulty knobs, and the stdlib
file set when a snippet family is on), so different settings never reuse stale data.

Splits: "test" and "validation" hold `data.instruct_eval_size` problems each with distinct
prompts, disjoint from each other; "train" holds `data.instruct_train_size` problems, none with
a held-out prompt (train may repeat its own prompts where a family's space is small). Problem
i of a split belongs to family `families[i % len(families)]`; each family draws from its own
random stream (seeded by the seed, the split and the family's index in `FAMILIES`), so turning
one family off leaves the others' problems unchanged. A family whose space is too small for
the held-out sizes raises a `UserError` naming the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fulcrum.platform.data import instruct_problems, text_corpus
from fulcrum.platform.data.instruct_problems import FAMILIES, Problem, check, generate
from fulcrum.platform.errors import UserError

__all__ = [
  "FAMILIES",
  "SPLITS",
  "Problem",
  "Settings",
  "check",
  "config_defaults",
  "families",
  "generate",
  "load_split",
  "prompt_text",
  "validate_config",
]

SPLITS = ("train", "validation", "test")
GENERATOR_VERSION = 1  # Bump when a generator's output for a given seed changes.
# Held-out draws allowed per problem before a family counts as exhausted.
_DRAWS_PER_PROBLEM = 50


def prompt_text(problem: Problem) -> str:
  """What a model is conditioned on; the response follows it directly, then EOS.

  Args:
    problem: the problem.

  Returns:
    "INSTRUCTION\\n=", e.g. "add 482 and 39\\n=" (the response would be "521").
  """
  return f"{problem.instruction}\n="


def config_defaults() -> ml_collections.ConfigDict:
  """The `data.*` keys instruction data reads beyond the base data section, with defaults."""
  c = ml_collections.ConfigDict()
  c.instruct_families = ""  # Comma-separated family ids (add, mul, sort, ...); "" = all.
  c.instruct_seed = 0  # Seed the problems are generated from (not the data order).
  c.instruct_train_size = 100_000  # Problems in "train".
  c.instruct_eval_size = 2000  # Problems in each of "validation" and "test".
  c.instruct_eval_prompts = 1000  # Held-out prompts eval/exact_match answers (greedy).
  return c


def families(spec: str) -> tuple[str, ...]:
  """The family ids `data.instruct_families` selects, in `FAMILIES` order.

  Args:
    spec: "" (every family) or comma-separated ids.

  Returns:
    The selected ids.

  Raises:
    ValueError: an unknown or empty id.
  """
  if not spec.strip():
    return FAMILIES
  chosen = [name.strip() for name in spec.split(",")]
  unknown = [name for name in chosen if name not in FAMILIES]
  if unknown:
    raise ValueError(
      f"data.instruct_families={spec!r} names unknown families {unknown}; use a "
      f"comma-separated subset of: {', '.join(FAMILIES)} (or '' for all)"
    )
  return tuple(name for name in FAMILIES if name in chosen)


def validate_config(d: ml_collections.ConfigDict) -> None:
  """Checks the `data.instruct_*` keys; raises ValueError naming the fix."""
  families(d.instruct_families)
  if d.instruct_seed < 0:
    raise ValueError(f"data.instruct_seed must be >= 0, got {d.instruct_seed}")
  if d.instruct_train_size < 1:
    raise ValueError(
      f"data.instruct_train_size must be >= 1, got {d.instruct_train_size}; e.g. 100000"
    )
  if d.instruct_eval_size < 1:
    raise ValueError(f"data.instruct_eval_size must be >= 1, got {d.instruct_eval_size}; e.g. 2000")
  if d.instruct_eval_prompts < 1:
    raise ValueError(f"data.instruct_eval_prompts must be >= 1, got {d.instruct_eval_prompts}")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the splits depend on; `config_name` hashes it."""

  seed: int
  train_size: int
  eval_size: int
  families: tuple[str, ...]

  @classmethod
  def from_config(cls, d: ml_collections.ConfigDict) -> Settings:
    """The settings of a `data` section (validated; bad values raise `UserError`)."""
    try:
      validate_config(d)
    except ValueError as e:
      raise UserError(str(e)) from None
    return cls(
      d.instruct_seed, d.instruct_train_size, d.instruct_eval_size, families(d.instruct_families)
    )

  @functools.cached_property
  def config_name(self) -> str:
    """TFDS builder config name, e.g. "seed0-3f2a9c01b4": distinct for distinct data."""
    identity: dict[str, Any] = {
      "version": GENERATOR_VERSION,
      "seed": self.seed,
      "sizes": [self.train_size, self.eval_size],
      "families": list(self.families),
      "difficulty": dataclasses.asdict(instruct_problems.DIFFICULTY),
    }
    if set(self.families) & set(instruct_problems.STDLIB_FAMILIES):
      identity["stdlib"] = text_corpus.stdlib_files().key
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"seed{self.seed}-{digest[:10]}"

  def describe(self) -> str:
    return (
      f"{self.train_size} train + 2 x {self.eval_size} held-out problems of "
      f"{', '.join(self.families)} (seed {self.seed})"
    )


def _split_problems(settings: Settings) -> dict[str, list[Problem]]:
  """The three splits: held-out splits first (distinct prompts), then train avoiding them."""
  seen: set[str] = set()  # Prompts of the splits made so far.
  out = {}
  for split in ("test", "validation", "train"):
    size = settings.train_size if split == "train" else settings.eval_size
    split_id = SPLITS.index(split)
    counts = [len(range(k, size, len(settings.families))) for k in range(len(settings.families))]
    per_family = []
    for family, count in zip(settings.families, counts, strict=True):
      rng = np.random.default_rng([settings.seed, split_id, FAMILIES.index(family)])
      problems, draws = [], 0
      while len(problems) < count:
        draws += 1
        if draws > _DRAWS_PER_PROBLEM * count:
          raise UserError(
            f"instruct family {family!r} has too few distinct prompts for {count} {split} "
            "problems besides the other held-out ones; lower data.instruct_eval_size or "
            "add families to data.instruct_families"
          )
        p = generate(family, rng)
        if p.instruction in seen:
          continue
        if split != "train":
          seen.add(p.instruction)
        problems.append(p)
      per_family.append(problems)
    # Interleave: problem i comes from family i % len(families).
    out[split] = [per_family[i % len(per_family)][i // len(per_family)] for i in range(size)]
  return out


@dataclasses.dataclass
class InstructConfig(tfds.core.BuilderConfig):
  """Builder config naming one `Settings`; the settings are not part of the on-disk identity."""

  settings: Settings | None = dataclasses.field(default=None, repr=False)


class FulcrumInstruct(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generated instruction problems: {"family", "instruction", "response"} text features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated, checkable instruction problems in three splits."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # As in text_corpus: TFDS' own lookup needs `importlib_resources` on Python >= 3.9.
    return epath.Path(__file__)

  def __init__(self, **kwargs: Any):
    with text_corpus.quiet_tfds():  # Our configs are made on the fly; TFDS warns about each.
      super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Generated instruction -> response problems a program checks (Fulcrum).",
      disable_shuffling=True,  # Keep the generated order: problem i is of family i % n.
      features=tfds.features.FeaturesDict(
        {
          "family": tfds.features.Text(),
          "instruction": tfds.features.Text(),
          "response": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is generated.
    splits = _split_problems(self.builder_config.settings)
    return {name: self._generate_examples(problems) for name, problems in splits.items()}

  def _generate_examples(self, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    for i, p in enumerate(problems):
      yield i, {"family": p.family, "instruction": p.instruction, "response": p.response}


def _builder(settings: Settings, data_dir: str) -> FulcrumInstruct:
  """The builder of `settings` in `data_dir`, prepared (generated on first use)."""
  config = InstructConfig(
    name=settings.config_name, description=settings.describe(), settings=settings
  )
  with text_corpus.quiet_tfds():
    builder = FulcrumInstruct(config=config, data_dir=data_dir)
    if builder.is_prepared():
      return builder
  print(f"generating instruct data: {settings.describe()} in {data_dir}", file=sys.stderr)
  try:
    with text_corpus.quiet_tfds(), tempfile.TemporaryDirectory() as scratch:
      builder.download_and_prepare(
        download_dir=scratch,
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
  except UserError:
    raise
  except Exception as e:
    # Another process (a second host or test worker) may have finished the same build first.
    with text_corpus.quiet_tfds():
      builder = FulcrumInstruct(config=config, data_dir=data_dir)
      if builder.is_prepared():
        return builder
    if isinstance(e, OSError):
      raise UserError(
        f"cannot write instruct data to {data_dir}: {e.strerror or e}; set data.data_dir (or "
        "$FULCRUM_DATA_DIR) to a writable directory"
      ) from None
    raise
  return builder


@functools.lru_cache(maxsize=8)
def _read(settings: Settings, data_dir: str, split: str) -> tuple[Problem, ...]:
  builder = _builder(settings, data_dir)
  with text_corpus.quiet_tfds():
    source = builder.as_data_source(split)
  rows = source.__getitems__(range(len(source)))
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return tuple(
    Problem(text(r["family"]), text(r["instruction"]), text(r["response"])) for r in rows
  )


def load_split(data_cfg: ml_collections.ConfigDict, split: str) -> list[Problem]:
  """The problems of one split, in stored order; generates the data on first use.

  Args:
    data_cfg: the `data` section (the `instruct_*` keys and `data_dir`).
    split: "train", "validation" or "test".

  Returns:
    The split's problems (a fresh list; reads are cached per process).

  Raises:
    UserError: an unknown split, bad `instruct_*` values, or an unwritable data dir.
  """
  if split not in SPLITS:
    raise UserError(
      f"instruct data has no split {split!r}; use one of {', '.join(SPLITS)} (e.g. "
      "data.eval_split=validation)"
    )
  settings = Settings.from_config(data_cfg)
  return list(_read(settings, text_corpus.resolve_data_dir(data_cfg.data_dir), split))
