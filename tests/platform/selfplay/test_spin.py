"""SPIN end to end on a tiny model: SFT on generated instructions, then self-play iterations with
per-iteration rows, resume mid-iteration equal to an uninterrupted run, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import launch
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.errors import UserError
from fulcrum.platform.selfplay import driver
from fulcrum.platform.selfplay import pairs as pairs_lib
from fulcrum.platform.training import trainer

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

TINY = {
  "train.seq_len": 48,
  "train.batch_size": 8,
  "train.eval_batches": 2,
  "train.progress": False,
  "train.eval_every": 0,
  "model.d_model": 32,
  "model.num_layers": 2,
  "model.num_heads": 2,
  "data.instruct_train_size": 600,
  "data.instruct_eval_size": 100,
  "data.instruct_eval_prompts": 16,
  "data.instruct_families": "add,reverse",
  "optimizer.warmup_steps": 2,
}


def _config(recipe: str, tmp_path, **extra):
  config = recipes.get(recipe)
  values = {**TINY, "data.data_dir": str(tmp_path / "tfds"), **extra}
  config_lib.apply_overrides(config, [f"{k}={v}" for k, v in values.items()])
  return config


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
  root = tmp_path_factory.mktemp("spin")
  config = _config("instruct_sft", root, **{"train.steps": 12, "train.checkpoint_every": 12})
  result = trainer.train(config, root / "sft")
  assert 0.0 <= result["eval/exact_match"] <= 1.0 and "eval/response_bits_per_byte" in result
  return root


def _spin_config(root, **extra):
  base = {
    "spin.init_from": str(root / "sft"),
    "spin.iterations": 2,
    "spin.num_prompts": 16,
    "spin.steps": 4,
    "train.checkpoint_every": 2,
    "train.async_checkpointing": False,
  }
  return _config("spin", root, **{**base, **extra})


def _final_params(workdir, t):
  _, state, step = workdir_lib.load(driver.iteration_dir(workdir_lib.resolve(workdir), t))
  return step, jax.device_get(state.params)


def test_spin_runs_iterations_and_logs_a_row_each(sft):
  out = launch.train(_spin_config(sft), sft / "spin")
  rows = [json.loads(x) for x in (sft / "spin" / "metrics.jsonl").read_text().splitlines()]
  assert [r["iteration"] for r in rows] == [0, 1]
  for r in rows:
    for key in ("eval/exact_match", "spin/reward_accuracy", "spin/logp_real",
                "spin/logp_generated", "spin/generation_tokens_per_s"):  # fmt: skip
      assert np.isfinite(r[key]), key
  assert "SPIN iteration 1" in out["table"] and "SFT (θ_0)" in out["table"]
  # Each iteration keeps its pairs, samples and an orbax checkpoint at spin.steps.
  for t in range(2):
    d = sft / "spin" / "iterations" / str(t)
    arrays, meta = pairs_lib.load(d / "pairs.npz")
    assert len(arrays["opponent_real"]) == 16 and meta["iteration"] == t
    assert _final_params(sft / "spin", t)[0] == 4
  # The top-level workdir reads as its newest iteration (eval / decode).
  assert workdir_lib.checkpointed_run(sft / "spin").name == "1"
  # Rerunning a finished SPIN run trains nothing more and reports the same rows.
  again = launch.train(_spin_config(sft), sft / "spin")
  assert again["rows"] == out["rows"]


def test_stored_opponent_logprobs_equal_a_fresh_pass_of_theta_0(sft):
  """Iteration 0's cached log-probs are θ_0's (the SFT checkpoint's) on the stored rows."""
  if not (sft / "spin" / "iterations" / "0" / "pairs.npz").exists():
    launch.train(_spin_config(sft), sft / "spin")
  arrays, _ = pairs_lib.load(sft / "spin" / "iterations" / "0" / "pairs.npz")
  exp, state, _ = workdir_lib.load(sft / "sft")
  for side in pairs_lib.SIDES:
    fresh = pairs_lib.score(exp.model, state.params, pairs_lib.side_rows(arrays, side))
    np.testing.assert_allclose(arrays[f"opponent_{side}"], fresh, rtol=1e-5, atol=1e-5)


def test_resume_mid_iteration_equals_an_uninterrupted_run(sft, monkeypatch):
  whole = sft / "whole"
  launch.train(_spin_config(sft), whole)
  # Stop (as a SIGTERM would) after step 2 of iteration 1, then rerun the same command.
  calls = {"n": 0}
  original = trainer.StopSignal.agreed

  def stop_in_iteration_1(self, step):
    calls["n"] += 1
    return calls["n"] == 4 + 2 or original(self, step)  # 4 steps of iteration 0, then 2.

  cut = sft / "cut"
  monkeypatch.setattr(trainer.StopSignal, "agreed", stop_in_iteration_1)
  first = launch.train(_spin_config(sft), cut)
  assert first.get("preempted") and [r["iteration"] for r in first["rows"][1:]] == [0]
  monkeypatch.setattr(trainer.StopSignal, "agreed", original)
  launch.train(_spin_config(sft), cut)
  for t in range(2):
    (s1, p1), (s2, p2) = _final_params(whole, t), _final_params(cut, t)
    assert s1 == s2 == 4
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
      np.testing.assert_array_equal(a, b)
  rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
  assert [r["eval/exact_match"] for r in rows(whole)] == [r["eval/exact_match"] for r in rows(cut)]


def test_mix_previous_and_nll_term_train(sft):
  out = launch.train(
    _spin_config(sft, **{"spin.mix_previous": True, "spin.nll_weight": 0.5, "spin.loss": "hinge"}),
    sft / "mixed",
  )
  arrays, meta = pairs_lib.load(sft / "mixed" / "iterations" / "1" / "pairs.npz")
  assert meta["new_pairs"] == 16 and len(arrays["opponent_real"]) == 32
  assert np.isfinite(out["spin/loss"])


def test_missing_init_from_is_one_line(sft, tmp_path, cli):
  base = ["train", "--recipe", "spin", "--workdir", str(tmp_path / "w")]
  code, out, err = cli(*base, "--set", "spin.init_from=")
  assert code == 2 and "spin.init_from is empty" in err and "Traceback" not in err
  code, out, err = cli(*base, "--set", f"spin.init_from={tmp_path / 'nowhere'}")
  assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1


def test_an_iteration_config_cannot_run_without_its_pairs(sft):
  config = driver.iteration_config(_spin_config(sft), 0, workdir_lib.resolve(sft / "nope"))
  with pytest.raises(UserError, match="spin.pairs"):
    trainer.train(config, sft / "nope" / "iterations" / "0")


def test_generation_is_one_compiled_call_per_chunk(sft, monkeypatch):
  """y' for every prompt of a chunk comes from one call of the compiled decode loop (a
  lax.while_loop over tokens): no Python runs per token."""
  from fulcrum.platform.data import instruct_pipeline
  from fulcrum.platform.training.tasks import instruction_following as task

  config = _config("instruct_sft", sft)
  exp, state, _ = workdir_lib.load(sft / "sft")
  problems = instruct_pipeline.eval_problems(config.data, "validation", 12)
  calls = []
  real = task.generate

  def counting(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append(int(out.lengths.sum()))
    return out

  monkeypatch.setattr(task, "generate", counting)
  texts, ids, _ = task.answers(exp.model, state.params, task.get_tokenizer(config), problems,
                               max_new_tokens=8)  # fmt: skip
  assert len(calls) == 1 and calls[0] == sum(len(i) for i in ids) > len(problems)
  monkeypatch.setattr(task, "ANSWER_BATCH", 5)
  texts_chunked, _, _ = task.answers(
    exp.model, state.params, task.get_tokenizer(config), problems, max_new_tokens=8
  )
  assert len(calls) == 1 + 3 and texts_chunked == texts  # 12 prompts in chunks of 5: 3 calls.


def test_a_source_trained_further_is_refused_not_mixed(tmp_path):
  """Iterations started from θ_0 at one step of the SFT run; after the SFT run trains on, a
  resume would start later iterations from another model: refused, nothing written."""
  sft = _config("instruct_sft", tmp_path, **{"train.steps": 4, "train.checkpoint_every": 4})
  trainer.train(sft, tmp_path / "sft")
  spin = _spin_config(tmp_path, **{"spin.iterations": 1, "spin.steps": 2})
  launch.train(spin, tmp_path / "spin")
  config_lib.apply_overrides(sft, ["train.steps=6"])
  trainer.train(sft, tmp_path / "sft")
  before = sorted(str(p) for p in (tmp_path / "spin").rglob("*"))
  with pytest.raises(UserError, match="started SPIN from step 4 .* now holds step 6"):
    launch.train(spin, tmp_path / "spin")
  assert sorted(str(p) for p in (tmp_path / "spin").rglob("*")) == before
