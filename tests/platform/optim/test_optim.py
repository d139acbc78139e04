"""The optimizer factory: schedule shape and which parameters decay."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fulcrum.modules import ModelConfig, build
from fulcrum.platform import sections
from fulcrum.platform.optim import learning_rate_schedule
from fulcrum.platform.optim.factory import decay_mask


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
