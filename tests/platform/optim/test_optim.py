"""The optimizer factory: schedule shape, which parameters decay, config checks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import ModelConfig, build
from fulcrum.platform import sections
from fulcrum.platform.optim import learning_rate_schedule
from fulcrum.platform.optim.factory import decay_mask, validate_config


def test_warmup_then_cosine_to_min_ratio():
  opt = sections.base_config().optimizer
  sched = learning_rate_schedule(opt, 1000)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(opt.warmup_steps)), opt.learning_rate, rtol=1e-6)
  np.testing.assert_allclose(float(sched(1000)), opt.learning_rate * opt.min_lr_ratio, rtol=1e-5)


def test_decay_only_matrices_and_never_ssm_parameters():
  model = build(ModelConfig(arch="mamba", vocab_size=16, d_model=16, num_layers=1))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): keep
    for path, keep in jax.tree_util.tree_leaves_with_path(decay_mask(params))
  }
  assert not any(v for k, v in flat.items() if k.endswith("A_log") or k.endswith("/D"))
  assert not any(v for k, v in flat.items() if k.endswith("scale") or k.endswith("bias"))
  assert flat["blocks_0/mixer/in_proj/kernel"] and flat["embedder/embedding"]


@pytest.mark.parametrize(
  "key,value,fragment",
  [
    ("warmup_steps", -1, "optimizer.warmup_steps must be >= 0"),
    ("b1", 1.0, "optimizer.b1 must be in [0, 1)"),
    ("b1", -0.1, "optimizer.b1 must be in [0, 1)"),
    ("b2", float("nan"), "optimizer.b2 must be in [0, 1)"),
    ("eps", -1e-8, "optimizer.eps must be >= 0"),
    ("min_lr_ratio", float("nan"), "optimizer.min_lr_ratio must be in [0, 1]"),
    ("weight_decay", -0.1, "optimizer.weight_decay must be >= 0"),
    ("clip_norm", float("nan"), "optimizer.clip_norm must be >= 0"),
  ],
)
def test_validate_config_refuses_values_adam_cannot_use(key, value, fragment):
  """Before: warmup < 0 and b1 < 0 trained silently, b1 = 1 to NaN, a NaN ratio to NaN."""
  opt = sections.base_config().optimizer
  opt[key] = value
  with pytest.raises(ValueError, match=re.escape(fragment)):
    validate_config(opt)
  validate_config(sections.base_config().optimizer)  # The defaults pass.
