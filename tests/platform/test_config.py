"""Overrides are typed and validated; unknown keys are errors."""

import pytest

from fulcrum.platform import config as config_lib
from fulcrum.platform import sections
from fulcrum.platform.errors import UserError


def test_override_parses_to_default_type():
  c = sections.base_config()
  config_lib.apply_overrides(
    c,
    [
      "train.steps=7",
      "optimizer.learning_rate=1e-4",
      "model.tie_embeddings=false",
      "model.dtype=bfloat16",
      "optimizer.learning_rate=2",
    ],
  )
  assert c.train.steps == 7 and isinstance(c.train.steps, int)
  assert c.optimizer.learning_rate == 2.0 and isinstance(c.optimizer.learning_rate, float)
  assert c.model.tie_embeddings is False and c.model.dtype == "bfloat16"


@pytest.mark.parametrize(
  "item,match",
  [
    ("train.nope=1", "unknown config key"),
    ("nope.steps=1", "unknown config key"),
    ("train=1", "unknown config key"),
    ("train.steps=1.5", "expected a int"),
    ("train.progress=perhaps", "expected a bool"),
    ("train.steps", "key=value"),
  ],
)
def test_bad_overrides(item, match):
  with pytest.raises(UserError, match=match):
    config_lib.apply_overrides(sections.base_config(), [item])


@pytest.mark.parametrize(
  "item,match",
  [
    ("train.steps=0", "train.steps must be positive"),
    ("model.num_kv_heads=3", "num_kv_heads"),
    ("model.dtype=float8", "model.dtype"),
    ("train.grad_accum_steps=3", "grad_accum_steps"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("model.rope_fraction=0", "model.rope_fraction must be in"),
    ("model.rope_fraction=1.5", "model.rope_fraction must be in"),
    ("model.rope_fraction=0.3", "rotates 19 of each head's 64 dims"),
    ("optimizer.name=sgd", "adamw, galore, adam8bit, galore8bit"),
    ("optimizer.galore.rank=0", "optimizer.galore.rank"),
    ("optimizer.galore.update_proj_gap=0", "update_proj_gap"),
    ("optimizer.galore.side=middle", "choose one of auto, left, right"),
    ("optimizer.quant.block_size=1", "optimizer.quant.block_size"),
    ("model.quant=int4", "none, int8, int8_weight, fp8"),
  ],
)
def test_validation(item, match):
  c = sections.base_config()
  config_lib.apply_overrides(c, [item])
  with pytest.raises(UserError, match=match):
    sections.validate(c)


def test_partial_rope_that_rotates_an_even_number_of_dims_is_valid():
  c = sections.base_config()
  config_lib.apply_overrides(c, ["model.rope_fraction=0.5", "model.attn_out_bias=true"])
  sections.validate(c)


def test_json_round_trip():
  c = sections.base_config()
  config_lib.apply_overrides(c, ["model.d_model=64"])
  back = sections.from_json(config_lib.to_json(c))
  assert back.to_dict() == c.to_dict()
