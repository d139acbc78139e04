"""`data.tokenizer`: bytes and a Hugging Face tokenizer.json (the committed tiny BPE of
scripts/make_tokenizer_fixture.py) behind one interface, through the pipeline, the LM task's
checks and bits per byte, `fulcrum decode` / `attribute`, and `hf.save_pretrained`."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from fulcrum.platform import hf
from fulcrum.platform.data import hf_tokenizer, make_eval_batches, make_train_iterator
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.sections import base_config
from tests.conftest import REPO, tiny_overrides, train_recipe

FIXTURE = REPO / "tests" / "fixtures" / "tokenizer"
HF_SPEC = f"hf:{FIXTURE}"
SPECS = ["bytes", HF_SPEC]
# Code, prose and characters of 2, 3 and 4 UTF-8 bytes (some split over byte-level tokens).
EXTRA = "déjà vu — 日本語 ✓ 🙂\ttab\r\n  trailing  "


def stdlib_text(name: str) -> str:
  return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def one_line(err: UserError) -> str:
  text = str(err)
  assert "\n" not in text
  return text


@pytest.fixture(params=SPECS, ids=["bytes", "hf"])
def tok(request):
  return tokenizer_lib.get_tokenizer(request.param)


# --- The tokenizers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["textwrap.py", "json/decoder.py", "this.py"])
def test_round_trip_on_stdlib_text(tok, name):
  text = stdlib_text(name) + EXTRA
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.min() >= 0 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text.encode("utf-8"))) == text  # bytes in, the same.
  if tok.spec != "bytes":  # The BPE compresses (even this.py's rot13): fewer tokens than bytes.
    assert len(ids) < 0.9 * len(text.encode("utf-8"))


def test_hf_tokenizer_reads_the_fixture():
  tok = tokenizer_lib.get_tokenizer(HF_SPEC)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert tok.vocab_size == 512 and tok.eos_token == "<|endoftext|>" and tok.EOS_ID == 0
  assert tokenizer_lib.get_tokenizer(HF_SPEC) is tok  # Cached.
  # The file itself names the same tokenizer; no BOS or other token is added.
  by_file = tokenizer_lib.get_tokenizer(f"hf:{FIXTURE / 'tokenizer.json'}")
  assert list(by_file.encode("x = 1")) == list(tok.encode("x = 1"))
  assert tok.decode(tok.encode("x")[:1]) == "x"
  # grain's worker processes get it by pickle.
  again = pickle.loads(pickle.dumps(tok))
  assert again.spec == tok.spec and list(again.encode(EXTRA)) == list(tok.encode(EXTRA))


def test_eos(tok):
  ids = tok.encode("ab", add_eos=True)
  assert ids[-1] == tok.EOS_ID and list(ids[:-1]) == list(tok.encode("ab"))
  assert tok.EOS_ID not in tok.encode("ab")
  assert tok.decode(ids) == "ab"  # EOS dropped ...
  assert tok.decode([*tok.encode("a"), tok.EOS_ID, *tok.encode("b")]) == "ab"  # ... anywhere.
  # An id beyond the vocabulary (a model with a larger one) decodes as U+FFFD, never raises.
  assert tok.decode([*tok.encode("h"), tok.vocab_size + 3]) == "h\ufffd"


def test_byte_counts_and_pieces_cover_the_text(tok):
  text = stdlib_text("textwrap.py")[:3000] + EXTRA
  ids, counts = tok.byte_counts(text, add_eos=True)
  assert list(ids) == list(tok.encode(text, add_eos=True))
  assert counts.dtype == np.int32 and counts.shape == ids.shape and counts.min() >= 0
  assert counts.sum() == len(text.encode("utf-8")) + 1 and counts[-1] == 1  # EOS: one byte.
  pieces = tok.pieces(text)
  assert len(pieces) == len(ids) - 1 and "".join(pieces) == text
  if tok.spec == "bytes":  # A character on its first byte; every byte counts one.
    assert tok.pieces("aé") == ["a", "é", ""] and (counts == 1).all()
  else:  # Both from the same spans.
    assert [len(p.encode("utf-8")) for p in pieces] == list(counts[:-1])
    assert "" in pieces  # A character split over byte-level tokens: on the first.


def test_hf_eos_from_tokenizer_config(tmp_path):
  shutil.copy(FIXTURE / "tokenizer.json", tmp_path / "tokenizer.json")
  newline = tokenizer_lib.get_tokenizer(HF_SPEC).encode("\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "Ċ"}}))
  tok = hf_tokenizer.load(tmp_path)
  assert tok.eos_token == "Ċ" and list(newline) == [tok.EOS_ID]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
  with pytest.raises(UserError, match="eos_token '<nope>'"):
    hf_tokenizer.load(tmp_path)


def _error(spec: str) -> str:
  with pytest.raises(UserError) as e:
    tokenizer_lib.get_tokenizer(spec)
  return one_line(e.value)


def test_bad_specs_name_the_fix(tmp_path):
  assert "use bytes or hf:PATH" in _error("wordpiece")
  assert "names no path" in _error("hf:")
  assert "does not exist" in _error(f"hf:{tmp_path}/missing")
  assert f"no tokenizer.json in {tmp_path}" in _error(f"hf:{tmp_path}")
  (tmp_path / "tokenizer.model").write_bytes(b"\x00")
  assert "convert it once" in _error(f"hf:{tmp_path}")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert "is not a tokenizers JSON file" in _error(f"hf:{bad}")
  bad.write_text(json.dumps({"vocab": {}}))
  assert "is not a tokenizers JSON file" in _error(f"hf:{bad}")
  # A tokenizer with no end-of-text token: the fix is a tokenizer_config.json.
  from tokenizers import Tokenizer, models

  Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "w.json"))
  assert "name it as eos_token in a tokenizer_config.json" in _error(f"hf:{tmp_path}/w.json")
  with pytest.raises(ValueError, match="data.tokenizer='bpe'"):
    tokenizer_lib.check_spec("bpe")


def test_check_vocab_names_both_numbers(tok):
  tokenizer_lib.check_vocab(tok, tok.vocab_size)
  tokenizer_lib.check_vocab(tok, tok.vocab_size + 100)  # Extra ids are never produced.
  with pytest.raises(UserError) as e:
    tokenizer_lib.check_vocab(tok, 100)
  msg = one_line(e.value)
  assert "model.vocab_size=100" in msg and f"{tok.vocab_size} tokens" in msg
  assert "does not match" in msg and f"set model.vocab_size={tok.vocab_size} or more" in msg


def test_stop_ids(tok):
  assert tokenizer_lib.stop_ids(tok, "") == ()
  ids = tokenizer_lib.stop_ids(tok, "\n:")
  assert set(tok.encode("\n")) <= set(ids) and set(tok.encode(":")) <= set(ids)
  assert tok.EOS_ID not in ids
  assert all("\n" in tok.decode([i]) or ":" in tok.decode([i]) for i in ids)
  if tok.spec == "bytes":
    assert ids == (10, 58)
  else:  # Merged tokens that hold one ("):", ...) end a row too.
    assert len(ids) > 2


# --- The pipeline ----------------------------------------------------------------------------


def _data_cfg(corpus, spec):
  cfg = base_config().data
  cfg.text_files, cfg.data_dir, cfg.tokenizer = corpus["text_files"], corpus["data_dir"], spec
  return cfg


@pytest.mark.parametrize("spec", SPECS, ids=["bytes", "hf"])
def test_eval_batches_count_the_bytes_their_targets_stand_for(tiny_corpus, spec):
  tok = tokenizer_lib.get_tokenizer(spec)
  cfg = _data_cfg(tiny_corpus, spec)
  seq_len, batch_size = 32, 4
  batch = make_eval_batches(cfg, seq_len=seq_len, batch_size=batch_size, num_batches=1)[0]
  assert set(batch) == {"inputs", "targets", "target_bytes"}
  assert batch["target_bytes"].shape == (batch_size,)
  assert int(batch["inputs"].max()) < tok.vocab_size
  # The rows are consecutive windows of seq_len + 1 of the documents' stream, in stored order.
  from fulcrum.platform.data import load_source

  source = load_source(cfg, cfg.eval_split)
  ids, counts = [], []
  for i in range(len(source)):
    a, b = tok.byte_counts(source[i]["text"], add_eos=True)
    ids.append(a)
    counts.append(b)
    if sum(map(len, ids)) > (seq_len + 1) * batch_size:
      break
  ids, counts = np.concatenate(ids), np.concatenate(counts)
  for r in range(batch_size):
    window = slice(r * (seq_len + 1), (r + 1) * (seq_len + 1))
    np.testing.assert_array_equal(batch["targets"][r], ids[window][1:])
    assert batch["target_bytes"][r] == counts[window][1:].sum()
  if spec == "bytes":
    assert (batch["target_bytes"] == seq_len).all()
  else:
    assert batch["target_bytes"].sum() > 1.5 * batch["targets"].size


def test_resume_with_another_tokenizer_is_refused(tiny_corpus):
  kw = dict(seq_len=16, batch_size=2, seed=0)
  it = make_train_iterator(_data_cfg(tiny_corpus, "bytes"), **kw)
  next(it)
  state = it.get_state()
  assert state["pipeline_settings"]["tokenizer"] == "bytes"
  hf_it = make_train_iterator(_data_cfg(tiny_corpus, HF_SPEC), **kw)
  with pytest.raises(UserError, match="tokenizer was 'bytes', now 'hf:"):
    hf_it.set_state(state)
  # A state saved before the tokenizer was a setting was byte-level: bytes resumes it, hf not.
  del state["pipeline_settings"]["tokenizer"]
  again = make_train_iterator(_data_cfg(tiny_corpus, "bytes"), **kw)
  again.set_state(state)
  with pytest.raises(UserError, match="tokenizer was 'bytes'"):
    hf_it.set_state(state)
  first = next(hf_it)
  assert int(first["inputs"].max()) >= 256  # Merged tokens: really the BPE.


# --- Training, decode, attribute -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_workdir(tiny_corpus, tmp_path_factory):
  """A tiny LM trained 4 steps on the fixture BPE."""
  values = {"data.tokenizer": HF_SPEC, "model.vocab_size": 512, "train.steps": 4}
  return train_recipe("demo", tiny_overrides(tiny_corpus, **values), tmp_path_factory.mktemp("tok"))


def test_lm_trains_with_the_hf_tokenizer_and_reports_bits_per_byte(hf_workdir):
  rows = [json.loads(line) for line in (Path(hf_workdir) / "metrics.jsonl").open()]
  evals = [r for r in rows if "eval/bits_per_byte" in r]
  assert evals and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
  last = evals[-1]
  # Nats per token over bytes per token (> 1.5 for this BPE): well under loss / ln 2.
  assert last["eval/bits_per_byte"] < last["eval/loss"] / math.log(2) / 1.5


def test_bits_per_byte_is_nats_over_bytes():
  from fulcrum.platform.training.tasks.language_modelling import LanguageModelling

  metrics = LanguageModelling.eval_metrics(None, {"loss": 30.0, "count": 10.0, "bytes": 40.0})
  assert metrics["loss"] == 3.0
  assert metrics["bits_per_byte"] == pytest.approx(30.0 / 40.0 / math.log(2))


@pytest.mark.usefixtures("unoptimised_compiles")
def test_decode_prints_text_of_the_run_tokenizer(hf_workdir, cli):
  tok = tokenizer_lib.get_tokenizer(HF_SPEC)
  args = ["decode", "--workdir", hf_workdir, "--prompt", "def ", "--max-new-tokens", "6"]
  code, out, err = cli(*args, "--strategy", "greedy", "--json")
  assert code == 0, err
  summary = json.loads(out)
  assert len(summary["tokens"]) == 6 and summary["text"] == tok.decode(summary["tokens"])
  assert any(t >= 256 for t in summary["tokens"]) or summary["text"]
  code, out, err = cli(*args, "--strategy", "greedy")
  assert code == 0, err
  assert out == "def " + summary["text"] + "\n"


@pytest.mark.usefixtures("unoptimised_compiles")
def test_attribute_labels_tokens(hf_workdir, cli):
  from fulcrum.platform.attribution import explain

  text = "def f(x):\n  return x"
  tok = tokenizer_lib.get_tokenizer(HF_SPEC)
  summary = explain.explain_workdir(
    hf_workdir, text, "saliency", out=str(Path(hf_workdir) / "a.html"), metrics=False
  )
  assert len(summary["tokens"]) == len(tok.encode(text)) < len(text)
  assert "".join(summary["tokens"]) == text
  span = explain.explain_workdir(
    hf_workdir, "def f(x):", "saliency", continuation="\n  return x", metrics=False
  )
  assert len(span["attributions"]) == len(tok.encode(text))
  code, _, err = cli("attribute", "--workdir", hf_workdir, "--input", "x", "--method", "saliency",
                     "--token", "return value")  # fmt: skip
  assert code == 2 and "one token of the run's tokenizer" in err


def test_vocab_mismatch_exits_2_with_one_line(tmp_path, cli):
  args = ["train", "--recipe", "demo", "--workdir", str(tmp_path / "run")]
  code, _, err = cli(*args, "--set", f"data.tokenizer={HF_SPEC}")  # demo: vocab_size 256.
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert "model.vocab_size=256" in lines[0] and "512 tokens" in lines[0]
  code, _, err = cli(*args, "--set", "data.tokenizer=sentencepiece")
  assert code == 2 and "data.tokenizer='sentencepiece'" in err and len(err.splitlines()) == 1
  code, _, err = cli(*args, "--set", f"data.tokenizer=hf:{tmp_path}/none", "--set",
                     "model.vocab_size=512")  # fmt: skip
  assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


# --- save_pretrained -------------------------------------------------------------------------


def _tiny_transformer(vocab_size: int):
  from fulcrum.modules import build

  model = build(
    dict(arch="transformer", vocab_size=vocab_size, d_model=16, num_layers=1, num_heads=2)
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))
  rng = np.random.default_rng(0)
  return model, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_save_pretrained_writes_tokenizer_and_generation_config(tmp_path):
  tok = tokenizer_lib.get_tokenizer(HF_SPEC)
  model, variables = _tiny_transformer(512)
  sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
  hf.save_pretrained(model, variables, tmp_path, tokenizer=tok, generation_config=sampling)
  generation = json.loads((tmp_path / "generation_config.json").read_text())
  assert generation == {"eos_token_id": 0, **sampling}
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "<|endoftext|>"
  loaded, _ = hf.load_pretrained(tmp_path)
  assert loaded.config.vocab_size == 512
  again = tokenizer_lib.get_tokenizer(f"hf:{tmp_path}")
  text = stdlib_text("textwrap.py")[:2000] + EXTRA
  assert list(again.encode(text, add_eos=True)) == list(tok.encode(text, add_eos=True))
  assert again.decode(again.encode(text)) == text and again.vocab_size == 512
  # Saved again without a tokenizer: none written or removed; generation_config.json as given.
  hf.save_pretrained(model, variables, tmp_path, generation_config={"top_k": 5})
  assert (tmp_path / "tokenizer.json").exists()
  assert json.loads((tmp_path / "generation_config.json").read_text()) == {"top_k": 5}
  # With bytes: no stale tokenizer.json is left to pass for the model's.
  hf.save_pretrained(model, variables, tmp_path, tokenizer=tokenizer_lib.get_tokenizer("bytes"))
  assert not (tmp_path / "tokenizer.json").exists()
  assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 0}


def test_save_pretrained_refuses_a_tokenizer_larger_than_the_model(tmp_path):
  model, variables = _tiny_transformer(256)
  with pytest.raises(UserError, match="the model's vocab_size=256 is smaller than the 512"):
    hf.save_pretrained(model, variables, tmp_path, tokenizer=tokenizer_lib.get_tokenizer(HF_SPEC))
  with pytest.raises(UserError, match="generation_config is not JSON"):
    hf.save_pretrained(model, variables, tmp_path, generation_config={"x": object()})
