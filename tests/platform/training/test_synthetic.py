"""Synthetic sequence tasks: generator invariants, determinism, resume, and the task's metrics."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform.data import synthetic
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks import get_task


def test_selective_copying_answers_are_the_data_tokens_in_order():
  for i in range(20):
    ex = synthetic.selective_copying(np.random.default_rng(i), length=32, vocab=8, num_tokens=6)
    content = ex["inputs"][:32]
    assert (ex["inputs"][32:] == 9).all()  # Copy markers.
    answers = ex["targets"][ex["weights"] == 1]
    np.testing.assert_array_equal(answers, content[content != 0])
    assert ex["weights"].sum() == 6 and (answers >= 1).all() and (answers <= 8).all()


def test_induction_heads_answer_follows_the_first_trigger():
  for i in range(20):
    ex = synthetic.induction_heads(np.random.default_rng(i), length=40, vocab=16)
    tokens = ex["inputs"]
    first = int(np.flatnonzero(tokens == 17)[0])
    assert tokens[-1] == 17 and first < 38
    assert ex["targets"][-1] == tokens[first + 1] and ex["weights"].sum() == 1


def test_mqar_queries_recall_their_values():
  ex = synthetic.multi_query_recall(np.random.default_rng(0), length=30, vocab=40, num_pairs=8)
  pairs = dict(zip(ex["inputs"][0:16:2], ex["inputs"][1:16:2], strict=True))
  queries = ex["inputs"][-8:]
  np.testing.assert_array_equal(ex["targets"][-8:], [pairs[q] for q in queries])
  assert len(ex["inputs"]) == 30 and ex["weights"].sum() == 8


def test_examples_are_a_function_of_seed_and_index():
  a = synthetic.dataset("induction_heads", seed=3, size=10, length=16, vocab=8)
  b = synthetic.dataset("induction_heads", seed=3, size=10, length=16, vocab=8)
  c = synthetic.dataset("induction_heads", seed=4, size=10, length=16, vocab=8)
  np.testing.assert_array_equal(a[7]["inputs"], b[7]["inputs"])
  assert not np.array_equal(a[7]["inputs"], c[7]["inputs"])


def _task(name, *overrides):
  config = recipes.get(name)
  config_lib.apply_overrides(config, ["train.batch_size=4", *overrides])
  return get_task(config)


def test_iterator_resumes_exactly():
  task = _task("synthetic_selective_copying")
  it = task.train_iterator(0, 1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  again = task.train_iterator(0, 1)
  again.set_state(state)
  for batch in want:
    got = next(again)
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])


def test_hosts_get_disjoint_halves():
  task = _task("synthetic_mqar")
  a, b = next(task.train_iterator(0, 2)), next(task.train_iterator(1, 2))
  assert a["inputs"].shape == (2, 64) and not np.array_equal(a["inputs"], b["inputs"])


def test_eval_sets_cover_length_multiples():
  task = _task("synthetic_induction_heads", "train.eval_batches=1")
  sets = task.eval_sets(0, 1)
  assert {k: v[0]["inputs"].shape[1] for k, v in sets.items()} == {"": 64, "4x": 256, "16x": 1024}


def test_accuracy_of_an_oracle_and_of_a_wrong_model():
  task = _task("synthetic_selective_copying")
  batch = next(task.train_iterator(0, 1))
  oracle = jnp.asarray(np.eye(10)[batch["targets"]] * 10.0)
  sums = task.eval_sums(oracle, {k: jnp.asarray(v) for k, v in batch.items()})
  assert task.eval_metrics({k: float(v) for k, v in sums.items()})["accuracy"] == 1.0
  wrong = jnp.asarray(np.eye(10)[(batch["targets"] + 1) % 10] * 10.0)
  sums = task.eval_sums(wrong, {k: jnp.asarray(v) for k, v in batch.items()})
  assert task.eval_metrics({k: float(v) for k, v in sums.items()})["accuracy"] == 0.0


@pytest.mark.parametrize(
  "override,match",
  [
    ("train.seq_len=50", "train.seq_len=80"),
    ("model.vocab_size=5", "model.vocab_size"),
  ],
)
def test_bad_settings_are_user_errors(override, match):
  with pytest.raises(UserError, match=match):
    _task("synthetic_selective_copying", override)
