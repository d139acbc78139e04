"""grain pipelines over instruction data: masked SFT examples, training batches, eval batches.

One example per problem, never packed: tokens = encode(prompt_text) + encode(response) + [EOS],
inputs = tokens[:-1], targets = tokens[1:], padded with id 0 to `seq_len`. `weights` is 1
exactly on the target positions that hold a response token or the final EOS, so the loss
never trains the model to write prompts. A problem longer than seq_len + 1 tokens is dropped
(training reports how many on stderr).

The tokenizer is any object with `encode(text) -> int32 array`, `decode(ids) -> str`,
`vocab_size` and `EOS_ID` (`ByteTokenizer`, or a Hugging Face tokenizer with that interface).

Training: the train split's examples are shuffled with `seed` (a new order every epoch),
repeated forever, dealt round-robin to hosts and batched `batch_size // process_count` rows
per host. The iterator's `get_state()` is a small JSON-serialisable dict and `set_state()` on
a fresh iterator with the same arguments resumes exactly (`pipeline.ResumableIterator`).
Evaluation: fixed batches from a split in stored order (wrapping around when it has too few
examples), computed whole on every host; each host keeps its row slice.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from fulcrum.platform.data import instruct
from fulcrum.platform.data.pipeline import ResumableIterator, per_host_batch_size
from fulcrum.platform.errors import UserError

Example = dict[str, np.ndarray]
_PAD_ID = 0


def _tokens(problem: instruct.Problem, tokenizer: Any) -> tuple[np.ndarray, int]:
  """prompt + response + EOS token ids, and the number of prompt tokens."""
  prompt = np.asarray(tokenizer.encode(instruct.prompt_text(problem)), np.int32)
  response = np.asarray(tokenizer.encode(problem.response), np.int32)
  tokens = np.concatenate([prompt, response, np.asarray([tokenizer.EOS_ID], np.int32)])
  return tokens, len(prompt)


def masked_row(tokens: np.ndarray, prompt_len: int, seq_len: int) -> Example:
  """The masked next-token example of `tokens` (len(tokens) <= seq_len + 1): weights are 1 on
  the targets after the first `prompt_len` tokens (SFT rows here, SPIN's pairs too)."""
  n = len(tokens) - 1  # Target positions used.
  inputs = np.full((seq_len,), _PAD_ID, np.int32)
  targets = np.full((seq_len,), _PAD_ID, np.int32)
  weights = np.zeros((seq_len,), np.float32)
  inputs[:n] = tokens[:-1]
  targets[:n] = tokens[1:]
  # Target j predicts token j + 1: the response starts at token prompt_len.
  weights[prompt_len - 1 : n] = 1.0
  return {
    "inputs": inputs,
    "targets": targets,
    "weights": weights,
    "prompt_len": np.int32(prompt_len),
  }


def encode_example(problem: instruct.Problem, tokenizer: Any, seq_len: int) -> Example | None:
  """One masked SFT example, or None when the problem does not fit `seq_len`.

  Args:
    problem: the problem.
    tokenizer: encodes text to int32 ids and has `EOS_ID`.
    seq_len: positions per row.

  Returns:
    {"inputs", "targets": int32 [seq_len], "weights": float32 [seq_len], "prompt_len": int32
    scalar}, pad id 0 and weight 0 after the EOS target; None if prompt + response + EOS is
    longer than seq_len + 1 tokens.
  """
  tokens, prompt_len = _tokens(problem, tokenizer)
  if len(tokens) - 1 > seq_len:
    return None
  return masked_row(tokens, prompt_len, seq_len)


@dataclasses.dataclass(frozen=True)
class _Encoded:
  """The problems that fit, as (tokens, prompt_len), and what was dropped."""

  rows: list[tuple[np.ndarray, int]]
  num_problems: int
  longest: int  # Target positions the longest problem needs.

  @property
  def num_dropped(self) -> int:
    return self.num_problems - len(self.rows)


def _encode_split(
  data_cfg: ml_collections.ConfigDict,
  split: str,
  tokenizer: Any,
  seq_len: int,
  *,
  key: str,
) -> _Encoded:
  """Tokenizes a split, keeping the problems that fit; raises when none fits."""
  if seq_len <= 0:
    raise UserError(f"train.seq_len must be positive, got {seq_len}")
  problems = instruct.load_split(data_cfg, split)
  rows, longest = [], 0
  for p in problems:
    tokens, prompt_len = _tokens(p, tokenizer)
    longest = max(longest, len(tokens) - 1)
    if len(tokens) - 1 <= seq_len:
      rows.append((tokens, prompt_len))
  if not rows:
    raise UserError(
      f"no {split} problem fits {key}={seq_len} tokens (the longest needs {longest}); raise "
      f"{key} or choose shorter families in data.instruct_families"
    )
  return _Encoded(rows, len(problems), longest)


@dataclasses.dataclass(frozen=True)
class _Pad(grain.transforms.Map):
  """(tokens, prompt_len) -> the padded, masked example."""

  seq_len: int

  def map(self, row: tuple[np.ndarray, int]) -> Example:
    return masked_row(row[0], row[1], self.seq_len)


def train_iterator(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Any,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> ResumableIterator:
  """The endless, checkpointable iterator of masked SFT batches for this host.

  Args:
    data_cfg: the `data` section (`instruct_*` keys, `data_dir`).
    tokenizer: see the module docstring.
    seq_len: positions per row (`train.seq_len`).
    batch_size: global batch size (rows across all hosts).
    seed: data-order seed (`train.seed`; the problems themselves come from
      `data.instruct_seed`).
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    A grain `DatasetIterator` of {"inputs", "targets": int32 [b, seq_len], "weights":
    float32 [b, seq_len], "prompt_len": int32 [b]} with b = batch_size // process_count.

  Raises:
    UserError: bad data config, a batch size the hosts do not divide, or no problem fits.
  """
  encoded = _encode_split(data_cfg, "train", tokenizer, seq_len, key="train.seq_len")
  if encoded.num_dropped:
    print(
      f"instruct: skipping {encoded.num_dropped} of {encoded.num_problems} train problems "
      f"longer than train.seq_len={seq_len} tokens (the longest needs {encoded.longest})",
      file=sys.stderr,
    )
  source = grain.MapDataset.source(encoded.rows).map(_Pad(seq_len))
  fingerprint = {
    "source": f"instruct {instruct.Settings.from_config(data_cfg).config_name} [train]",
    "num_examples": len(encoded.rows),
    "tokenizer": tokenizer.spec,
    "seq_len": seq_len,
  }
  return shuffled_batches(source, fingerprint, batch_size, seed, process_index, process_count)


class ArrayRows:
  """Random access to in-memory examples: example i is row i of every array (SFT-style rows,
  SPIN's pairs, an agent's demonstrations), a source for `shuffled_batches`."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.size = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self.arrays.items()}


def shuffled_batches(
  source: grain.MapDataset,
  fingerprint: dict[str, Any],
  batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
) -> ResumableIterator:
  """In-memory examples shuffled by `seed` (anew each epoch), repeated, dealt to hosts and
  batched: the checkpointable iterator of this host's `batch_size // process_count` rows.

  `fingerprint` (what fixes the examples) is extended with the order's settings; a state saved
  under other ones is refused on resume.
  """
  per_host = per_host_batch_size(batch_size, process_index, process_count)
  ds = source.shuffle(seed=seed % 2**32).repeat()[process_index::process_count]
  ds = ds.batch(per_host, drop_remainder=True)
  # Read in this thread: grain's default 16 prefetch threads would hold the GIL through the
  # train step's compile (3-4x slower on 2 cores), for rows already in memory.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  order = dict(batch_size=batch_size, seed=seed, process_index=process_index)
  return ResumableIterator(iter(ds), {**fingerprint, **order, "process_count": process_count})


def eval_batches(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Any,
  *,
  split: str,
  seq_len: int,
  batch_size: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[Example]:
  """Fixed teacher-forced batches of a split, identical on every call and every host count.

  Examples are taken in stored order (problems that do not fit are skipped; a split with too
  few wraps around). Every host builds the same global batches and keeps rows
  [process_index * b, (process_index + 1) * b) with b = batch_size // process_count.

  Args:
    data_cfg: the `data` section.
    tokenizer: see the module docstring.
    split: "validation" or "test" (or "train").
    seq_len: positions per row.
    batch_size: global batch size.
    num_batches: how many batches.
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    `num_batches` dicts shaped as the training batches, plus "target_bytes" int32 [b]: the
    bytes of each row's response + 1 for its EOS (what `response_bits_per_byte` divides by).

  Raises:
    UserError: bad data config or split, or no problem of the split fits.
  """
  per_host = per_host_batch_size(batch_size, process_index, process_count)
  if num_batches <= 0:
    raise UserError(f"train.eval_batches must be positive, got {num_batches}")
  rows = _encode_split(data_cfg, split, tokenizer, seq_len, key="train.seq_len").rows
  pad = _Pad(seq_len)
  out = []
  for b in range(num_batches):
    first = b * batch_size + process_index * per_host
    picked = [rows[i % len(rows)] for i in range(first, first + per_host)]
    examples = [pad.map(row) for row in picked]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    # The UTF-8 bytes the weighted targets stand for: the response's, and 1 for its EOS.
    batch["target_bytes"] = np.array(
      [len(tokenizer.decode(tokens[n:]).encode("utf-8")) + 1 for tokens, n in picked], np.int32
    )
    out.append(batch)
  return out


def eval_problems(
  data_cfg: ml_collections.ConfigDict, split: str, limit: int
) -> list[instruct.Problem]:
  """The first `limit` problems of a split (the held-out prompts a model answers).

  Args:
    data_cfg: the `data` section.
    split: "validation" or "test" (or "train").
    limit: how many; at most the split's size.

  Returns:
    A list of `limit` problems, the same on every call.

  Raises:
    UserError: bad data config or split, or `limit` outside [1, split size].
  """
  problems = instruct.load_split(data_cfg, split)
  if not 1 <= limit <= len(problems):
    raise UserError(
      f"asked for {limit} {split} problems but the split holds {len(problems)}; ask for 1 to "
      f"{len(problems)} or raise data.instruct_eval_size"
    )
  return problems[:limit]
