"""`models.validate`: each architecture's checks are its blocks' own, and backends are real."""

from __future__ import annotations

import re

import jax
import pytest

from fulcrum.modules import ModelConfig, models

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # Tiny programs, run briefly.

TINY = dict(d_model=32, num_layers=1, num_heads=2)


@pytest.mark.parametrize(
  "values,fragment",
  [
    (dict(num_kv_heads=-2), "model.num_kv_heads must be >= 0"),
    (dict(head_dim=-8), "model.head_dim must be >= 0"),
    (dict(mlp_dim=-1), "model.mlp_dim must be >= 0"),
    (dict(d_model=30), "each head has 15"),
    (dict(rope_theta=0.0), "model.rope_theta must be a positive number"),
    (dict(rope_theta=float("inf")), "model.rope_theta must be a positive number"),
    (dict(norm_eps=-1e-6), "model.norm_eps must be a number >= 0"),
    (dict(logits_soft_cap=-1.0), "model.logits_soft_cap must be >= 0"),
    (dict(arch="griffin", num_layers=3, num_kv_heads=-1), "model.num_kv_heads must be >= 0"),
    (dict(arch="griffin", num_layers=3, mlp_dim=-1), "model.mlp_dim must be >= 0"),
    (dict(arch="hawk", lru_width=-1), "model.lru_width must be >= 0"),
    (dict(arch="hawk", lru_width=30, num_heads=4), "into model.num_heads=4 blocks"),
    (dict(arch="hawk", conv_width=0), "model.conv_width must be >= 1"),
    (dict(arch="mamba", ssm_state=0), "model.ssm_state must be >= 1"),
    (dict(arch="mamba", ssm_expand=0), "model.ssm_expand must be >= 1"),
    (dict(arch="mamba", conv_width=-1), "model.conv_width must be >= 1"),
    (dict(arch="mamba", dt_rank=-1), "model.dt_rank must be >= 0"),
    (dict(arch="dlinear", moving_avg=0, input_len=8, horizon=2), "model.moving_avg must be >= 1"),
  ],
)
def test_a_value_the_arch_reads_is_checked(values, fragment):
  """Before: each built, then failed at the first step (a traceback) or trained to NaN."""
  with pytest.raises(ValueError, match=re.escape(fragment)):
    models.build(ModelConfig(**{**TINY, **values}))


@pytest.mark.parametrize(
  "values",
  [
    dict(arch="mamba", num_heads=3, num_kv_heads=-1, head_dim=-1, rope_theta=0.0, mlp_dim=-1),
    dict(arch="mamba", attention_impl="cudnn", window=-1),
    dict(arch="hawk", num_kv_heads=3, head_dim=-1, rope_theta=0.0, ssm_state=0),
    dict(arch="transformer", ssm_state=0, lru_width=-1, conv_width=0, moving_avg=0),
    dict(arch="nlinear", num_heads=0, d_model=0, vocab_size=0, norm_eps=-1.0, moving_avg=0),
    dict(arch="mamba", head="forecast", vocab_size=0, logits_soft_cap=-1.0),
  ],
)
def test_a_value_the_arch_does_not_read_is_not_checked(values):
  models.validate(ModelConfig(**{**TINY, **values}))


def test_cudnn_attention_only_where_it_runs(monkeypatch):
  """cuDNN's fused attention needs an NVIDIA GPU and 16-bit inputs; before, the first step
  raised (RuntimeError "cuDNN is not detected", or NotImplementedError for float32)."""
  config = ModelConfig(**TINY, attention_impl="cudnn", dtype="bfloat16")
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  with pytest.raises(ValueError, match="needs an NVIDIA GPU .*here: cpu, bfloat16"):
    models.validate(config)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  models.validate(config)
  with pytest.raises(ValueError, match="here: gpu, float32"):
    models.validate(ModelConfig(**TINY, attention_impl="cudnn"))


def test_pallas_scan_only_on_backends_with_a_kernel(monkeypatch):
  config = ModelConfig(**TINY, arch="mamba", scan_impl="pallas")
  models.validate(config)  # CPU: the interpreter.
  monkeypatch.setattr(jax, "default_backend", lambda: "metal")
  with pytest.raises(ValueError, match="model.scan_impl=pallas has no kernel for the metal"):
    models.validate(config)
  with pytest.raises(ValueError, match="model.scan_impl=pallas"):
    models.validate(ModelConfig(**TINY, arch="hawk", scan_impl="pallas"))
  models.validate(ModelConfig(**TINY, scan_impl="pallas"))  # A transformer has no scan.
