"""The decoding engine: every strategy is lossless (greedy, lookahead, speculative) or preserves
the distribution it samples from (speculative sampling, cascades), on every architecture.

Budget: compilation dominates, so the models are tiny, share one prompt batch shape (generate
caches one executable per strategy and shapes), and compile with XLA's optimisations off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fulcrum.modules import build
from fulcrum.modules.attention import KVCache
from fulcrum.platform.decode import (
  Cascade,
  Draft,
  Greedy,
  Lookahead,
  Sample,
  Sampling,
  Speculative,
  generate,
  strategies,
)
from fulcrum.platform.decode import cache as cache_lib
from fulcrum.platform.decode.loop import with_history
from fulcrum.platform.decode.sampling import probabilities
from fulcrum.platform.decode.speculative import RULES, deferral, mixture
from tests.conftest import random_params

VOCAB = 16
NEW = 10  # New tokens per row in the equivalence tests.
# Different lengths, all ending in the same token: rows continue differently only if the model
# reads its context (the cache) beyond the last token.
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [7, 9, 3, 2, 8], [8]]
CONFIGS = {
  "transformer": dict(
    arch="transformer", d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, scan_layers=True
  ),
  "mamba": dict(arch="mamba", d_model=16, num_layers=1),
  "hawk": dict(arch="hawk", d_model=16, num_layers=1, num_heads=2),
  # Local attention with a window of 4: prompts of up to 12 tokens + 10 new wrap the ring buffer.
  "griffin": dict(arch="griffin", d_model=16, num_layers=3, num_heads=2, window=4),
}
# Seeds whose random models give context-dependent greedy outputs on PROMPTS, with top-2 logit
# gaps > 1e-3 (`reference` and test 1 check them).
SEEDS = {"transformer": 2, "mamba": 2, "hawk": 5, "griffin": 5}
LOOKAHEAD = Lookahead(window=4, ngram=3, candidates=3)
LOOKAHEAD_ONE_ROW = Lookahead(window=5, ngram=3, candidates=0)  # One row, pool n-grams chained.
GAMMA = 3


pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


@functools.cache
def model(name: str):
  m = build(dict(vocab_size=VOCAB, **CONFIGS[name]))
  return m, random_params(m, SEEDS[name])


FORWARD_SHAPE = (256, 22)  # Every full forward pass pads to this shape: one compile a model.


@functools.cache
def _forward(name: str):
  m, _ = model(name)
  return jax.jit(lambda params, tokens: m.apply({"params": params}, tokens))


def forward(name: str, tokens: np.ndarray) -> np.ndarray:
  """Logits of a full forward pass (no cache) over [b, t] tokens, right-padded to FORWARD_SHAPE
  (causal models ignore what follows)."""
  b, t = tokens.shape
  buf = np.zeros(FORWARD_SHAPE, np.int32)
  buf[:b, :t] = tokens
  return np.asarray(_forward(name)(model(name)[1], buf))[:b, :t]


def reference(name: str, prompts, n: int) -> np.ndarray:
  """Greedy continuations by full forward passes, no cache: each row's tokens sit at the start
  of a zero-filled buffer (causal models ignore what follows), argmax appended per step."""
  return _reference(name, tuple(tuple(int(t) for t in p) for p in prompts), n).copy()


@functools.cache
def _reference(name: str, prompts, n: int) -> np.ndarray:
  lengths = np.array([len(p) for p in prompts])
  buf = np.zeros((len(prompts), lengths.max() + n), np.int32)
  for i, p in enumerate(prompts):
    buf[i, : len(p)] = p
  rows = np.arange(len(prompts))
  for _ in range(n):
    logits = forward(name, buf)[rows, lengths - 1]
    top2 = np.sort(logits, -1)[:, -2:]
    # A near tie would make the comparison hostage to rounding: pick another seed.
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4, "near tie: greedy is fragile, reseed"
    buf[rows, lengths] = logits.argmax(-1)
    lengths += 1
  return np.stack([buf[i, len(p) : len(p) + n] for i, p in enumerate(prompts)])


@functools.cache
def stop_token() -> int:
  """A token mamba's greedy decoding emits first inside a speculative round, not at its end,
  in one row and never in another (nor in the transformer's greedy output, so the transformer's
  run with it is compared in full). A draft-only cascade accepts all GAMMA drafts a round, so
  rounds emit tokens 1..GAMMA+1, GAMMA+2..2*GAMMA+2, ...: the stop cuts a round short."""
  want = reference("mamba", PROMPTS, NEW)
  target = reference("transformer", PROMPTS, NEW)
  for row in want:
    for i, t in enumerate(row[: NEW - 1]):
      mid_round = i % (GAMMA + 1) != 0
      if mid_round and t not in row[:i] and t not in target and any(t not in r for r in want):
        return int(t)
  raise AssertionError(f"no usable stop token in {want}")


def expected(want: np.ndarray, stops) -> tuple[np.ndarray, np.ndarray]:
  """Greedy tokens cut after each row's first stop token (kept), -1 after; and the lengths."""
  tokens, lengths = np.full_like(want, -1), np.full(len(want), want.shape[1])
  for i, row in enumerate(want):
    hits = np.flatnonzero(np.isin(row, list(stops)))
    n = hits[0] + 1 if hits.size else len(row)
    tokens[i, :n], lengths[i] = row[:n], n
  return tokens, lengths


