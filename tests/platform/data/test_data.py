"""Tests for fulcrum.platform.data: tokenizer, TFDS corpus builder, grain pipelines."""

from __future__ import annotations

import json
import os
import re
import socket
import sys

import numpy as np
import pytest

from fulcrum.platform.data import (
  ByteTokenizer,
  data_config_summary,
  load_source,
  make_eval_batches,
  make_train_iterator,
  text_corpus,
)
from fulcrum.platform.errors import UserError
from fulcrum.platform.sections import base_config

EOS = ByteTokenizer.EOS_ID
NUM_DOCS = 40


def _doc_text(i: int) -> str:
  # A unique header, varied lengths and some non-ASCII bytes.
  body = f"line {i} of a small test document, déjà vu №{i}\n" * (1 + i % 6)
  return f"<doc{i:03d}>\n{body}"


@pytest.fixture
def data_cfg(tmp_path):
  """A data config over NUM_DOCS small text files (in two directories), data_dir in tmp."""
  root = tmp_path / "texts"
  for i in range(NUM_DOCS):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f"doc{i:03d}.txt").write_text(_doc_text(i), encoding="utf-8")
  cfg = base_config().data
  cfg.text_files = str(root / "**" / "*.txt")
  cfg.data_dir = str(tmp_path / "tfds")
  return cfg


def _docs(source) -> list[bytes]:
  return [source[i]["text"] for i in range(len(source))]


def _stream(batches) -> np.ndarray:
  """The token stream the batches were cut from: each row's window is inputs + last target."""
  rows = []
  for b in batches:
    for inp, tgt in zip(b["inputs"], b["targets"], strict=True):
      rows.append(np.concatenate([inp, tgt[-1:]]))
  return np.concatenate(rows)


def _complete_docs(stream: np.ndarray) -> list[bytes]:
  """Documents in a stream that starts at a document start; drops the trailing partial one."""
  ends = np.flatnonzero(stream == EOS)
  docs, start = [], 0
  for end in ends:
    docs.append(stream[start:end].astype(np.uint8).tobytes())
    start = end + 1
  return docs


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    for x, y in zip(a, b, strict=True)
  )


def test_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert tok.vocab_size == 256 and tok.EOS_ID == 0
  for text in ["hello", "", "déjà vu — 日本語 ✓ 🙂", "tab\tnew\nline"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  ids = tok.encode("é", add_eos=True)
  assert list(ids) == [0xC3, 0xA9, EOS]
  assert tok.decode(ids) == "é"  # EOS dropped.
  assert tok.decode(np.array([104, EOS, 105])) == "hi"
  assert list(tok.encode(b"\xff\x01")) == [255, 1]
  assert tok.decode([0xC3]) == "\ufffd"  # Cut character: replaced, not raised.
  assert tok.decode([104, 300]) == "h\ufffd"  # Beyond the byte range.


def test_assign_splits_deterministic_disjoint():
  paths = [f"dir{i % 7}/file{i}.txt" for i in range(2000)]
  a = text_corpus.assign_splits(paths)
  assert a == text_corpus.assign_splits(paths)
  shuffled = text_corpus.assign_splits(list(reversed(paths)))  # Order does not matter.
  assert {k: set(v) for k, v in shuffled.items()} == {k: set(v) for k, v in a.items()}
  assert set(a["train"]).isdisjoint(a["validation"])
  assert sorted(a["train"] + a["validation"]) == sorted(paths)
  assert 0.03 < len(a["validation"]) / len(paths) < 0.07
  # A file's split depends on its own path only, not on the other files.
  sub = text_corpus.assign_splits(paths[:500])
  assert set(sub["validation"]) == set(a["validation"]) & set(paths[:500])
  for n in (2, 3):  # Tiny corpora still get one file in each split.
    small = text_corpus.assign_splits(paths[:n])
    assert small["train"] and small["validation"]
  assert text_corpus.assign_splits(["only.txt"]) == {"train": ["only.txt"], "validation": []}


def test_corpus_split_by_file(data_cfg):
  train = {s["path"].decode() for s in _iter_source(load_source(data_cfg, "train"))}
  val = {s["path"].decode() for s in _iter_source(load_source(data_cfg, "validation"))}
  expected = {f"{'a' if i % 2 else 'b'}/doc{i:03d}.txt" for i in range(NUM_DOCS)}
  assert train and val and train.isdisjoint(val) and train | val == expected
  assert text_corpus.assign_splits(sorted(expected))["validation"] == sorted(val)
  # Building again is a no-op with the same splits; the summary counts files per split.
  assert {s["path"].decode() for s in _iter_source(load_source(data_cfg, "train"))} == train
  summary = data_config_summary(data_cfg)
  assert f"{NUM_DOCS} files" in summary
  assert f"train {len(train)} / validation {len(val)}" in summary


def _iter_source(source):
  return [source[i] for i in range(len(source))]


def test_corpus_key_tracks_file_set(data_cfg, tmp_path):
  before = text_corpus.text_files(data_cfg.text_files)
  assert text_corpus.text_files(data_cfg.text_files).config_name == before.config_name
  (tmp_path / "texts" / "a" / "doc001.txt").write_text("changed", encoding="utf-8")
  after = text_corpus.text_files(data_cfg.text_files)
  assert after.config_name != before.config_name
  assert after.paths == before.paths


def test_glob_matching_nothing_raises(data_cfg, tmp_path):
  data_cfg.text_files = str(tmp_path / "nowhere" / "*.txt")
  with pytest.raises(UserError, match=r"data\.text_files=.*matched no files"):
    load_source(data_cfg, "train")
  data_cfg.text_files = str(tmp_path / "texts")  # A directory, not a glob.
  with pytest.raises(UserError, match="directory"):
    load_source(data_cfg, "train")


def test_missing_split_and_single_file(data_cfg, tmp_path):
  with pytest.raises(UserError, match="no split 'test'"):
    load_source(data_cfg, "test")
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "only.txt").write_text("just one file", encoding="utf-8")
  data_cfg.text_files = str(tmp_path / "one" / "*.txt")
  assert len(load_source(data_cfg, "train")) == 1
  with pytest.raises(UserError, match="1 file"):
    make_eval_batches(data_cfg, seq_len=8, batch_size=2, num_batches=1)


