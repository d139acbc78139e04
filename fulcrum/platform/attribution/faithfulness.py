"""Faithfulness of an attribution: deletion and insertion AUC against random orderings, and the
model-randomisation sanity check.

Deletion (Petsiuk et al. 2018, RISE): replace the features the attribution ranks highest by the
baseline, one more at a time, and follow F; a faithful ranking makes F fall fast (low AUC).
Insertion: start from the baseline and put the features back, highest first (high AUC). A
feature is a token position (its whole embedding) or one series value. The curves are
integrated with the trapezoid rule over the fraction of features changed, and the same curves
under random orderings (mean over several) are the reference. What is followed:

- a log-probability target: the probability relative to the input's, p(x_k) / p(x) — 1 at x,
  never below 0, comparable across inputs (RISE follows the class probability). Partly deleted
  contexts can be far less likely than the all-baseline one, which is why the log-probability
  itself is not normalised between its end points.
- other targets (logit, span log-likelihood, forecast): (F(x_k) − F(x')) / (F(x) − F(x')), so
  that deletion runs from 1 to 0 and insertion from 0 to 1 whatever the target's scale (values
  outside [0, 1] mean that a partial input overshoots both ends).

Model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): an attribution
that explains the model must change when the trained weights are replaced by random ones; the
Spearman rank correlation of |scores| between the two is reported (near 1 = the method ignores
the model).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fulcrum.platform.attribution.core import Subject


def _features(subject: Subject) -> int:
  z = subject.z
  return z.shape[0] if subject.address is not None else int(np.prod(z.shape))


def _mask(subject: Subject, removed: np.ndarray) -> jnp.ndarray:
  """[m, *z.shape] bool from [m, n_features] (positions broadcast over feature dims)."""
  z = subject.z
  if subject.address is None:
    return jnp.asarray(removed.reshape(removed.shape[0], *z.shape))
  return jnp.asarray(removed.reshape(*removed.shape, *([1] * (z.ndim - 1))))


def curves(
  subject: Subject, order: np.ndarray, baseline: Any = None, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
  """Deletion and insertion curves (n + 1 points each) for one feature ordering (see above)."""
  n = _features(subject)
  z, z0 = subject.z, subject.baseline(baseline)
  steps = np.arange(n + 1)[:, None]
  rank = np.empty(n, int)
  rank[order] = np.arange(n)
  first_k = rank[None, :] < steps  # [n + 1, n]: the k highest-ranked features.
  deleted = jnp.where(_mask(subject, first_k), z0[None], z[None])
  inserted = jnp.where(_mask(subject, first_k), z[None], z0[None])
  values = np.asarray(
    subject.evaluate(jnp.concatenate([deleted, inserted]), batch_size=batch_size), np.float64
  )
  if subject.target.kind == "logprob":
    # The probability relative to the input's: 1 at x, and >= 0 (RISE's probability curves).
    p = np.exp(values - values[0])
    return p[: n + 1], p[n + 1 :]
  f_x, f_0 = values[0], values[n + 1]  # Nothing deleted; nothing inserted.
  scale = f_x - f_0 if abs(f_x - f_0) > 1e-12 else 1e-12
  return (values[: n + 1] - f_0) / scale, (values[n + 1 :] - f_0) / scale


def _auc(curve: np.ndarray) -> float:
  x = np.linspace(0.0, 1.0, len(curve))
  return float(np.sum((curve[1:] + curve[:-1]) * np.diff(x)) / 2)


def faithfulness(
  subject: Subject,
  scores: np.ndarray,
  baseline: Any = None,
  random_orders: int = 8,
  seed: int = 0,
  batch_size: int = 32,
) -> dict[str, float]:
  """Deletion / insertion AUC of the ranking by `scores` (highest first) and of random rankings.

  Returns:
    deletion_auc, insertion_auc, random_deletion_auc, random_insertion_auc (means over
    `random_orders` permutations), and f_x / f_baseline (the unnormalised end points).
  """
  flat = np.asarray(scores, np.float64).reshape(-1)
  n = _features(subject)
  if flat.size != n:
    raise ValueError(f"{flat.size} scores for {n} features")
  order = np.argsort(-flat, kind="stable")
  deletion, insertion = curves(subject, order, baseline, batch_size)
  rng = np.random.default_rng(seed)
  rand = [curves(subject, rng.permutation(n), baseline, batch_size) for _ in range(random_orders)]
  ends = np.asarray(subject.evaluate(jnp.stack([subject.z, subject.baseline(baseline)])))
  return {
    "deletion_auc": _auc(deletion),
    "insertion_auc": _auc(insertion),
    "random_deletion_auc": float(np.mean([_auc(d) for d, _ in rand])),
    "random_insertion_auc": float(np.mean([_auc(i) for _, i in rand])),
    "f_x": float(ends[0]),
    "f_baseline": float(ends[1]),
  }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (average ranks for ties)."""

  def ranks(x):
    x = np.asarray(x, np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # Average ranks over ties.
      tie = x == v
      if tie.sum() > 1:
        r[tie] = r[tie].mean()
    return r

  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra**2).sum() * (rb**2).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else 0.0
