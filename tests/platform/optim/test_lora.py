"""LoRA: adapters start as the identity, only they train, and merging them keeps the function."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from fulcrum.modules import ModelConfig, blocks, build, quant
from fulcrum.modules.layers import Dense, LoRA
from fulcrum.platform import hf, sections
from fulcrum.platform.optim import lora, make_optimizer

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, each run once.

VOCAB = 32
TOKENS = jax.random.randint(jax.random.key(1), (2, 9), 0, VOCAB)


def config(arch: str, **changes) -> ModelConfig:
  small = dict(vocab_size=VOCAB, d_model=16, num_layers=3, num_heads=2, window=4)
  return ModelConfig(arch=arch, **{**small, **changes})


def random_params(model: nn.Module, seed: int = 0) -> dict:
  """Random values (adapters included, so lora_b is not zero) in the model's params tree."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) / 4, shapes)


def without_adapters(params: dict) -> dict:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in lora.ADAPTERS})


def logits(model: nn.Module, params, tokens=TOKENS) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, tokens))


@pytest.mark.parametrize(
  "arch,scan", [("transformer", False), ("mamba", False), ("hawk", False), ("griffin", True)]
)
def test_at_init_the_adapted_model_is_the_base_model(arch, scan):
  c = config(arch, scan_layers=scan, remat=scan)
  adapted = build(dataclasses.replace(c, lora_rank=4))
  params = nn.unbox(jax.jit(adapted.init)(jax.random.key(0), TOKENS)["params"])
  assert lora.adapter_count(params) > 0
  np.testing.assert_array_equal(logits(adapted, params), logits(build(c), without_adapters(params)))


@pytest.mark.parametrize("arch", ["transformer", "mamba", "griffin"])
@pytest.mark.parametrize("scan", [False, True])
def test_merged_params_give_the_adapted_logits(arch, scan):
  adapted = build(config(arch, scan_layers=scan, lora_rank=3, lora_alpha=6.0))
  params = random_params(adapted)
  merged, merged_config = lora.merge(params, adapted.config)
  assert merged_config == dataclasses.replace(adapted.config, lora_rank=0)
  assert lora.adapter_count(merged) == 0
  want = logits(adapted, params)
  assert np.abs(want - logits(build(merged_config), without_adapters(params))).max() > 1e-2
  np.testing.assert_allclose(logits(build(merged_config), merged), want, rtol=1e-5, atol=1e-5)


def test_targets_pick_the_adapted_layers():
  model = build(config("transformer", num_layers=1, lora_rank=2, lora_targets="q, down"))
  flat = traverse_util.flatten_dict(random_params(model))
  adapted = sorted("/".join(k[:-1]) for k in flat if k[-1] == "lora_a")
  assert adapted == ["blocks_0/attn/q", "blocks_0/mlp/down"]
  assert flat[("blocks_0", "attn", "q", "lora_a")].shape == (16, 2)  # [embed, r]
  assert flat[("blocks_0", "attn", "q", "lora_b")].shape == (2, 2, 8)  # [r, heads, head_dim]