def _kwargs(name: str, kind: str) -> dict:
  """generate() arguments of one decoding run. Each compile costs seconds, so each strategy runs
  where it adds coverage (`commit` is tested on its own below):
    sampled_top_1  sampling restricted to the top token: greedy.
    speculative    transformer <- mamba draft, as a cascade deferring always (delta = 1, which
                   is speculative decoding; alpha is traced, so alpha = 1 reuses the executable
                   to defer never: "draft_only"), stopping at `stop_token()`; griffin <- hawk
                   draft, sampling with top_k 1 (ring-buffer rollback).
  """
  if kind == "greedy":
    return {}
  if kind == "sampled_top_1":
    return dict(strategy=Sample(), sampling=Sampling(1.0, top_k=1))
  if kind == "lookahead":
    return dict(strategy=LOOKAHEAD)
  if kind == "lookahead_one_row":
    return dict(strategy=LOOKAHEAD_ONE_ROW)
  if name == "transformer":  # speculative, draft_only
    alpha = -1.0 if kind == "speculative" else 1.0  # chow: defer iff max q < 1 - alpha.
    return dict(
      strategy=Cascade(Draft(*model("mamba")), GAMMA, rule="chow", alpha=alpha),
      stop_tokens=[stop_token()],
    )
  return dict(strategy=Speculative(Draft(*model("hawk")), GAMMA), sampling=Sampling(1.0, top_k=1))


@functools.cache
def decoded(name: str, kind: str):
  """`generate` of PROMPTS by one model (cached: several tests read it)."""
  m, params = model(name)
  return generate(m, params, PROMPTS, NEW, **_kwargs(name, kind))


