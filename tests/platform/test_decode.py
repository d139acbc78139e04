"""Compiled generation against a naive loop over full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fulcrum.modules import ModelConfig, build
from fulcrum.platform.decode import generate


@pytest.mark.parametrize("window", [0, 3])
def test_greedy_generate_equals_argmax_of_full_forward(window):
  model = build(ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=2, window=window))
  prompt = np.array([[1, 5, 9, 2], [7, 7, 3, 0]], np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.asarray(prompt))["params"])
  got = generate(model, params, prompt, 6)
  forward = jax.jit(model.apply)
  seq = prompt
  for _ in range(6):
    nxt = np.asarray(forward({"params": params}, seq)[:, -1].argmax(-1))
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(got, seq[:, 4:])


def test_sampling_is_seeded_and_empty_prompt_rejected():
  model = build(ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=2))
  prompt = np.array([[1, 2, 3]], np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.asarray(prompt))["params"])
  a = generate(model, params, prompt, 10, temperature=1.0, seed=1)
  b = generate(model, params, prompt, 10, temperature=1.0, seed=1)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="empty"):
    generate(model, params, np.zeros((1, 0), np.int32), 3)