def test_packing_reproduces_document_stream(data_cfg):
  seq_len, batch_size = 16, 4
  train_docs = _docs(load_source(data_cfg, "train"))
  n = len(train_docs)
  per_epoch_tokens = sum(len(d) + 1 for d in train_docs)
  num_batches = 3 * per_epoch_tokens // ((seq_len + 1) * batch_size)  # ~3 epochs.
  batches = _take(
    make_train_iterator(data_cfg, seq_len=seq_len, batch_size=batch_size, seed=0), num_batches
  )
  for b in batches:
    assert set(b) == {"inputs", "targets"}
    for k in ("inputs", "targets"):
      assert b[k].shape == (batch_size, seq_len) and b[k].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  stream = _stream(batches)
  docs = _complete_docs(stream)
  # The stream is whole documents joined by EOS, no padding: each epoch is a permutation of
  # the training documents, and the order is reshuffled between epochs.
  assert len(docs) >= 2 * n
  epoch1, epoch2 = docs[:n], docs[n : 2 * n]
  assert sorted(epoch1) == sorted(train_docs) == sorted(epoch2)
  assert epoch1 != train_docs and epoch1 != epoch2
  expected = np.concatenate([np.frombuffer(d + b"\0", np.uint8) for d in docs]).astype(np.int32)
  np.testing.assert_array_equal(stream[: len(expected)], expected)


@pytest.mark.parametrize("k", [0, 1, 7, 23])
def test_resume_is_exact(data_cfg, k):
  kwargs = dict(seq_len=16, batch_size=4, seed=5)
  it = make_train_iterator(data_cfg, **kwargs)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 12)
  resumed = make_train_iterator(data_cfg, **kwargs)
  _take(resumed, 3)  # Restoring must not depend on where the fresh iterator was.
  resumed.set_state(state)
  assert _equal(_take(resumed, 12), expected)


def test_resume_with_other_settings_raises(data_cfg):
  it = make_train_iterator(data_cfg, seq_len=16, batch_size=4, seed=0)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  other = make_train_iterator(data_cfg, seq_len=32, batch_size=4, seed=0)
  with pytest.raises(UserError, match="seq_len was 16, now 32"):
    other.set_state(state)
  with pytest.raises(UserError, match="not from this version"):
    other.set_state({"next_index": 3})


def test_seed_controls_order(data_cfg):
  def first(seed):
    return _take(make_train_iterator(data_cfg, seq_len=16, batch_size=4, seed=seed), 5)

  assert _equal(first(0), first(0))
  assert not _equal(first(0), first(1))


