"""The SPIN objective (Chen et al. 2024, arXiv 2401.01335, eq. 4.7 and 4.8).

For a prompt x with gold response y and the opponent's (θ_t's) own response y', with sequence
log-probabilities (sums over the response tokens):

  h = β · [(log p_θ(y|x) − log p_θt(y|x)) − (log p_θ(y'|x) − log p_θt(y'|x))]
  logistic: ℓ(h) = log(1 + exp(−h)) = −log σ(h)        hinge: ℓ(h) = max(0, 1 − h)

It is DPO with chosen = gold and rejected = self-generated. At θ = θ_t, h = 0: the logistic loss
is log 2 and its gradient −β/2·∇(log p_θ(y) − log p_θ(y')). The opponent's log-probabilities are
computed once per iteration and stored with the pairs, so no second model is in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

LOSSES = ("logistic", "hinge")  # spin.loss


def margin(
  policy_real: Float[Array, " b"],
  policy_generated: Float[Array, " b"],
  opponent_real: Float[Array, " b"],
  opponent_generated: Float[Array, " b"],
  beta: float,
) -> Float[Array, " b"]:
  """h = β·[(log p_θ(y) − log p_θt(y)) − (log p_θ(y') − log p_θt(y'))], the implicit reward gap."""
  return beta * ((policy_real - opponent_real) - (policy_generated - opponent_generated))


def spin_loss(h: Float[Array, " b"], kind: str = "logistic") -> Float[Array, " b"]:
  """ℓ(h) per pair: logistic −log σ(h) (softplus(−h), stable for any h) or hinge max(0, 1 − h)."""
  if kind == "logistic":
    return jax.nn.softplus(-h)
  if kind == "hinge":
    return jax.nn.relu(1.0 - h)
  raise ValueError(f"spin.loss={kind!r} is unknown; choose one of {', '.join(LOSSES)}")


def sequence_logprobs(
  logits: Float[Array, "b t v"], targets: Array, weights: Float[Array, "b t"]
) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
  """Σ_t w·log p(target_t) per row (float32), and the number of weighted tokens per row."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  return (token * w).sum(-1), w.sum(-1)
