"""Compiled autoregressive generation: one prefill pass, then a `lax.scan` over new tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fulcrum.modules.lm import LM


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature"))
def _generate(model: LM, params, prompt, rng, *, max_new_tokens: int, temperature: float):
  batch, t = prompt.shape
  cache = model.init_cache(batch, t + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  logits, cache = model.apply({"params": params}, prompt, positions, cache, method="decode")

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  def body(carry, key):
    token, pos, cache = carry
    logits, cache = model.apply(
      {"params": params}, token[:, None], pos[:, None], cache, method="decode"
    )
    nxt = pick(logits[:, -1], key)
    return (nxt, pos + 1, cache), nxt

  first = pick(logits[:, -1], jax.random.fold_in(rng, max_new_tokens))
  keys = jax.random.split(rng, max_new_tokens - 1)
  start = jnp.full((batch,), t, jnp.int32)
  _, rest = jax.lax.scan(body, (first, start, cache), keys)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
  model: LM,
  params,
  prompt: np.ndarray,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  seed: int = 0,
) -> np.ndarray:
  """Continues each row of `prompt` ([b, t] int tokens, equal lengths) by `max_new_tokens`.

  Greedy when temperature is 0, otherwise samples from softmax(logits / temperature).
  Returns the new tokens, [b, max_new_tokens].
  """
  prompt = jnp.asarray(np.atleast_2d(prompt), jnp.int32)
  if prompt.shape[1] == 0:
    raise ValueError("the prompt is empty")
  if max_new_tokens < 1:
    return np.zeros((prompt.shape[0], 0), np.int32)
  out = _generate(
    model,
    params,
    prompt,
    jax.random.PRNGKey(seed),
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
  )
  return np.asarray(out)