@pytest.mark.parametrize("arch", ["transformer", "mamba", "hawk"])
def test_decoding_with_a_cache_reproduces_the_adapted_forward_pass(arch):
  model = build(config(arch, lora_rank=2))
  params = random_params(model)
  full = logits(model, params)
  cache = model.init_cache(2, TOKENS.shape[1])
  step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method="decode"))
  for i in range(TOKENS.shape[1]):
    out, cache = step(params, TOKENS[:, i : i + 1], jnp.full((2, 1), i), cache)
    np.testing.assert_allclose(out[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


# --- targets are checked against the architecture ---------------------------------------------


@pytest.mark.parametrize(
  "arch,targets,valid",
  [
    ("mamba", "q,v", "in_proj, x_proj, dt_proj, out_proj, all"),
    ("hawk", "linear_x,o", "linear_x, linear_y, linear_out, gate, up, down, all"),
    ("transformer", "qkv", "q, k, v, o, gate, up, down, all"),
    ("transformer", " , ", "q, k, v, o, gate, up, down, all"),
  ],
)
def test_targets_that_match_no_layer_name_the_valid_ones(arch, targets, valid):
  with pytest.raises(ValueError, match=f"lora_targets.*{valid}$"):
    build(config(arch, lora_rank=4, lora_targets=targets))
  build(config(arch, lora_targets=targets))  # Unused with LoRA off.


def test_griffin_targets_cover_both_of_its_blocks():
  assert blocks.dense_names("griffin") == (
    *("linear_x", "linear_y", "linear_out", "gate", "up", "down", "q", "k", "v", "o"),
  )
  build(config("griffin", lora_rank=2, lora_targets="q,linear_x"))


@pytest.mark.parametrize(
  "changes,fragment",
  [
    (dict(lora_rank=-1), "model.lora_rank must be >= 0"),
    (dict(lora_rank=2, lora_alpha=0.0), "model.lora_alpha must be a positive number"),
    (dict(lora_rank=2, lora_alpha=float("nan")), "model.lora_alpha must be a positive number"),
    (dict(arch="dlinear", lora_rank=2), "model.arch=dlinear has no weight matmuls"),
  ],
)
def test_lora_values_are_checked(changes, fragment):
  with pytest.raises(ValueError, match=fragment):
    build(dataclasses.replace(config("transformer"), **changes))


def test_config_keys_reach_the_model():
  c = sections.base_config()
  assert (c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets) == (0, 16.0, "all")


# --- only the adapters train ------------------------------------------------------------------


def optimizer_config(name: str):
  opt = sections.base_config().optimizer
  opt.name, opt.learning_rate, opt.warmup_steps = name, 1e-2, 0
  opt.galore.rank, opt.galore.update_proj_gap = 2, 2
  opt.quant.min_size = 16  # Adapters are tiny: quantize their moments too.
  return opt


def train(model: nn.Module, tx: optax.GradientTransformation, steps: int):
  """`steps` optimizer steps on next-token loss over fixed tokens, as the trainer takes them
  (state initialised from the boxed params). Returns (params before, after, losses, state)."""
  boxed = model.init(jax.random.key(0), TOKENS)["params"]
  state, params = nn.unbox(tx.init(boxed)), nn.unbox(boxed)

  def loss_fn(p):
    out = model.apply({"params": p}, TOKENS[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(out, TOKENS[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  new, losses = params, []
  for _ in range(steps):
    new, state, loss = step(new, state)
    losses.append(float(loss))
  return params, new, losses, state


def state_owners(state) -> set[str]:
  """The parameter names under which the optimizer state holds arrays (scalars aside)."""
  owners = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if np.ndim(leaf):
      keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
      owners.add(next((k for k in reversed(keys) if k in lora.ADAPTERS), "/".join(keys)))
  return owners


@pytest.mark.parametrize("name", ["adamw", "galore", "adam8bit"])
def test_only_adapters_change_and_hold_optimizer_state(name):
  model = build(config("transformer", num_layers=2, lora_rank=4, quant="none"))
  tx, _ = make_optimizer(optimizer_config(name), 100, trainable=lora.trainable_mask)
  before, after, losses, state = train(model, tx, 6)
  assert losses[-1] < losses[0] - 0.05, losses
  mask = lora.trainable_mask(before)
  for (path, old), new, trained in zip(
    jax.tree_util.tree_leaves_with_path(before),
    jax.tree.leaves(after),
    jax.tree.leaves(mask),
    strict=True,
  ):
    if trained and path[-1].key == "lora_b":
      assert np.abs(new - old).max() > 0, path
    elif not trained:
      np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
  assert state_owners(state) == set(lora.ADAPTERS)


def test_without_a_mask_every_parameter_has_state():
  """The check above can fail: plain AdamW keeps moments for the base weights too."""
  model = build(config("transformer", num_layers=1, lora_rank=4))
  tx, _ = make_optimizer(optimizer_config("adamw"), 100)
  *_, state = train(model, tx, 1)
  assert state_owners(state) > set(lora.ADAPTERS)


def test_adapters_train_under_quantized_training():
  model = build(config("griffin", lora_rank=4, quant="int8"))
  tx, _ = make_optimizer(optimizer_config("adamw"), 100, trainable=lora.trainable_mask)
  _, _, losses, _ = train(model, tx, 6)
  assert losses[-1] < losses[0] - 0.05, losses


def test_quantized_training_leaves_the_adapters_in_full_precision():
  """int8 weight QAT rounds the kernel; x·A·B must be added exactly as in float."""
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  adapted = Dense((8,), (6,), ("embed", "mlp"), lora=LoRA(2, 4.0, ("all",)))
  variables = nn.unbox(adapted.init(jax.random.key(0), x))
  p = variables["params"]
  p["lora_b"] = np.random.default_rng(1).normal(size=p["lora_b"].shape).astype(np.float32)
  base = quant.quantize(Dense((8,), (6,), ("embed", "mlp")), "int8_weight")
  want = base.apply({"params": {"kernel": p["kernel"]}}, x) + 2.0 * (x @ p["lora_a"]) @ p["lora_b"]
  got = quant.quantize(adapted, "int8_weight").apply({"params": p}, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_save_pretrained_writes_the_adapted_model(tmp_path, scan):
  # 256: the byte vocabulary, which the exported tokenizer needs.
  c = ModelConfig(vocab_size=256, d_model=16, num_layers=2, num_heads=2, scan_layers=scan)
  adapted = build(dataclasses.replace(c, lora_rank=2))
  params = random_params(adapted)
  hf.save_pretrained(adapted, params, tmp_path)
  model, loaded = hf.load_pretrained(tmp_path)
  assert model.config.lora_rank == 0
  np.testing.assert_allclose(logits(model, loaded), logits(adapted, params), rtol=1e-5, atol=1e-5)


def test_the_train_step_differentiates_only_the_adapters():
  """The trainer's step under LoRA: the base weights are constants (no gradient is computed for
  them), so its grad_norm is the adapters' gradient norm and the base weights stay put."""
  from fulcrum import recipes
  from fulcrum.platform import config as config_lib
  from fulcrum.platform.training import trainer

  c = recipes.get("synthetic_induction_heads")
  config_lib.apply_overrides(
    c,
    ["train.batch_size=4", "train.seq_len=16", "data.length=16", "model.d_model=16"]
    + ["model.num_layers=1", "model.lora_rank=4", "optimizer.warmup_steps=0"],
  )
  exp = trainer.build_experiment(c)
  state = exp.init_state()
  batch = trainer.global_batch(exp, next(exp.task.train_iterator(0, 1)))

  def loss(p):
    out = exp.model.apply({"params": p}, *exp.task.model_inputs(batch))
    return exp.task.loss(out, batch)[0]

  grads = jax.grad(loss)(state.params)
  adapters = [
    g
    for g, m in zip(
      jax.tree.leaves(grads), jax.tree.leaves(lora.trainable_mask(grads)), strict=True
    )
    if m
  ]
  before = jax.device_get(state.params)
  with exp.activate():
    new, metrics = trainer.jit_train_step(exp)(state, batch)
  np.testing.assert_allclose(
    float(metrics["grad_norm"]), float(optax.tree.norm(adapters)), rtol=1e-5
  )
  assert float(metrics["grad_norm"]) < float(optax.tree.norm(grads))  # Base grads were left out.
  mask = jax.tree.leaves(lora.trainable_mask(before))
  for old, now, trained in zip(
    jax.tree.leaves(before), jax.tree.leaves(new.params), mask, strict=True
  ):
    if not trained:
      np.testing.assert_array_equal(old, np.asarray(now))
