"""SPIN's training task (`task = "spin"`): one iteration's gold/generated pairs.

A SPIN run (`fulcrum.platform.selfplay.driver`) trains each iteration as an ordinary run of this
task in `WORKDIR/iterations/T/`, whose `spin.pairs` names the pairs file the driver wrote there.
Batches hold both sides of each pair and the opponent's cached log-probs; the model runs once on
the 2b rows. Evaluation is the instruct task's (`eval/exact_match`, response bits per byte).
"""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np

from fulcrum.platform.data import instruct_pipeline
from fulcrum.platform.selfplay import pairs as pairs_lib
from fulcrum.platform.selfplay.loss import margin, sequence_logprobs, spin_loss
from fulcrum.platform.training.tasks.instruction_following import Instruct


class Spin(Instruct):
  """Self-play fine-tuning on stored pairs (the loss in `selfplay.loss`)."""

  name = "spin"

  def _arrays(self) -> dict[str, np.ndarray]:
    return pairs_lib.load_iteration_rows(self.config.spin.pairs, "spin.pairs", "a SPIN", "spin")

  def train_iterator(self, process_index, process_count):
    t = self.config.train
    source = grain.MapDataset.source(instruct_pipeline.ArrayRows(self._arrays()))
    fingerprint = {"source": f"spin pairs {self.config.spin.pairs}", "num_pairs": len(source)}
    fingerprint["seq_len"] = t.seq_len
    return instruct_pipeline.shuffled_batches(
      source, fingerprint, t.batch_size, t.seed, process_index, process_count
    )

  def model_inputs(self, batch):
    if "real_inputs" not in batch:  # Instruct eval batches.
      return super().model_inputs(batch)
    return (jnp.concatenate([batch["real_inputs"], batch["generated_inputs"]]),)

  def loss(self, outputs, batch):
    if "real_inputs" not in batch:
      return super().loss(outputs, batch)
    s = self.config.spin
    b = batch["real_inputs"].shape[0]
    targets = jnp.concatenate([batch["real_targets"], batch["generated_targets"]])
    weights = jnp.concatenate([batch["real_weights"], batch["generated_weights"]])
    logp, counts = sequence_logprobs(outputs, targets, weights)
    h = margin(logp[:b], logp[b:], batch["opponent_real"], batch["opponent_generated"], s.beta)
    loss = spin_loss(h, s.loss).mean()
    if s.nll_weight:
      loss = loss - s.nll_weight * logp[:b].sum() / jnp.maximum(counts[:b].sum(), 1.0)
    return loss, jnp.asarray(b, jnp.float32)


TASK = Spin
