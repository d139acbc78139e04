"""Every recipe builds, validates and runs one train step."""

import numpy as np
import pytest

from fulcrum import recipes
from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.training import trainer

# One step of each recipe: compiling dominates, so XLA's optimisation passes are off.
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def test_names_and_descriptions():
  assert {"demo", "lm_transformer"} <= set(recipes.names())
  for name in recipes.names():
    assert recipes.describe(name), f"recipe {name} needs a docstring"


@pytest.mark.parametrize("name", recipes.names())
def test_recipe_builds_and_runs_a_step(name, tiny_corpus, tmp_path):
  config = recipes.get(name)
  sections.validate(config)
  # Real model sizes, a small batch (and short text sequences): the recipe must build and
  # take a step on a batch from its own task's data pipeline, as written.
  overrides = ["train.batch_size=2", "train.grad_accum_steps=1"]
  if config.task == "lm":
    overrides += [
      f"data.text_files={tiny_corpus['text_files']}",
      f"data.data_dir={tiny_corpus['data_dir']}",
      "train.seq_len=16",
    ]
  if config.task in ("instruct", "spin"):
    overrides += [f"data.data_dir={tiny_corpus['data_dir']}", "data.instruct_train_size=200"]
  if config.task == "spin":  # An iteration's run, on pairs as the driver stores them.
    overrides.append(f"spin.pairs={_random_pairs(config, tmp_path)}")
  if config.task == "agent_improve":  # An iteration's run, on rollout rows as the driver stores.
    overrides.append(f"improve.rollouts={_random_rollouts(config, tmp_path)}")
  if config.task == "ppo":  # Its own loop: tests/platform/agents/test_ppo.py compiles and runs it.
    _trace_a_ppo_update(config)
    return
  config_lib.apply_overrides(config, overrides)
  exp = trainer.build_experiment(config)
  state = exp.init_state()
  step = trainer.jit_train_step(exp)
  batch = next(exp.task.train_iterator(0, 1))
  with exp.activate():
    state, metrics = step(state, trainer.global_batch(exp, batch))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def _random_pairs(config, tmp_path) -> str:
  from fulcrum.platform.selfplay import pairs

  rng = np.random.default_rng(0)
  arrays = {}
  for side in pairs.SIDES:
    rows = [
      pairs.encode_row(rng.integers(1, 256, 12), rng.integers(1, 256, 8), config.train.seq_len)
      for _ in range(4)
    ]
    arrays.update(
      {f"{side}_{k}": np.stack([r[i] for r in rows]) for i, k in enumerate(pairs.ROW_KEYS)}
    )
    arrays[f"opponent_{side}"] = rng.normal(-30, 5, 4).astype(np.float32)
  path = tmp_path / "pairs.npz"
  pairs.save(path, arrays, {"iteration": 0, "new_pairs": 4})
  return str(path)


def _random_rollouts(config, tmp_path) -> str:
  from fulcrum.platform.agents import demos, evaluation
  from fulcrum.platform.data.instruct_pipeline import masked_row
  from fulcrum.platform.selfplay import pairs

  rng = np.random.default_rng(0)
  n = demos.seq_len(evaluation.interface(config))
  rows = [masked_row(rng.integers(1, 256, 40), 30, n) for _ in range(4)]
  arrays = {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "weights")}
  arrays["advantage"] = rng.normal(size=4).astype(np.float32)
  arrays["demo"] = np.array([0, 0, 0, 1], np.float32)
  arrays["old_logp"] = rng.normal(-20, 3, 4).astype(np.float32)
  path = tmp_path / "rollouts.npz"
  pairs.save(path, arrays, {"iteration": 0})
  return str(path)


def _trace_a_ppo_update(config) -> None:
  """The recipe's runner and one update traced at its real sizes (no compile)."""
  import jax

  from fulcrum.platform.agents import ppo

  runner = jax.eval_shape(ppo._init_fn(ppo._key(config.ppo), config.train.seed))
  after, metrics = jax.eval_shape(ppo.make_update(config.ppo), runner)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), after) == jax.tree.map(
    lambda x: (x.shape, x.dtype), runner
  )
  assert metrics["achievements"].shape == (22,)


def test_recipes_are_locked():
  config = recipes.get("demo")
  with pytest.raises(AttributeError):
    config.model.not_a_key = 1


def test_make_demo_run_samples_with_no_flags():
  """`fulcrum decode` on the `make demo` run (recipe lm_quick) samples with nucleus sampling by
  default: greedy decoding of a model that small repeats one line."""
  from fulcrum.platform.decode import Sample, strategies

  value, sampling = strategies.from_config(recipes.get("lm_quick").decode)
  assert isinstance(value, Sample)
  assert not sampling.greedy and sampling.top_p < 1