RUNS = {
  "transformer": ("greedy", "speculative", "lookahead_one_row"),  # The scan_layers model.
  "mamba": ("greedy",),  # Also the draft of the transformer's cascade runs.
  "hawk": ("sampled_top_1", "lookahead"),  # Also the draft of griffin's speculative run.
  "griffin": ("greedy", "lookahead", "lookahead_one_row", "speculative"),  # Local, window 4.
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_lookahead_and_speculative_equal_naive_greedy(name):
  want = reference(name, PROMPTS, NEW)
  # The model reads its context: prompts that end alike continue differently.
  assert len({tuple(r) for r in want}) == 3, want
  assert all(len(set(r)) > 1 for r in want), want

  greedy = decoded(name, RUNS[name][0])
  np.testing.assert_array_equal(greedy.tokens, want)
  np.testing.assert_array_equal(greedy.lengths, [NEW] * 3)
  assert [r.tolist() for r in greedy.rows()] == want.tolist()
  assert greedy.target_calls == NEW and greedy.draft_calls == 0

  for kind, strategy in (("lookahead", LOOKAHEAD), ("lookahead_one_row", LOOKAHEAD_ONE_ROW)):
    if kind not in RUNS[name]:
      continue
    look = decoded(name, kind)
    np.testing.assert_array_equal(look.tokens, want)
    np.testing.assert_array_equal(look.lengths, [NEW] * 3)
    assert 1 <= look.target_calls <= greedy.target_calls
    width = max(strategy.window, strategy.ngram)  # At most this many tokens a step, 1 at prefill.
    assert 1 + (look.target_calls - 1) * width >= NEW
    assert look.draft_calls == 0

  if "speculative" in RUNS[name]:
    spec = decoded(name, "speculative")
    tokens, lengths = expected(want, _kwargs(name, "speculative").get("stop_tokens", ()))
    np.testing.assert_array_equal(spec.tokens, tokens)
    np.testing.assert_array_equal(spec.lengths, lengths)
    assert 1 <= spec.target_calls <= greedy.target_calls
    assert 1 + (spec.target_calls - 1) * (GAMMA + 1) >= lengths.max()
    # The draft prefills once, then runs gamma + 1 calls a cascade round (the cascade's q at the
    # bonus position) and gamma a speculative one (the last draft is read with the next round's
    # first token).
    cascade = isinstance(_kwargs(name, "speculative")["strategy"], Cascade)
    assert spec.draft_calls == 1 + (spec.target_calls - 1) * (GAMMA + cascade)


def _has_repeats(row, n: int) -> bool:
  grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
  return len(set(grams)) < len(grams)


def test_lookahead_takes_several_tokens_a_call_when_the_output_repeats():
  """The n-gram pool (seeded by the prompt, fed by Jacobi iterations and the output) only helps
  when the greedy continuation repeats itself. Hawk's does here, in every row (the
  transformer's does not, which is why hawk is used)."""
  n = LOOKAHEAD.ngram
  want = reference("hawk", PROMPTS, NEW)
  assert all(_has_repeats(r, n) for r in want), want
  look = decoded("hawk", "lookahead")
  np.testing.assert_array_equal(look.tokens, want)
  assert look.tokens_per_call > 1, (look.target_calls, want)  # Greedy: 1 (10 calls).
  # Prompts that end in the periodic continuation: the n-grams seeded from the prompt predict
  # the next ones from the first step on. (At most 12 tokens: the compiled shapes are reused.)
  prompts = [(p + w.tolist())[-12:] for p, w in zip(PROMPTS, want, strict=True)]
  want = reference("hawk", prompts, NEW)
  m, params = model("hawk")
  look = generate(m, params, prompts, NEW, strategy=LOOKAHEAD)
  np.testing.assert_array_equal(look.tokens, want)
  assert look.target_calls <= 4, (look.target_calls, want)  # > 2 tokens a call.
  # One row (G = 0): the window starts with the pool's n-grams chained (each continuing from
  # the last token of the one before), so a periodic continuation fills all W - 1 guesses.
  one_row = generate(m, params, prompts, NEW, strategy=LOOKAHEAD_ONE_ROW)
  np.testing.assert_array_equal(one_row.tokens, want)
  assert one_row.target_calls <= 3, (one_row.target_calls, want)  # > 3 tokens a call.


def test_lookahead_continues_prompts_shorter_than_its_ngrams():
  """One-token prompts and N = 4: fewer accepted tokens than an n-gram's continuation."""
  prompts = [[8], [3]]
  m, params = model("hawk")
  out = generate(m, params, prompts, NEW, strategy=Lookahead(window=4, ngram=4, candidates=0))
  np.testing.assert_array_equal(out.tokens, reference("hawk", prompts, NEW))


# Speculative sampling and cascades: many samples of one prompt in one call, compared with the
# exact distributions of the first three new tokens (summed over all VOCAB**2 prefixes).
SAMPLES = 3000
DIST_PROMPT = [5, 3, 8]
# At temperature 1 these random models are near uniform (draft and target within 0.06 in total
# variation: no test could tell them apart); at 0.25 they differ by 0.2 or more.
TEMPERATURE = 0.25


@functools.cache
def exact_marginals(name: str) -> np.ndarray:
  """[3, VOCAB]: the exact distributions of new tokens 1, 2 and 3 under `name` at TEMPERATURE."""
  t = len(DIST_PROMPT)
  pairs = np.stack(np.meshgrid(np.arange(VOCAB), np.arange(VOCAB), indexing="ij"), -1)
  seqs = np.concatenate([np.tile(DIST_PROMPT, (VOCAB**2, 1)), pairs.reshape(-1, 2)], 1)
  logits = forward(name, seqs.astype(np.int32))
  probs = np.asarray(probabilities(logits, Sampling(TEMPERATURE)), np.float64)
  p1 = probs[0, t - 1]  # p(x1 | prompt)
  p2 = probs[::VOCAB, t]  # p(x2 | prompt, x1): [x1, x2]
  p3 = probs[:, t + 1].reshape(VOCAB, VOCAB, VOCAB)  # p(x3 | prompt, x1, x2)
  return np.stack([p1, p1 @ p2, np.einsum("a,ab,abc->c", p1, p2, p3)])


def chi_square_p(samples: np.ndarray, expected: np.ndarray) -> float:
  """p-value of samples against a distribution, cells expecting < 5 counts merged."""
  obs = np.bincount(samples, minlength=VOCAB).astype(np.float64)
  exp = expected / expected.sum() * len(samples)
  small = exp < 5
  if small.any():
    obs = np.append(obs[~small], obs[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
  return float(stats.chisquare(obs, exp).pvalue)


def sampled(cascade_alpha: float | None = None, seed: int = 0):
  """SAMPLES continuations of DIST_PROMPT (3 tokens) by a transformer with a mamba draft:
  speculative sampling, or a chow cascade with threshold `cascade_alpha`."""
  m, params = model("transformer")
  draft = Draft(*model("mamba"))
  strategy = (
    Speculative(draft, gamma=2)
    if cascade_alpha is None
    else Cascade(draft, gamma=2, rule="chow", alpha=cascade_alpha)
  )
  return generate(
    m, params, [DIST_PROMPT] * SAMPLES, 3, strategy=strategy, sampling=Sampling(TEMPERATURE),
    seed=seed,
  )  # fmt: skip


def test_speculative_sampling_preserves_the_target_distribution():
  target, draft = exact_marginals("transformer"), exact_marginals("mamba")
  # The draft is a different distribution (else nothing would be rejected).
  assert 0.5 * np.abs(target - draft).sum(-1).min() > 0.15
  out = sampled()
  assert out.draft_calls > 0 and out.lengths.tolist() == [3] * SAMPLES
  # Token 1 comes from the prefill; tokens 2 and 3 from accepted drafts or residual draws.
  for i in range(3):
    assert chi_square_p(out.tokens[:, i], target[i]) > 1e-3, i
    assert chi_square_p(out.tokens[:, i], draft[i]) < 1e-6, i  # The test has power.
  # Seeded: the same seed repeats every token, another one does not.
  np.testing.assert_array_equal(sampled().tokens, out.tokens)
  assert (sampled(seed=1).tokens != out.tokens).any()


def test_cascade_deferring_always_is_speculative_and_never_is_the_draft():
  """chow defers when max q < 1 - alpha: alpha = -1 always (delta = 1: speculative decoding),
  alpha = 1 never (delta = 0: the drafter alone). alpha is traced: one executable for both."""
  always, never = sampled(cascade_alpha=-1.0), sampled(cascade_alpha=1.0)
  speculative = sampled()
  np.testing.assert_array_equal(always.tokens, speculative.tokens)  # Same seed, same tokens.
  assert always.target_calls == speculative.target_calls
  target, draft = exact_marginals("transformer"), exact_marginals("mamba")
  for i in range(3):
    assert chi_square_p(never.tokens[:, i], draft[i]) > 1e-3, i
    assert chi_square_p(never.tokens[:, i], target[i]) < 1e-6, i
  # Greedy (PROMPTS): the target's tokens (checked with the other equivalences) and the
  # draft's, every draft accepted.
  always, never = decoded("transformer", "speculative"), decoded("transformer", "draft_only")
  stops = [stop_token()]
  tokens, lengths = expected(reference("mamba", PROMPTS, NEW), stops)
  np.testing.assert_array_equal(never.tokens, tokens)
  assert never.target_calls == 1 + -(-(lengths.max() - 1) // (GAMMA + 1))
  assert always.target_calls > never.target_calls  # The target rejects the draft's tokens.


def test_deferral_rules_on_hand_made_distributions():
  q = jnp.array([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])  # max q: 0.7, 0.4
  p = jnp.array([[0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])  # max p: 0.8, 0.5; TV(p, q): 0.7, 0.1
  a = jnp.float32(0.2)
  # chow: max q < 1 - alpha (0.75, then 0.5).
  np.testing.assert_array_equal(deferral("chow", q, p, jnp.float32(0.25)), [1, 1])
  np.testing.assert_array_equal(deferral("chow", q, p, jnp.float32(0.5)), [0, 1])
  # diff: max q < max p - alpha: 0.7 < 0.6 no, 0.4 < 0.3 no; with alpha 0.05: 0.7 < 0.75 yes.
  np.testing.assert_array_equal(deferral("diff", q, p, a), [0, 0])
  np.testing.assert_array_equal(deferral("diff", q, p, jnp.float32(0.05)), [1, 1])
  # opt: max q < max p - alpha * TV: 0.7 < 0.8 - 0.14 = 0.66 no; 0.4 < 0.5 - 0.02 yes.
  np.testing.assert_array_equal(deferral("opt", q, p, a), [0, 1])
  # The total variation TV = 0.5 * |p - q|_1 scales alpha: at alpha 0.12 diff defers neither
  # row (0.7 < 0.68, 0.4 < 0.38), opt both (0.7 < 0.716, 0.4 < 0.488).
  np.testing.assert_array_equal(deferral("diff", q, p, jnp.float32(0.12)), [0, 0])
  np.testing.assert_array_equal(deferral("opt", q, p, jnp.float32(0.12)), [1, 1])
  np.testing.assert_array_equal(deferral("target", q, p, a), [1, 1])
  np.testing.assert_array_equal(deferral("draft", q, p, a), [0, 0])
  with pytest.raises(ValueError, match="unknown deferral rule"):
    deferral("nope", q, p, a)
  # The mixture: row 0 keeps q, row 1 takes p (opt, alpha 0.2), decided on the raw softmaxes.
  pi = mixture("opt", jnp.log(q), jnp.log(p), q, p, a)
  np.testing.assert_allclose(pi, jnp.stack([q[0], p[1]]), rtol=1e-6)


def test_probabilities_top_k_top_p_temperature_and_greedy():
  # Row 0 for top-k / top-p; row 1 has ties. One shape for every call (fewer eager compiles).
  probs = np.array([[0.05, 0.5, 0.1, 0.2, 0.15], [0.3, 0.3, 0.18, 0.18, 0.04]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  dist = lambda **kw: np.asarray(probabilities(logits, Sampling(**kw)))
  close(dist(temperature=1.0), probs)
  np.testing.assert_array_equal(dist(), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])  # Greedy: argmax.
  # Temperature 0.5 squares the probabilities (then renormalises).
  close(dist(temperature=0.5), probs**2 / (probs**2).sum(-1, keepdims=True))
  p = probs[0]
  for k in (1, 3, 5):
    kept = dist(temperature=1.0, top_k=k)[0]
    top = np.argsort(-p)[:k]
    assert set(np.flatnonzero(kept)) == set(top)
    close(kept[top], p[top] / p[top].sum())
  # top_p: the smallest most-likely set whose mass reaches p.
  for top_p, keep in [(0.45, [1]), (0.6, [1, 3]), (0.8, [1, 3, 4]), (0.9, [1, 2, 3, 4])]:
    kept = dist(temperature=1.0, top_p=top_p)[0]
    assert sorted(np.flatnonzero(kept)) == keep, (top_p, kept)
    close(kept[keep], p[keep] / p[keep].sum())
  # Ties at the nucleus edge are kept together: 0.3 + 0.3 < 0.65, so both 0.18s.
  np.testing.assert_array_equal(dist(temperature=1.0, top_p=0.65)[1] > 0, [1, 1, 1, 1, 0])
  # top_k, then top_p on the renormalised top-k: {0.5, 0.2, 0.15} / 0.85, then the 0.7 nucleus.
  close(dist(temperature=1.0, top_k=3, top_p=0.7)[0], np.array([0, 0.5, 0, 0.2, 0]) / 0.7)
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      Sampling(**bad)


def test_stop_tokens_end_rows_independently():
  """The draft-only cascade (every draft accepted) stops a row inside a round; rows without
  the stop token run to the end."""
  want = reference("mamba", PROMPTS, NEW)
  stop = stop_token()
  out = decoded("transformer", "draft_only")
  tokens, lengths = expected(want, [stop])
  assert lengths.min() < NEW and lengths.max() == NEW
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_array_equal(out.tokens, tokens)  # Padded with -1 after the stop.
  for row, n in zip(out.rows(), lengths, strict=True):
    assert len(row) == n and (row[-1] == stop or n == NEW)
    assert (n - 1) % (GAMMA + 1) != 0 or n == NEW  # Cut inside a round, not at its end.


def _assert_same_cache(got, want, length: int, window: int):
  """Recurrent states equal; attention caches hold the same keys and values for every position
  the next query (at `length`) can see. A ring buffer may have overwritten positions older than
  the window with tokens since forgotten: those slots are dead either way."""
  is_kv = lambda x: isinstance(x, KVCache)
  got_leaves, want_leaves = (
    jax.tree.leaves(got, is_leaf=is_kv),
    jax.tree.leaves(want, is_leaf=is_kv),
  )
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    if not isinstance(w, KVCache):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
      continue
    assert (np.asarray(g.positions) < length).all()  # Rejected tokens are forgotten.
    lo = length - window if window else 0
    got_pos, want_pos = (np.where(np.asarray(x) >= lo, x, -1) for x in (g.positions, w.positions))
    np.testing.assert_array_equal(got_pos, want_pos)
    live = (want_pos >= 0)[..., None, None]
    for a, b in ((g.k, w.k), (g.v, w.v)):
      np.testing.assert_allclose(np.where(live, a, 0), np.where(live, b, 0), atol=1e-5)


@pytest.mark.parametrize("name", ["mamba", "griffin"])
def test_commit_keeps_each_rows_state_after_its_last_accepted_token(name):
  m, params = model(name)
  history_model = with_history(m)
  prefix, chunk = 5, 4  # Griffin: 9 tokens through a ring buffer of window 4 + chunk 4 slots.
  index = np.array([0, 2, 3])  # Per row: the chunk index of the last accepted token.
  batch = len(index)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, prefix + chunk)).astype(np.int32)
  positions = np.broadcast_to(np.arange(prefix + chunk, dtype=np.int32), tokens.shape)

  def decode(module):
    return jax.jit(lambda p, t, pos, c: module.apply({"params": p}, t, pos, c, method="decode"))

  step, verify = decode(m), decode(history_model)
  cache = m.init_cache(batch, 32, chunk)
  after, step_logits = [], []  # The cache and logits after each token, one at a time.
  for i in range(prefix + chunk):
    logits, cache = step(params, tokens[:, i : i + 1], positions[:, i : i + 1], cache)
    after.append(cache)
    step_logits.append(logits[:, 0])
  logits, history = verify(params, tokens[:, prefix:], positions[:, prefix:], after[prefix - 1])
  np.testing.assert_allclose(logits, np.stack(step_logits[prefix:], 1), atol=1e-5, rtol=1e-5)
  lengths = prefix + index + 1
  kept = cache_lib.commit(history, jnp.asarray(index), jnp.asarray(lengths))
  window = CONFIGS[name].get("window", 0)
  row = lambda c, r: cache_lib.take_rows(c, jnp.array([r]))
  for r, i in enumerate(index):
    _assert_same_cache(row(kept, r), row(after[prefix + i], r), int(lengths[r]), window)
  # Not vacuous: row 0 kept an earlier state than the chunk's last.
  with pytest.raises(AssertionError):
    _assert_same_cache(row(kept, 0), row(after[-1], 0), int(lengths[0]), window)


def test_bad_inputs_raise_value_errors():
  m, params = model("transformer")
  other_vocab = build(dict(vocab_size=VOCAB + 1, **CONFIGS["mamba"]))
  cases = [
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(strategy="speculative"), "strategy must be a strategy value.*'speculative'"),
    (dict(strategy=Speculative(Draft(other_vocab, None))), r"draft's vocabulary \(17"),
    (dict(strategy=LOOKAHEAD, sampling=Sampling(temperature=1.0)), "lookahead decoding is greedy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_len=12 + NEW - 1), "context limit of 21"),
  ]
  for kw, message in cases:
    args = dict(prompts=PROMPTS, max_new_tokens=NEW) | kw
    with pytest.raises(ValueError, match=message):
      generate(m, params, args.pop("prompts"), args.pop("max_new_tokens"), **args)
  # Exactly at the limit is fine (and reuses the compiled greedy decode).
  out = generate(m, params, PROMPTS, NEW, max_len=12 + NEW)
  np.testing.assert_array_equal(out.tokens, decoded("transformer", "greedy").tokens)


def test_strategies_validate_themselves():
  draft = Draft(*model("mamba"))
  cases = [
    (lambda: Lookahead(window=0), "W >= 1"),
    (lambda: Lookahead(ngram=1), "N >= 2"),
    (lambda: Lookahead(candidates=-1), "G >= 0"),
    (lambda: Lookahead(window=2.5), "integers"),
    (lambda: Speculative(draft, gamma=0), "gamma"),
    (lambda: Cascade(draft, gamma=0), "gamma"),
    (lambda: Speculative(None), "needs a draft model"),
    (lambda: Cascade((draft.model,)), "needs a draft model"),
    (lambda: Cascade(draft, rule="best"), "unknown cascade rule 'best'; choose one of chow, diff"),
    (lambda: Lookahead().sampling_for(Sampling(temperature=0.5)), "lookahead decoding is greedy"),
  ]
  for make, message in cases:
    with pytest.raises(ValueError, match=message):
      make()
  # A (model, params) pair is a Draft; the rules are speculative.RULES.
  assert isinstance(Speculative(tuple(draft)).draft, Draft)
  for rule in RULES:
    assert Cascade(draft, rule=rule).deferral == (rule, 0.1)
  assert Speculative(draft).deferral == ("target", 0.0)
  # Default sampling: greedy for all but Sample (temperature 1); Greedy ignores what it is given.
  assert Sample().sampling_for(None) == Sampling(temperature=1.0)
  assert Sample().sampling_for(Sampling(0.3, top_k=2)) == Sampling(0.3, top_k=2)
  for strategy in (Greedy(), Lookahead(), Speculative(draft), Cascade(draft)):
    assert strategy.sampling_for(None) == Sampling(), strategy
  assert Greedy().sampling_for(Sampling(temperature=0.7)) == Sampling()
  assert Speculative(draft).sampling_for(Sampling(0.7)) == Sampling(0.7)


def test_the_strategy_registry_is_the_classes():
  classes = (Greedy, Sample, Lookahead, Speculative, Cascade)
  assert tuple(cls.name for cls in classes) == strategies.STRATEGIES
  assert strategies.STRATEGIES == ("greedy", "sample", "lookahead", "speculative", "cascade")
  assert all(strategies.BY_NAME[cls.name] is cls for cls in classes)
  with pytest.raises(ValueError, match="unknown strategy 'beam'; choose one of greedy, sample"):
    strategies.strategy_class("beam")
  # The section's defaults are the classes' own.
  d = strategies.config_defaults()
  assert (d.lookahead_window, d.lookahead_ngram, d.lookahead_candidates) == (7, 5, 7)
  assert Lookahead() == Lookahead(d.lookahead_window, d.lookahead_ngram, d.lookahead_candidates)
  assert (d.gamma, d.cascade_rule, d.cascade_alpha) == (4, "opt", 0.1)
  assert (d.top_k, d.top_p) == (Sampling().top_k, Sampling().top_p)


def test_config_and_cli_overrides_resolve_to_a_strategy_and_its_sampling():
  d = strategies.config_defaults()
  draft = Draft(*model("mamba"))
  resolve = functools.partial(strategies.from_config, d)
  # sample: decode.temperature (0.8), not Sample's own default of 1.
  assert resolve(strategy="sample") == (Sample(), Sampling(temperature=d.temperature))
  assert resolve(strategy="sample", temperature=0.3, top_k=5)[1] == Sampling(0.3, top_k=5)
  # speculative / cascade: greedy unless a temperature is given.
  spec, sampling = resolve(strategy="speculative", draft=draft)
  assert isinstance(spec, Speculative) and not isinstance(spec, Cascade)
  assert spec.draft is draft and spec.gamma == d.gamma and sampling == Sampling()
  assert resolve(strategy="speculative", draft=draft, temperature=0.5)[1] == Sampling(0.5)
  cascade, sampling = resolve(strategy="cascade", draft=draft, gamma=2, rule="chow")
  assert (cascade.gamma, cascade.rule, cascade.alpha) == (2, "chow", d.cascade_alpha)
  assert sampling == Sampling()
  # greedy / lookahead: always greedy, whatever temperature is given.
  assert resolve() == (Greedy(), Sampling())
  assert resolve(strategy="greedy", temperature=0.9) == (Greedy(), Sampling())
  assert resolve(strategy="lookahead", temperature=0.9) == (Lookahead(), Sampling())
  assert resolve(strategy="lookahead", lookahead=(4, 3, 0))[0] == Lookahead(4, 3, 0)
  # The section's own strategy, and the values each strategy refuses.
  d.strategy, d.temperature = "sample", 0.6
  assert resolve() == (Sample(), Sampling(temperature=0.6))
  for kw, message in [
    (dict(strategy="speculative"), "needs a draft model"),
    (dict(strategy="lookahead", lookahead=(0, 3, 3)), "W >= 1"),
    (dict(strategy="lookahead", lookahead=(4, 3)), "W, N, G"),
    (dict(strategy="cascade", draft=draft, rule="best"), "unknown cascade rule"),
    (dict(strategy="sample", top_p=0.0), "top_p"),
    (dict(strategy="beam"), "unknown strategy"),
  ]:
    with pytest.raises(ValueError, match=message):
      resolve(**kw)
  # The section is checked by the same values.
  for key, value, message in [
    ("lookahead_ngram", 1, "decode.*: lookahead needs.*N >= 2"),
    ("gamma", 0, "decode.*: gamma"),
    ("temperature", -1.0, "decode.*: temperature must be >= 0"),
  ]:
    section = strategies.config_defaults()
    section[key] = value
    with pytest.raises(ValueError, match=message):
      strategies.validate_config(section)
  strategies.validate_config(strategies.config_defaults())


def test_hugging_face_checkpoint_decodes_with_every_lossless_strategy():
  """An HF-imported model (RecurrentGemma: soft-capped Griffin with local attention) goes through
  the same engine: greedy equals argmax of full forward passes, and lookahead and self-drafted
  speculative decoding equal greedy."""
  from fulcrum.platform import hf
  from tests.conftest import REPO

  model, params = hf.load_pretrained(REPO / "tests" / "fixtures" / "hf" / "tiny_recurrent_gemma")
  prompts, n = [[5, 9, 2, 7, 1, 3], [4, 4]], 5
  greedy = generate(model, params, prompts, n)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for row, prompt in zip(greedy.rows(), prompts, strict=True):
    buf = np.zeros((1, len(prompt) + n), np.int32)  # Causal: the zeros after do not matter.
    buf[0, : len(prompt)] = prompt
    for j in range(len(prompt), len(prompt) + n):
      buf[0, j] = int(np.argmax(forward(params, jnp.asarray(buf))[0, j - 1]))
    np.testing.assert_array_equal(row, buf[0, len(prompt) :])
  lookahead = generate(model, params, prompts, n, strategy=Lookahead(3, 3, 2))
  np.testing.assert_array_equal(lookahead.tokens, greedy.tokens)
  spec = generate(model, params, prompts, n, strategy=Speculative(Draft(model, params), gamma=2))
  np.testing.assert_array_equal(spec.tokens, greedy.tokens)
  assert spec.target_calls < greedy.target_calls  # A self-draft is always accepted.
