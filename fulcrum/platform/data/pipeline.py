"""grain pipelines: random-access sources, packed training batches, fixed eval batches.

Training pipeline (one per host):

  documents (ArrayRecord, random access)
    -> shuffle with `seed`, reshuffled every epoch, repeated forever      (grain MapDataset)
    -> this host's documents: global positions process_index, +process_count, ...
    -> the `data.tokenizer` tokenizer (`tokenizer.get_tokenizer`) + EOS per document
    -> [data.num_workers > 0: read and tokenize in worker processes, order unchanged]
    -> concatenate the token stream and cut windows of seq_len + 1    (ConcatThenSplit)
    -> inputs = window[:-1], targets = window[1:]; batch rows

Per-host sharding: the globally shuffled document stream is dealt round-robin to hosts, so
hosts read disjoint documents and each packs and batches its own `batch_size //
process_count` rows; the global batch is the concatenation of the hosts' batches. With one
host that is the whole stream and the whole batch. Eval batches are computed whole on every
host and each host keeps its row slice, so evaluation sees the same data for any host count.

The training iterator is a grain `DatasetIterator` (`resumable.ResumableIterator`): `get_state()`
is a small JSON-serialisable dict and `set_state()` on a fresh iterator from the same config
resumes exactly; a state saved with another tokenizer (or other data settings) is refused.

Eval batches also carry `target_bytes` [b]: the UTF-8 bytes of text each row's targets stand for
(an EOS counts one), so bits per byte stay bits per byte with any tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from grain.experimental import ConcatThenSplitIterDataset

from fulcrum.platform.data import text_corpus
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.data.resumable import ResumableIterator
from fulcrum.platform.errors import UserError


def config_defaults() -> ml_collections.ConfigDict:
  """Every `data.*` key the text pipeline reads, with its default. Tasks with other data own
  their keys beside their data (e.g. `series.config_defaults`)."""
  c = ml_collections.ConfigDict()
  c.tfds_name = ""  # A registered TFDS dataset (e.g. "lm1b"); "" = the built-in corpus.
  c.text_files = ""  # Glob of the user's text files; "" = Python stdlib sources.
  c.text_key = "text"  # Feature holding the text in a tfds_name dataset.
  c.train_split = "train"
  c.eval_split = "validation"
  c.data_dir = ""  # Where TFDS data is prepared; "" = $FULCRUM_DATA_DIR or ~/.cache.
  c.num_workers = 0  # grain worker processes (0 = in the main process).
  # bytes (UTF-8 bytes, 256 ids) or hf:PATH (a folder with a Hugging Face tokenizer.json, or
  # the file; relative to the current directory). See data/tokenizer.py.
  c.tokenizer = tokenizer_lib.BYTES
  return c


def validate_config(d: ml_collections.ConfigDict) -> None:
  """Checks the `data.*` section; raises ValueError naming the fix."""
  if d.num_workers < 0:
    raise ValueError(
      f"data.num_workers must be >= 0 (0 = in the main process), got {d.num_workers}"
    )
  tokenizer_lib.check_spec(d.tokenizer)


# Threads reading documents ahead of packing; documents are small and decoding is cheap.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """An opened dataset: where it lives, how to read it, how to describe it."""

  label: str  # For logs and checkpoint-state fingerprints.
  data_dir: str
  builder: tfds.core.DatasetBuilder
  text_key: str
  corpus: text_corpus.PreparedCorpus | None  # Set for the built-in corpus / text_files.


def _split_names(split: str) -> list[str]:
  """Base split names in a TFDS split expression ("train[:90%]+validation" -> both)."""
  return [re.split(r"[\[(]", part.strip(), maxsplit=1)[0].strip() for part in split.split("+")]


def _open_tfds(name: str, data_dir: str) -> _Dataset:
  """Opens an already-prepared TFDS dataset; never downloads."""
  try:
    with text_corpus.quiet_tfds():
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"data.tfds_name={name!r} is neither a registered TFDS dataset nor prepared in "
      f"{data_dir}; check the name or set data.data_dir to where it is prepared"
    ) from None
  except ImportError as e:
    raise UserError(
      f"TFDS dataset {name!r} needs the Python module {e.name!r}; install it with pip"
    ) from None
  if not prepared:
    raise UserError(
      f"dataset {name!r} is not prepared in {data_dir}; run `tfds build {name} --data_dir "
      f"{data_dir} --file_format=array_record` on a machine with a network, or set "
      "data.data_dir to where it is prepared"
    )
  return _Dataset(
    label=f"tfds {name}", data_dir=data_dir, builder=builder, text_key="", corpus=None
  )


def _open(data_cfg: ml_collections.ConfigDict) -> _Dataset:
  """Opens (building the corpus first when needed) the dataset `data_cfg` names."""
  data_dir = text_corpus.resolve_data_dir(data_cfg.data_dir)
  if data_cfg.tfds_name and data_cfg.text_files:
    raise UserError(
      f"data.tfds_name={data_cfg.tfds_name!r} and data.text_files={data_cfg.text_files!r} are "
      "both set; set only one of them"
    )
  if data_cfg.tfds_name:
    ds = _open_tfds(data_cfg.tfds_name, data_dir)
    features = ds.builder.info.features
    keys = list(features.keys()) if features is not None else []
    if data_cfg.text_key not in keys:
      raise UserError(
        f"dataset {data_cfg.tfds_name!r} has no feature {data_cfg.text_key!r}; set "
        f"data.text_key to one of: {', '.join(keys)}"
      )
    return dataclasses.replace(ds, text_key=data_cfg.text_key)
  corpus = text_corpus.prepare(data_cfg.text_files, data_dir)
  return _Dataset(
    label=corpus.files.label,
    data_dir=data_dir,
    builder=corpus.builder,
    text_key="text",
    corpus=corpus,
  )


def _check_split(ds: _Dataset, split: str, key: str) -> None:
  available = list(ds.builder.info.splits.keys())
  for name in _split_names(split):
    if name in available:
      continue
    why = ""
    if ds.corpus is not None and len(ds.corpus.files.paths) == 1:
      why = " (the corpus has 1 file; a validation split needs at least 2)"
    raise UserError(
      f"{key}={split!r}: {ds.label} has no split {name!r}{why}; available splits: "
      f"{', '.join(available)}"
    )


def _source(ds: _Dataset, split: str, key: str) -> Any:
  _check_split(ds, split, key)
  try:
    with text_corpus.quiet_tfds():
      return ds.builder.as_data_source(split)
  except NotImplementedError:
    fmt = ds.builder.info.file_format
    fmt = getattr(fmt, "value", fmt)
    raise UserError(
      f"{ds.label} in {ds.data_dir} is stored as {fmt}, which grain cannot read by index; "
      f"rebuild it with `tfds build {ds.builder.name} --data_dir {ds.data_dir} "
      "--file_format=array_record`"
    ) from None
  except (ValueError, KeyError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "0 length" in detail:  # TFDS' words for a slice that selects no files.
      raise UserError(
        f"{key}={split!r} selects no examples of {ds.label}; choose a split with examples"
      ) from None
    raise UserError(
      f"{key}={split!r} is not a readable split of {ds.label} ({detail}); "
      "use a split name such as 'train' or 'train[:90%]'"
    ) from None


def load_source(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[Any]:
  """A random-access source (`len`, `[i]`) of the examples of one split.

  The built-in corpus (`data.tfds_name == ""`) is built on first use: the Python stdlib
  sources, or the files matching `data.text_files`; examples are {"text": bytes, "path":
  bytes}. A `data.tfds_name` dataset must already be prepared (as ArrayRecord) in the data
  dir; this never downloads.

  Args:
    data_cfg: the `data` section of a config.
    split: a split name (or TFDS split expression such as "train[:90%]").

  Returns:
    A TFDS ArrayRecord data source.

  Raises:
    UserError: unknown or unprepared dataset, missing split, glob matching nothing.
  """
  return _source(_open(data_cfg), split, "split")


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  """Example -> {"tokens": int32 ids of its text + EOS} (+ "bytes": the text's UTF-8 bytes per
  token, with `count_bytes`)."""

  text_key: str
  tokenizer: tokenizer_lib.Tokenizer
  count_bytes: bool = False

  def map(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    text = example[self.text_key]
    if isinstance(text, np.ndarray):
      text = text.item()
    if not self.count_bytes:
      return {"tokens": self.tokenizer.encode(text, add_eos=True)}
    tokens, counts = self.tokenizer.byte_counts(text, add_eos=True)
    return {"tokens": tokens, "bytes": counts}


class _ToInputsTargets(grain.transforms.Map):
  """A packed window of seq_len + 1 tokens -> next-token inputs/targets (+ the bytes the targets
  stand for, where the window counts them)."""

  def map(self, element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    window = element["tokens"]
    out = {"inputs": window[:-1], "targets": window[1:]}
    if "bytes" in element:
      out["target_bytes"] = element["bytes"][1:].sum(dtype=np.int32)
    return out


def exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker init: the worker ends itself once the process that started it is gone.

  A training process killed with SIGKILL cannot stop its workers (each holds a few hundred MB);
  a daemon thread in each worker polls its parent and exits when it changes.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="fulcrum-exit-with-parent").start()


def _packed(
  ds: grain.MapDataset,
  tokenize: _Tokenize,
  seq_len: int,
  num_workers: int,
) -> grain.IterDataset:
  """Tokenizes a document dataset and packs it into inputs/targets windows."""
  it = ds.map(tokenize).to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    # grain's worker launcher reads absl flags; outside `absl.app.run` they are unparsed and
    # reading them raises. Their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Before packing: workers take interleaved slices and the output is re-interleaved in
    # order, so the token stream (and the checkpointed packing state) does not depend on
    # the worker count.
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=exit_with_parent
    )
  lengths = {"tokens": seq_len + 1}
  if tokenize.count_bytes:
    lengths["bytes"] = seq_len + 1  # Same length per document as its tokens: packed in step.
  it = ConcatThenSplitIterDataset(it, length_struct=lengths)
  return it.map(_ToInputsTargets())


def per_host_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """Checks a global batch size against the hosts and returns each host's share.

  Args:
    batch_size: global batch size (`train.batch_size`).
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    batch_size // process_count.

  Raises:
    UserError: a non-positive batch size, or one the host count does not divide.
    ValueError: process_index outside [0, process_count).
  """
  if batch_size <= 0:
    raise UserError(f"train.batch_size must be positive, got {batch_size}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if batch_size % process_count:
    raise UserError(
      f"train.batch_size={batch_size} must divide by the number of hosts "
      f"({process_count}); use a multiple of {process_count}"
    )
  return batch_size // process_count


def _check_shapes(seq_len: int, batch_size: int, process_index: int, process_count: int) -> int:
  if seq_len <= 0:
    raise UserError(f"train.seq_len must be positive, got {seq_len}")
  return per_host_batch_size(batch_size, process_index, process_count)


def make_train_iterator(
  data_cfg: ml_collections.ConfigDict,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """The endless, checkpointable training iterator for this host.

  Documents are shuffled with `seed` (a new order every epoch), split round-robin across
  hosts, tokenized with EOS after each, packed without padding into windows of seq_len + 1
  and batched.

  Args:
    data_cfg: the `data` section of a config.
    seq_len: tokens per row.
    batch_size: global batch size (rows across all hosts).
    seed: data-order seed.
    process_index: this host's index (`jax.process_index()`).
    process_count: number of hosts (`jax.process_count()`).

  Returns:
    A grain `DatasetIterator` of {"inputs", "targets"}: int32 [batch_size // process_count,
    seq_len], targets = inputs shifted left by one token. `get_state()` returns a
    JSON-serialisable dict; `set_state()` on an iterator made with the same arguments
    continues exactly where that state was taken.

  Raises:
    UserError: bad data config, or batch_size not divisible by process_count.
  """
  per_host = _check_shapes(seq_len, batch_size, process_index, process_count)
  ds = _open(data_cfg)
  source = _source(ds, data_cfg.train_split, "data.train_split")
  if len(source) == 0:
    raise UserError(
      f"data.train_split={data_cfg.train_split!r} of {ds.label} is empty; "
      "choose a split with examples"
    )
  docs = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat()
  docs = docs[process_index::process_count]
  num_workers = max(int(data_cfg.num_workers), 0)
  tokenize = _Tokenize(ds.text_key, tokenizer_lib.get_tokenizer(data_cfg.tokenizer))
  batches = _packed(docs, tokenize, seq_len, num_workers).batch(per_host, drop_remainder=True)
  fingerprint = {
    "source": f"{ds.label} [{data_cfg.train_split}]",
    "num_documents": len(source),
    "seq_len": seq_len,
    "batch_size": batch_size,
    "seed": seed,
    "process_index": process_index,
    "process_count": process_count,
    "num_workers": num_workers,
    "tokenizer": data_cfg.tokenizer,
  }
  # States saved before the tokenizer was a setting were all byte-level.
  implied = {"tokenizer": tokenizer_lib.BYTES}
  return ResumableIterator(iter(batches), fingerprint, implied)


def make_eval_batches(
  data_cfg: ml_collections.ConfigDict,
  *,
  seq_len: int,
  batch_size: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches from `data.eval_split`, identical on every call.

  Documents are read in stored order (no shuffle) and packed like training data; a split with
  too few tokens wraps around. Every host computes the same global batches and keeps rows
  [process_index * b, (process_index + 1) * b) with b = batch_size // process_count.

  Args:
    data_cfg: the `data` section of a config.
    seq_len: tokens per row.
    batch_size: global batch size.
    num_batches: how many batches.
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    `num_batches` dicts {"inputs", "targets"} of int32 [batch_size // process_count, seq_len]
    and "target_bytes" int32 [batch_size // process_count]: the UTF-8 bytes of text each row's
    targets stand for (EOS counts one; with `bytes`, seq_len).

  Raises:
    UserError: bad data config, missing or empty split.
  """
  per_host = _check_shapes(seq_len, batch_size, process_index, process_count)
  if num_batches <= 0:
    raise UserError(f"train.eval_batches must be positive, got {num_batches}")
  ds = _open(data_cfg)
  source = _source(ds, data_cfg.eval_split, "data.eval_split")
  if len(source) == 0:
    raise UserError(
      f"data.eval_split={data_cfg.eval_split!r} of {ds.label} is empty; "
      "choose a split with examples"
    )
  docs = grain.MapDataset.source(source).repeat()
  tokenize = _Tokenize(ds.text_key, tokenizer_lib.get_tokenizer(data_cfg.tokenizer), True)
  it = iter(_packed(docs, tokenize, seq_len, 0).batch(batch_size, drop_remainder=True))
  rows = slice(process_index * per_host, (process_index + 1) * per_host)
  out = []
  for _ in range(num_batches):
    batch = next(it)
    out.append({k: np.ascontiguousarray(v[rows]) for k, v in batch.items()})
  it.close()
  return out


def data_config_summary(data_cfg: ml_collections.ConfigDict) -> str:
  """One line describing the data for logs.

  E.g. "python3.11 stdlib: 1790 files, 31.5 MB (train 1696 / validation 94)".

  Args:
    data_cfg: the `data` section of a config.

  Returns:
    The description (builds the corpus first if needed).
  """
  ds = _open(data_cfg)
  splits = " / ".join(
    f"{name} {info.num_examples}" for name, info in ds.builder.info.splits.items()
  )
  if ds.corpus is not None:
    files = ds.corpus.files
    return f"{files.label}: {files.describe()} ({splits})"
  return f"{ds.label} (text_key {ds.text_key!r}) in {ds.builder.data_dir}: {splits} examples"
