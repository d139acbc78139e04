"""Instruction following with answers a program checks (`task = "instruct"`).

The data are generated problems (`fulcrum.platform.data.instruct`: arithmetic, lists, counting,
base conversion, questions over stdlib snippets) formatted as prompt + response + EOS. The loss
is next-token cross-entropy on the response only (the prompt is masked). Evaluation reports:

  eval/response_loss, eval/response_bits_per_byte   teacher-forced, on `data.eval_split`
  eval/exact_match                                  greedy answers to the first
                                                    `data.instruct_eval_prompts` held-out
                                                    prompts, checked by each family's checker

`exact_match` and `answers` are what SPIN (`fulcrum.platform.selfplay`) and the benchmark use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from fulcrum.platform.data import instruct, instruct_pipeline
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.decode import generate
from fulcrum.platform.decode.autoregressive import Greedy
from fulcrum.platform.errors import UserError
from fulcrum.platform.training.tasks.base import Task, cross_entropy

LN2 = math.log(2.0)
# Prompts decoded per compiled call: the last chunk is padded to this size (one program).
ANSWER_BATCH = 256


def get_tokenizer(config):
  """The run's tokenizer (`data.tokenizer`: bytes, or hf:PATH)."""
  return tokenizer_lib.get_tokenizer(config.data.tokenizer)


def answers(
  model,
  params,
  tokenizer,
  problems: Sequence[instruct.Problem],
  *,
  max_new_tokens: int,
  strategy=Greedy(),
  sampling=None,
  seed: int = 0,
) -> tuple[list[str], list[np.ndarray], float]:
  """The model's answers to `problems` (decoded text and token ids) and generation tokens/s.

  Prompts are decoded up to ANSWER_BATCH at a time with the compiled `generate` (EOS stops a
  row); the last chunk is padded with copies of its first prompt so every call has one shape.
  """
  texts, ids, tokens, seconds = [], [], 0, 0.0
  prompts = [tokenizer.encode(instruct.prompt_text(p)) for p in problems]
  width = max(len(p) for p in prompts)
  size = min(ANSWER_BATCH, len(prompts))
  for start in range(0, len(prompts), size):
    chunk = prompts[start : start + size]
    real = len(chunk)
    chunk = chunk + [chunk[0]] * (size - real)
    out = generate(
      model,
      params,
      chunk,
      max_new_tokens,
      pad_to=width,  # The longest prompt overall: one compiled program for every chunk.
      strategy=strategy,
      sampling=sampling,
      stop_tokens=(tokenizer.EOS_ID,),
      seed=seed + start,
    )
    for row in out.rows()[:real]:
      ids.append(row)
      texts.append(tokenizer.decode(row))
    tokens += int(out.lengths[:real].sum())
    seconds += out.seconds
  return texts, ids, tokens / max(seconds, 1e-9)


def max_answer_tokens(tokenizer, problems: Sequence[instruct.Problem], margin: int = 4) -> int:
  """New tokens allowed per answer: the longest gold response + EOS + `margin`."""
  return max(len(tokenizer.encode(p.response)) for p in problems) + 1 + margin


def exact_match(model, params, tokenizer, problems: Sequence[instruct.Problem]) -> float:
  """Fraction of `problems` whose greedy answer the family's checker accepts."""
  texts, _, _ = answers(
    model, params, tokenizer, problems, max_new_tokens=max_answer_tokens(tokenizer, problems)
  )
  return float(np.mean([instruct.check(p, t) for p, t in zip(problems, texts, strict=True)]))


class Instruct(Task):
  """Supervised fine-tuning on checkable instruction → response pairs."""

  name = "instruct"

  def __init__(self, config):
    super().__init__(config)
    self.tokenizer = get_tokenizer(config)

  @classmethod
  def check_config(cls, config):
    d = config.data
    missing = [k for k in instruct.config_defaults() if k not in d]
    if missing:
      raise UserError(
        f"task=instruct needs the data.{missing[0]} key (and the other data.instruct_* keys); "
        "start the recipe from fulcrum.recipes._bases.instruct_config()"
      )
    try:
      instruct.validate_config(d)
    except ValueError as e:
      raise UserError(str(e)) from None
    if d.instruct_eval_prompts > d.instruct_eval_size:
      raise UserError(
        f"data.instruct_eval_prompts={d.instruct_eval_prompts} is more than the "
        f"data.instruct_eval_size={d.instruct_eval_size} held-out problems; lower it or raise "
        "data.instruct_eval_size"
      )
    tokenizer_lib.check_vocab(get_tokenizer(config), config.model.vocab_size)

  def example_inputs(self):
    return (jnp.zeros((1, min(self.config.train.seq_len, 8)), jnp.int32),)

  def train_iterator(self, process_index, process_count):
    t = self.config.train
    return instruct_pipeline.train_iterator(
      self.config.data,
      self.tokenizer,
      seq_len=t.seq_len,
      batch_size=t.batch_size,
      seed=t.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def eval_sets(self, process_index, process_count):
    t = self.config.train
    batches = instruct_pipeline.eval_batches(
      self.config.data,
      self.tokenizer,
      split=self.config.data.eval_split,
      seq_len=t.seq_len,
      batch_size=t.batch_size,
      num_batches=t.eval_batches,
      process_index=process_index,
      process_count=process_count,
    )
    return {"": batches}

  def eval_problems(self, split: str | None = None) -> list[instruct.Problem]:
    """The held-out problems `eval/exact_match` answers."""
    d = self.config.data
    return instruct_pipeline.eval_problems(d, split or d.eval_split, d.instruct_eval_prompts)

  def summary(self):
    d = self.config.data
    families = d.instruct_families or ", ".join(instruct.FAMILIES)
    return f"instruct ({families}): {d.instruct_train_size} train problems, seed {d.instruct_seed}"

  def loss(self, outputs, batch):
    return cross_entropy(outputs, batch["targets"], batch["weights"])

  def eval_sums(self, outputs, batch):
    loss, count = cross_entropy(outputs, batch["targets"], batch["weights"])
    return {"loss": loss * count, "count": count, "bytes": batch["target_bytes"].sum()}

  def eval_metrics(self, sums):
    nats = sums["loss"]
    return {
      "response_loss": nats / max(sums["count"], 1.0),
      "response_bits_per_byte": nats / LN2 / max(sums["bytes"], 1.0),
    }

  def generative_metrics(self, model, params):
    return {"exact_match": exact_match(model, params, self.tokenizer, self.eval_problems())}


TASK = Instruct