def test_per_host_sharding(data_cfg):
  seq_len, batch_size = 16, 4
  train_docs = _docs(load_source(data_cfg, "train"))
  n = len(train_docs)
  # Host i reads global positions i, i + 2, ... of the shuffled stream: in epoch 1, host 0
  # gets ceil(n / 2) documents and host 1 the rest.
  per_host = [(n + 1) // 2, n // 2]
  host_docs = []
  for index in range(2):
    it = make_train_iterator(
      data_cfg, seq_len=seq_len, batch_size=batch_size, seed=0, process_index=index, process_count=2
    )
    batches = _take(it, 200)
    assert all(b["inputs"].shape == (batch_size // 2, seq_len) for b in batches)
    host_docs.append(_complete_docs(_stream(batches))[: per_host[index]])
    assert len(host_docs[index]) == per_host[index]
  assert set(host_docs[0]).isdisjoint(host_docs[1])
  assert sorted(host_docs[0] + host_docs[1]) == sorted(train_docs)
  with pytest.raises(UserError, match="divide by the number of hosts"):
    make_train_iterator(data_cfg, seq_len=seq_len, batch_size=3, seed=0, process_count=2)


def test_eval_batches_are_fixed(data_cfg):
  kwargs = dict(seq_len=16, batch_size=4, num_batches=30)  # More tokens than the split: wraps.
  val_tokens = sum(len(d) + 1 for d in _docs(load_source(data_cfg, "validation")))
  assert val_tokens < 30 * 4 * 17
  a = make_eval_batches(data_cfg, **kwargs)
  b = make_eval_batches(data_cfg, **kwargs)
  assert len(a) == 30 and _equal(a, b)
  assert a[0]["inputs"].shape == (4, 16) and a[0]["inputs"].dtype == np.int32
  np.testing.assert_array_equal(a[0]["inputs"][:, 1:], a[0]["targets"][:, :-1])
  # Stored order, no shuffle: the stream starts with the first validation document.
  first = _docs(load_source(data_cfg, "validation"))[0]
  assert _complete_docs(_stream(a))[0] == first
  # Hosts hold row slices of the same global batches.
  halves = [
    make_eval_batches(data_cfg, **kwargs, process_index=i, process_count=2) for i in range(2)
  ]
  for full, h0, h1 in zip(a, *halves, strict=True):
    np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), full["inputs"])


def test_tfds_name_unprepared_raises_without_network(data_cfg, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("the data layer tried to use the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  data_cfg.text_files = ""
  data_cfg.tfds_name = "mnist"
  with pytest.raises(UserError, match=r"dataset 'mnist' is not prepared in .*tfds build mnist"):
    load_source(data_cfg, "train")
  data_cfg.tfds_name = "surely_not_a_dataset_xyz"
  with pytest.raises(UserError, match="neither a registered TFDS dataset"):
    make_train_iterator(data_cfg, seq_len=8, batch_size=2, seed=0)
  assert not os.path.exists(os.path.join(data_cfg.data_dir, "mnist"))


def test_tfds_name_reads_prepared_dataset(data_cfg):
  # The built corpus is itself a prepared TFDS dataset; open it by name like any other.
  name = f"fulcrum_text_corpus/{text_corpus.text_files(data_cfg.text_files).config_name}"
  expected = _take(make_train_iterator(data_cfg, seq_len=16, batch_size=4, seed=0), 3)
  data_cfg.tfds_name, data_cfg.text_files = name, ""
  assert _equal(_take(make_train_iterator(data_cfg, seq_len=16, batch_size=4, seed=0), 3), expected)
  assert data_config_summary(data_cfg).startswith(f"tfds {name}")
  data_cfg.text_key = "body"
  with pytest.raises(UserError, match="no feature 'body'"):
    load_source(data_cfg, "train")


def test_worker_processes_keep_order_and_state(data_cfg):
  kwargs = dict(seq_len=16, batch_size=4, seed=2)
  reference = _take(make_train_iterator(data_cfg, **kwargs), 10)
  data_cfg.num_workers = 1
  it = make_train_iterator(data_cfg, **kwargs)
  try:
    assert _equal(_take(it, 4), reference[:4])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed = make_train_iterator(data_cfg, **kwargs)
  try:
    resumed.set_state(state)
    assert _equal(_take(resumed, 6), reference[4:])
  finally:
    resumed.close()


def test_stdlib_corpus_builds_without_tensorflow(tmp_path, capfd):
  cfg = base_config().data
  cfg.data_dir = str(tmp_path)
  summary = data_config_summary(cfg)
  err = capfd.readouterr().err
  assert "preparing corpus" in err and str(tmp_path) in err
  match = re.fullmatch(
    r"python\d+\.\d+ stdlib: (\d+) files, [\d.]+ MB "
    r"\(train (\d+) / validation (\d+)\)",
    summary,
  )
  assert match, summary
  files, train, val = map(int, match.groups())
  assert files > 100 and train > 0 and val > 0 and train + val == files
  assert data_config_summary(cfg) == summary  # Second call: no rebuild, no message.
  assert "preparing corpus" not in capfd.readouterr().err
  batch = make_eval_batches(cfg, seq_len=64, batch_size=2, num_batches=1)[0]
  assert batch["inputs"].shape == (2, 64)
  assert "tensorflow" not in sys.modules


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("FULCRUM_DATA_DIR", str(tmp_path / "env"))
  assert text_corpus.resolve_data_dir("") == str(tmp_path / "env")
  assert text_corpus.resolve_data_dir(str(tmp_path / "x")) == str(tmp_path / "x")
  monkeypatch.delenv("FULCRUM_DATA_DIR")
  monkeypatch.setenv("HOME", str(tmp_path))
  expected = tmp_path / ".cache" / "fulcrum" / "tensorflow_datasets"
  assert text_corpus.resolve_data_dir("") == str(expected)


def test_unreadable_file_is_a_user_error(data_cfg, tmp_path, monkeypatch):
  files = text_corpus.text_files(data_cfg.text_files)
  # A file that vanishes between listing and building.
  (tmp_path / "texts" / "a" / "doc001.txt").unlink()
  monkeypatch.setattr(text_corpus, "text_files", lambda pattern: files)
  with pytest.raises(UserError, match=r"^cannot read corpus file .*doc001\.txt: "):
    load_source(data_cfg, "train")
