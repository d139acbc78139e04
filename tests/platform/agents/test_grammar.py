"""The action grammar: the trie accepts exactly its actions, constrained decoding emits only valid
actions, equals unconstrained greedy when greedy's own text is valid, and leaves the model's cache
as if the action's tokens (all but the last) had been fed — on attention and recurrent models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fulcrum.modules import build
from fulcrum.platform.agents import grammar as grammar_lib
from fulcrum.platform.decode import Greedy, Sampling, generate
from fulcrum.platform.decode.loop import left_pad, prefill
from tests.conftest import random_params

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

VOCAB = 16
CONFIGS = {
  "transformer": dict(arch="transformer", d_model=32, num_layers=2, num_heads=2, scan_layers=True),
  "mamba": dict(arch="mamba", d_model=16, num_layers=1),
}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 9, 3, 2, 8], [8], [2, 2, 2, 7, 1, 1]]
L = 5  # Tokens per action in the greedy-equivalence test.


@functools.cache
def model(name: str):
  m = build(dict(vocab_size=VOCAB, **CONFIGS[name]))
  return m, random_params(m, 3)


def _decode(name: str, g: grammar_lib.Grammar, sampling: Sampling, seed: int = 0):
  m, params = model(name)
  tokens, positions = left_pad(PROMPTS)
  max_len = tokens.shape[1] + g.max_len + 1

  @jax.jit
  def run(params, tokens, positions, key):
    last, cache = prefill(m, params, tokens, positions, max_len, 1)
    return grammar_lib.decode_action(m, params, last, cache, positions[:, -1] + 1, g, key, sampling)

  return jax.tree.map(np.asarray, run(params, tokens, positions, jax.random.key(seed)))


def test_build_refuses_prefixes_duplicates_and_bad_tokens():
  with pytest.raises(ValueError, match="prefix"):
    grammar_lib.build([[1, 2], [1, 2, 3]], VOCAB)
  with pytest.raises(ValueError, match="prefix"):
    grammar_lib.build([[1, 2, 3], [1, 2]], VOCAB)
  with pytest.raises(ValueError, match="repeats"):
    grammar_lib.build([[1, 2], [1, 2]], VOCAB)
  with pytest.raises(ValueError, match="outside"):
    grammar_lib.build([[1, VOCAB]], VOCAB)
  with pytest.raises(ValueError, match="no tokens"):
    grammar_lib.build([[]], VOCAB)


def test_trie_accepts_exactly_its_sequences():
  seqs = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
  g = grammar_lib.build(seqs, VOCAB)
  assert g.num_actions == 4 and g.max_len == 3
  nxt, action = np.asarray(g.next), np.asarray(g.action)
  for i, s in enumerate(seqs):
    node = 0
    for j, tok in enumerate(s):
      assert action[node] == -1, "an action ends before its last token"
      node = nxt[node, tok]
      assert node > 0, f"sequence {i} refused at token {j}"
    assert action[node] == i
  # Tokens off the trie are refused at the root and inside.
  assert nxt[0, 2] == -1 and nxt[nxt[0, 1], 1] == -1
  assert set(np.flatnonzero(nxt[0] >= 0)) == {1, 6}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_constrained_greedy_equals_greedy_when_greedy_is_valid(name):
  m, params = model(name)
  free = generate(m, params, PROMPTS, L, strategy=Greedy())
  greedy = [tuple(int(t) for t in r) for r in free.tokens]
  # The grammar holds greedy's own continuation for rows 0 and 1 and, for rows 2 and 3, only
  # sequences that differ from greedy's at the first or the third token.
  seqs = {greedy[0], greedy[1]}
  for r in greedy[2:]:
    seqs.add(((r[0] + 1) % VOCAB, *r[1:]))
    seqs.add((*r[:2], (r[2] + 1) % VOCAB, *r[3:]))
  seqs = sorted(seqs)
  g = grammar_lib.build(seqs, VOCAB)
  action, tokens, length, _, _ = _decode(name, g, Sampling())
  for row in range(len(PROMPTS)):
    emitted = tuple(int(t) for t in tokens[row, : length[row]])
    assert seqs[action[row]] == emitted, "the action index names another sequence"
    assert length[row] == L and (tokens[row, L:] == -1).all()
  # Wherever greedy's own continuation is an action, the constrained decode is greedy's.
  for row, a in enumerate(action):
    if greedy[row] in seqs:
      assert seqs[a] == greedy[row]
  assert [seqs[a] for a in action[:2]] == greedy[:2]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sampled_actions_are_always_valid_and_cache_matches_a_full_forward(name):
  m, params = model(name)
  rng = np.random.default_rng(0)
  # Actions of different lengths with shared prefixes, like "use(up)" / "use(down)".
  seqs = sorted({tuple(rng.integers(0, VOCAB, rng.integers(1, 5))) + (15,) for _ in range(40)})
  seqs = [s for s in seqs if 15 not in s[:-1]]
  g = grammar_lib.build(seqs, VOCAB)
  valid = set(seqs)
  for seed in range(3):
    action, tokens, length, cache, pos = _decode(name, g, Sampling(temperature=2.0), seed)
    for row in range(len(PROMPTS)):
      emitted = tuple(int(t) for t in tokens[row, : length[row]])
      assert emitted in valid and seqs[action[row]] == emitted
  # Feeding each action's last token through the returned cache gives the logits a full forward
  # pass over prompt + action gives at that token: the cache holds exactly the fed tokens.
  last = tokens[np.arange(len(PROMPTS)), length - 1]
  logits, _ = m.apply(
    {"params": params},
    jnp.asarray(last[:, None]),
    jnp.asarray(pos[:, None]),
    cache,
    method="decode",
  )
  # Every row's prompt + action, right-padded, in one causal forward pass (padding after a
  # row's last token cannot change its logits there).
  fulls = [p + [int(t) for t in tokens[row, : length[row]]] for row, p in enumerate(PROMPTS)]
  padded = np.zeros((len(fulls), max(map(len, fulls))), np.int32)
  for row, full in enumerate(fulls):
    padded[row, : len(full)] = full
  forward = jax.jit(m.apply)({"params": params}, jnp.asarray(padded))
  for row, full in enumerate(fulls):
    want = forward[row, len(full) - 1]
    np.testing.assert_allclose(np.asarray(logits[row, -1]), np.asarray(want), rtol=1e-5, atol=1e-5)
