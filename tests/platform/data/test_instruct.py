"""Tests for checkable instruction data: families and checkers, splits, SFT pipelines."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from fulcrum.platform.data import ByteTokenizer, instruct, instruct_pipeline, instruct_problems
from fulcrum.platform.errors import UserError
from fulcrum.platform.sections import base_config

TOK = ByteTokenizer()
SNIPPET_HEAD_BYTES = 24  # "first imported module:\n", the longest snippet family's head.


def _data_cfg(data_dir, **values):
  """The base data section plus the instruct keys (as a recipe base adds them), tiny sizes."""
  cfg = base_config().data
  for key, value in instruct.config_defaults().items():
    cfg[key] = value
  cfg.data_dir = str(data_dir)
  cfg.instruct_train_size = 400
  cfg.instruct_eval_size = 48
  for key, value in values.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("instruct_tfds")


@pytest.fixture
def tiny_add(monkeypatch):
  """Single-digit addition: 81 distinct prompts, so held-out splits collide without dedupe."""
  small = dataclasses.replace(instruct_problems.DIFFICULTY, add_digits=(1, 1))
  monkeypatch.setattr(instruct_problems, "DIFFICULTY", small)


def _problems(family, n=300, seed=0):
  rng = np.random.default_rng(seed)
  return [instruct.generate(family, rng) for _ in range(n)]


# --- Families and checkers ---------------------------------------------------------------------


@pytest.mark.parametrize("family", instruct.FAMILIES)
def test_generated_problems_pass_their_checker_and_wrong_answers_fail(family):
  problems = _problems(family)
  assert len({p.instruction for p in problems}) > len(problems) // 2  # Not a constant.
  for p in problems:
    assert p.family == family
    assert instruct.check(p, p.response), p
    assert instruct.check(p, f"  {p.response}\n"), p  # Surrounding whitespace is fine.
    assert not instruct.check(p, p.response + "7"), p
    assert not instruct.check(p, ""), p
  # Another problem's right answer is wrong here (where the two answers differ).
  for p, q in zip(problems, problems[1:], strict=False):
    if q.response != p.response:
      assert not instruct.check(p, q.response), (p, q)


@pytest.mark.parametrize("family", instruct.FAMILIES)
def test_checker_recomputes_the_answer_from_the_instruction(family):
  """A corrupted stored response changes nothing: the checker solves the instruction."""
  for p in _problems(family, n=50):
    corrupted = dataclasses.replace(p, response=p.response + "7")
    assert instruct.check(corrupted, p.response)
    assert not instruct.check(corrupted, corrupted.response)


@pytest.mark.parametrize(
  "instruction, response, answer, ok",
  [
    ("add 482 and 39", "521", "521", True),
    ("add 482 and 39", "521", "0521", False),  # Canonical decimals only.
    ("add 482 and 39", "521", "+521", False),
    ("multiply 48 by 7", "336", "336", True),
    ("sort 9 3 11", "3 9 11", "3  9\t11", True),  # Any whitespace between items.
    ("sort 9 3 11", "3 9 11", "3,9,11", False),
    ("reverse the list 1 22 3", "3 22 1", "3 22 1", True),
    ("reverse the word abc", "cba", "cba", True),
    ('count "a" in "abacab"', "3", "3", True),
    ("convert 5 to binary", "101", "0b101", True),  # The base's prefix is allowed,
    ("convert 5 to binary", "101", "0x101", False),  # another base's is not,
    ("convert 5 to binary", "101", "0101", False),  # nor leading zeros.
    ("convert 255 to hex", "ff", "0XFF", True),
    ("name the function:\nx = 1\ndef spam(a):\n  return a", "spam", "spam", True),
    ("first imported module:\n'''doc'''\nfrom os import path\nimport sys", "os", "os", True),
    ("first imported module:\n'''doc'''\nfrom os import path\nimport sys", "os", "sys", False),
  ],
)
def test_checker_accepts_exactly_the_documented_equivalents(instruction, response, answer, ok):
  problem = instruct.Problem(_family_of(instruction), instruction, response)
  assert instruct.check(problem, response)
  assert instruct.check(problem, answer) is ok


_KINDS = {  # Which family an instruction above belongs to (by its wording).
  "add": lambda s: "add" if s.startswith("add ") else "",
  "mul": lambda s: "mul" if s.startswith("multiply ") else "",
  "sort": lambda s: "sort" if s.startswith("sort ") else "",
  "reverse": lambda s: "reverse" if s.startswith("reverse ") else "",
  "count": lambda s: "count" if s.startswith("count ") else "",
  "base": lambda s: "base" if s.startswith("convert ") else "",
  "funcname": lambda s: "funcname" if s.startswith("name the function") else "",
  "firstimport": lambda s: "firstimport" if s.startswith("first imported") else "",
}


def test_prompts_and_responses_are_short():
  for family in instruct.FAMILIES:
    problems = _problems(family, n=500)
    prompts = [len(instruct.prompt_text(p).encode()) for p in problems]
    limit = 60 if family not in instruct_problems.STDLIB_FAMILIES else 160 + SNIPPET_HEAD_BYTES
    assert max(prompts) <= limit, (family, max(prompts))
    assert max(len(p.response.encode()) for p in problems) <= 24, family


def test_generate_is_a_function_of_the_rng_state_and_rejects_unknown_families():
  for family in instruct.FAMILIES:
    assert _problems(family, n=20, seed=3) == _problems(family, n=20, seed=3)
  with pytest.raises(ValueError, match="add, mul"):
    instruct.generate("division", np.random.default_rng(0))


def test_snippet_families_hold_one_def_and_name_the_first_import():
  for p in _problems("funcname", n=200):
    snippet = p.instruction.partition("\n")[2]
    assert re.findall(r"\bdef\s+(\w+)", snippet) == [p.response], snippet
    assert len(snippet.encode()) <= instruct_problems.DIFFICULTY.snippet_bytes
  for p in _problems("firstimport", n=200):
    lines = p.instruction.split("\n")[1:]
    first = next(s.strip() for s in lines if s.strip().startswith(("import ", "from ")))
    assert first.split()[1].rstrip(",") == p.response, p.instruction


# --- Config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("instruct_families", "add,division", "add, mul, sort"),
    ("instruct_families", "add,", "unknown"),
    ("instruct_seed", -1, "instruct_seed"),
    ("instruct_train_size", 0, "instruct_train_size"),
    ("instruct_eval_size", 0, "instruct_eval_size"),
  ],
)
def test_bad_config_values_raise_a_value_error_naming_the_fix(tmp_path, key, value, match):
  cfg = _data_cfg(tmp_path)
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    instruct.validate_config(cfg)
  with pytest.raises(UserError, match=match):
    instruct.load_split(cfg, "train")


def test_defaults_validate_and_families_parse():
  defaults = instruct.config_defaults()
  instruct.validate_config(defaults)
  assert defaults.instruct_eval_size >= 1000
  assert instruct.families("") == instruct.FAMILIES
  assert instruct.families(" sort, add ") == ("add", "sort")  # FAMILIES order.


def test_unknown_split_is_a_user_error(data_dir):
  with pytest.raises(UserError, match="train, validation, test"):
    instruct.load_split(_data_cfg(data_dir), "train[:90%]")


# --- Splits ------------------------------------------------------------------------------------


def _prompts(problems):
  return {p.instruction for p in problems}


def test_splits_have_their_sizes_and_interleave_the_families(data_dir):
  cfg = _data_cfg(data_dir)
  splits = {s: instruct.load_split(cfg, s) for s in instruct.SPLITS}
  assert [len(splits[s]) for s in instruct.SPLITS] == [400, 48, 48]
  for problems in splits.values():
    fams = instruct.FAMILIES
    assert [p.family for p in problems] == [fams[i % len(fams)] for i in range(len(problems))]
    assert all(instruct.check(p, p.response) for p in problems)


def test_held_out_prompts_are_distinct_and_never_in_train(tmp_path, tiny_add):
  # 81 single-digit sums: without dedupe the splits would share many prompts.
  cfg = _data_cfg(tmp_path, instruct_families="add", instruct_train_size=300)
  cfg.instruct_eval_size = 30
  train, val, test = (instruct.load_split(cfg, s) for s in instruct.SPLITS)
  assert len(_prompts(val)) == len(val) and len(_prompts(test)) == len(test)
  assert not _prompts(val) & _prompts(test)
  assert not _prompts(train) & (_prompts(val) | _prompts(test))
  assert len(_prompts(train)) <= 81 - 60  # Train repeats what is left.


def test_a_family_too_small_for_the_held_out_sizes_names_the_fix(tmp_path, tiny_add):
  cfg = _data_cfg(tmp_path, instruct_families="add", instruct_eval_size=50)
  with pytest.raises(UserError, match="lower data.instruct_eval_size"):
    instruct.load_split(cfg, "test")


def test_splits_are_deterministic_per_seed(data_dir, tmp_path):
  cfg = _data_cfg(data_dir, instruct_families="add,sort,funcname")
  again = _data_cfg(tmp_path / "fresh", instruct_families="add,sort,funcname")
  other = _data_cfg(data_dir, instruct_families="add,sort,funcname", instruct_seed=1)
  for split in instruct.SPLITS:
    assert instruct.load_split(cfg, split) == instruct.load_split(again, split)
    assert _prompts(instruct.load_split(cfg, split)) != _prompts(instruct.load_split(other, split))


def test_settings_name_distinct_data(tiny_add):
  cfg = _data_cfg("")
  name = lambda **kw: instruct.Settings.from_config(_data_cfg("", **kw)).config_name
  base = name()
  assert base == instruct.Settings.from_config(cfg).config_name
  changed = [
    name(instruct_seed=1),
    name(instruct_train_size=401),
    name(instruct_eval_size=49),
    name(instruct_families="add"),
  ]
  assert len({base, *changed}) == 5
  with pytest.MonkeyPatch.context() as m:  # A difficulty knob is part of the identity.
    m.setattr(instruct_problems, "DIFFICULTY", instruct_problems.Difficulty())
    assert name() != base


def test_dropping_a_family_keeps_the_others_problems(data_dir):
  both = instruct.load_split(_data_cfg(data_dir, instruct_families="add,sort"), "test")
  alone = instruct.load_split(_data_cfg(data_dir, instruct_families="add"), "test")
  assert [p for p in both if p.family == "add"] == alone[: len(both) // 2]


# --- SFT examples and pipelines ----------------------------------------------------------------


def test_encode_example_masks_the_prompt():
  problem = instruct.Problem("add", "add 482 and 39", "521")
  prompt = instruct.prompt_text(problem)
  n = len(prompt) + len("521") + 1 - 1  # Target positions: tokens minus one.
  ex = instruct_pipeline.encode_example(problem, TOK, seq_len=n + 5)
  assert ex["inputs"].dtype == np.int32 and ex["weights"].dtype == np.float32
  assert int(ex["prompt_len"]) == len(prompt)
  np.testing.assert_array_equal(ex["inputs"][:n], TOK.encode(prompt + "521"))
  np.testing.assert_array_equal(ex["targets"][:n], TOK.encode(prompt[1:] + "521", add_eos=True))
  want = np.zeros(n + 5, np.float32)
  want[len(prompt) - 1 : n] = 1.0  # "5", "2", "1", EOS.
  np.testing.assert_array_equal(ex["weights"], want)
  assert TOK.decode(ex["targets"][ex["weights"] > 0]) == "521"
  assert ex["targets"][ex["weights"] > 0][-1] == TOK.EOS_ID
  assert not ex["inputs"][n:].any() and not ex["targets"][n:].any()
  assert instruct_pipeline.encode_example(problem, TOK, seq_len=n) is not None
  assert instruct_pipeline.encode_example(problem, TOK, seq_len=n - 1) is None


def _iterator(cfg, **kw):
  args = dict(seq_len=48, batch_size=8, seed=0, process_index=0, process_count=1) | kw
  return instruct_pipeline.train_iterator(cfg, TOK, **args)


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    for x, y in zip(a, b, strict=True)
  )


def test_train_batches_are_masked_sft_rows(data_dir, capsys):
  cfg = _data_cfg(data_dir)
  batch = next(_iterator(cfg))
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 48)
  assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
  for row in range(8):
    w, t = batch["weights"][row], batch["targets"][row]
    problem_text = TOK.decode(batch["inputs"][row]) + TOK.decode(t[-1:])
    answer = TOK.decode(t[w > 0])
    prompt, _, _ = problem_text.rpartition("\n=")
    assert instruct.check(instruct.Problem(_family_of(prompt), prompt, answer), answer)
    assert t[w > 0][-1] == TOK.EOS_ID
  assert "skipping" in capsys.readouterr().err  # 48 tokens cannot hold every snippet.


def _family_of(instruction: str) -> str:
  return next(f for f, kind in _KINDS.items() if kind(instruction))


def test_train_iterator_resumes_exactly_across_epochs(data_dir):
  cfg = _data_cfg(data_dir, instruct_families="add,count")
  full = [next(it) for it in [_iterator(cfg)] for _ in range(60)]  # 50 batches per epoch.
  first = _iterator(cfg)
  for _ in range(45):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = _iterator(cfg)
  resumed.set_state(state)
  assert _equal([next(resumed) for _ in range(15)], full[45:])
  assert not _equal(full[:10], full[50:60])  # The second epoch is reshuffled.
  with pytest.raises(UserError, match="seed"):
    _iterator(cfg, seed=1).set_state(state)


def test_hosts_read_disjoint_rows_of_one_stream(data_dir):
  cfg = _data_cfg(data_dir, instruct_families="add,mul")
  whole = next(_iterator(cfg))["inputs"]
  hosts = [next(_iterator(cfg, process_index=i, process_count=2))["inputs"] for i in range(2)]
  assert hosts[0].shape == (4, 48)
  rows = lambda a: {r.tobytes() for r in a}
  assert rows(hosts[0]) | rows(hosts[1]) == rows(whole) and not rows(hosts[0]) & rows(hosts[1])


def test_eval_batches_are_fixed_and_sliced_per_host(data_dir):
  cfg = _data_cfg(data_dir)
  args = dict(split="validation", seq_len=200, batch_size=8, num_batches=8)
  one = instruct_pipeline.eval_batches(cfg, TOK, **args)
  assert _equal(one, instruct_pipeline.eval_batches(cfg, TOK, **args))
  halves = [
    instruct_pipeline.eval_batches(cfg, TOK, **args, process_index=i, process_count=2)
    for i in range(2)
  ]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True)]
  assert _equal(one, joined)
  # 48 validation problems fill 6 batches; batch 7 wraps around to the first.
  assert _equal(one[6:7], one[0:1])
  val = instruct.load_split(cfg, "validation")
  assert TOK.decode(one[0]["targets"][0][one[0]["weights"][0] > 0]) == val[0].response


def test_eval_problems_and_sizes_that_cannot_work(data_dir):
  cfg = _data_cfg(data_dir)
  assert instruct_pipeline.eval_problems(cfg, "test", 5) == instruct.load_split(cfg, "test")[:5]
  with pytest.raises(UserError, match="instruct_eval_size"):
    instruct_pipeline.eval_problems(cfg, "test", 49)
  with pytest.raises(UserError, match="train.seq_len"):
    _iterator(cfg, seq_len=8)
  with pytest.raises(UserError, match="divide"):
    _iterator(cfg, batch_size=7, process_count=2)
