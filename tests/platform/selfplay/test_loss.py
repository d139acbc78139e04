"""The SPIN objective against a NumPy reference, and its invariants at θ = θ_t."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.modules import LM, ModelConfig
from fulcrum.platform.selfplay import loss as spin
from fulcrum.platform.selfplay import pairs


def _reference(real, gen, opp_real, opp_gen, beta, kind):
  h = beta * ((real - opp_real) - (gen - opp_gen))
  if kind == "logistic":
    return -np.log(1.0 / (1.0 + np.exp(-h)))
  return np.maximum(0.0, 1.0 - h)


@pytest.mark.parametrize("kind", spin.LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_spin_loss_matches_numpy(kind, beta):
  rng = np.random.default_rng(0)
  real, gen, opp_real, opp_gen = (rng.normal(-20, 8, 64).astype(np.float32) for _ in range(4))
  h = spin.margin(real, gen, opp_real, opp_gen, beta)
  got = np.asarray(spin.spin_loss(h, kind))
  want = _reference(*(x.astype(np.float64) for x in (real, gen, opp_real, opp_gen)), beta, kind)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hand_made_values():
  # h = 0.1 * ((-3 - -5) - (-4 - -2)) = 0.1 * (2 + 2) = 0.4
  h = spin.margin(jnp.array([-3.0]), jnp.array([-4.0]), jnp.array([-5.0]), jnp.array([-2.0]), 0.1)
  np.testing.assert_allclose(np.asarray(h), [0.4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(spin.spin_loss(h, "logistic")), [np.log1p(np.exp(-0.4))])
  np.testing.assert_allclose(np.asarray(spin.spin_loss(h, "hinge")), [0.6], rtol=1e-6)


def test_logistic_loss_is_stable_for_large_margins():
  h = jnp.array([-1e4, 1e4], jnp.float32)
  out = np.asarray(spin.spin_loss(h, "logistic"))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, [1e4, 0.0], rtol=1e-6)


def test_unknown_loss_is_refused():
  with pytest.raises(ValueError, match="hinge"):
    spin.spin_loss(jnp.zeros(2), "sigmoid")


def test_sequence_logprobs_sum_only_weighted_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum(-1)
  got, counts = spin.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), weights)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(counts), [2, 4])


def _tiny_model():
  config = ModelConfig(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1)
  model = LM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def _random_pairs(n=6, seq_len=12, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for side in pairs.SIDES:
    rows = [
      pairs.encode_row(
        rng.integers(1, 256, rng.integers(2, 6)), rng.integers(1, 256, rng.integers(1, 6)), seq_len
      )
      for _ in range(n)
    ]
    for i, k in enumerate(pairs.ROW_KEYS):
      out[f"{side}_{k}"] = np.stack([r[i] for r in rows])
  return out


def test_at_the_opponent_loss_is_log2_and_gradient_is_the_logprob_gap():
  """At θ = θ_t: h = 0, ℓ = log 2, ∇ℓ = −β/2 · ∇ mean(log p_θ(y) − log p_θ(y')); the cached
  opponent log-probs (one scoring pass) equal a fresh forward pass."""
  model, params = _tiny_model()
  arrays = _random_pairs()
  beta = 0.3
  for side in pairs.SIDES:
    arrays[f"opponent_{side}"] = pairs.score(model, params, pairs.side_rows(arrays, side))

  def side_logp(p, side):
    rows = pairs.side_rows(arrays, side)
    logits = model.apply({"params": p}, jnp.asarray(rows["inputs"]))
    return spin.sequence_logprobs(logits, jnp.asarray(rows["targets"]), rows["weights"])[0]

  def loss(p):
    h = spin.margin(
      side_logp(p, "real"), side_logp(p, "generated"),
      arrays["opponent_real"], arrays["opponent_generated"], beta,
    )  # fmt: skip
    return spin.spin_loss(h, "logistic").mean()

  np.testing.assert_allclose(float(jax.jit(loss)(params)), np.log(2.0), rtol=1e-5)
  fresh = np.asarray(jax.jit(side_logp, static_argnums=1)(params, "real"))
  np.testing.assert_allclose(arrays["opponent_real"], fresh, rtol=1e-5, atol=1e-5)
  gap = lambda p: -beta / 2 * (side_logp(p, "real") - side_logp(p, "generated")).mean()
  g_loss, g_gap = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(gap))(params)  # Compiled:
  # op-by-op, the two backward passes took most of this test's ~30 s.
  for a, b in zip(jax.tree.leaves(g_loss), jax.tree.leaves(g_gap), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_encode_row_masks_the_prompt():
  inputs, targets, weights = pairs.encode_row(np.array([5, 6, 7]), np.array([8, 9, 0]), 8)
  np.testing.assert_array_equal(inputs[:5], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(targets[:5], [6, 7, 8, 9, 0])
  # Targets 8, 9 and EOS (positions 2..4) are the response; 6, 7 are the prompt.
  np.testing.assert_array_equal(weights, [0, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize(
  "recipe,key", [("spin", "spin.pairs"), ("agent_improve", "improve.rollouts")]
)
def test_an_iterations_rows_are_checked_when_read_not_when_its_config_is(tmp_path, recipe, key):
  """A finished iteration whose rows file is gone (a moved workdir keeps a stale absolute path)
  still passes its task's config check, so it loads for evaluation; training it is refused in
  one line, and the rows load when present."""
  from fulcrum import recipes
  from fulcrum.platform.errors import UserError
  from fulcrum.platform.training import tasks

  config = recipes.get(recipe)
  section, field = key.split(".")
  with config.unlocked():
    config[section][field] = str(tmp_path / "moved_away.npz")
  tasks.validate(config)  # Before: "does not exist" here, so a moved run could not evaluate.
  with pytest.raises(UserError, match=f"{key}=.*does not exist"):
    pairs.load_iteration_rows(config[section][field], key, "a run", recipe)
  with pytest.raises(UserError, match="top-level config"):
    pairs.load_iteration_rows("", key, "a run", recipe)
  rows = {"inputs": np.arange(6, dtype=np.int32).reshape(2, 3)}
  pairs.save(tmp_path / "moved_away.npz", rows, {})
  got = pairs.load_iteration_rows(config[section][field], key, "a run", recipe)
  np.testing.assert_array_equal(got["inputs"], rows["inputs"])
