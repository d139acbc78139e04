"""SPIN's training pairs: gold responses and the opponent's own, scored once by the opponent.

`build` answers the prompts with the parameters in memory (the compiled batched `generate`,
sampling at `spin.temperature` / `spin.top_p`), encodes each (prompt, gold) and (prompt, y')
as a teacher-forced row with the prompt masked, and computes the opponent θ_t's sequence
log-probabilities of both once. The arrays are saved with the iteration (`save`, atomic), so a
resumed iteration trains on exactly the same pairs and no second model is kept in memory.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fulcrum.platform.data import instruct, instruct_pipeline
from fulcrum.platform.decode.autoregressive import Sample
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.errors import UserError
from fulcrum.platform.files import write_atomic
from fulcrum.platform.selfplay.loss import sequence_logprobs
from fulcrum.platform.training.tasks import instruction_following as instruct_task

SIDES = ("real", "generated")  # real = gold y, generated = the opponent's y'.
ROW_KEYS = ("inputs", "targets", "weights")
SCORE_BATCH = 64  # Pairs per compiled scoring call (the last chunk is padded).


def encode_row(prompt: np.ndarray, response: np.ndarray, seq_len: int):
  """(inputs, targets, weights) of prompt + response, cut to seq_len + 1 tokens and padded with
  0 (weight 0): weights are 1 on the targets that are response tokens."""
  tokens = np.concatenate([prompt, response]).astype(np.int32)[: seq_len + 1]
  row = instruct_pipeline.masked_row(tokens, len(prompt), seq_len)
  return tuple(row[k] for k in ROW_KEYS)


def _rows(prompts, responses, seq_len) -> dict[str, np.ndarray]:
  encoded = [encode_row(p, r, seq_len) for p, r in zip(prompts, responses, strict=True)]
  return {k: np.stack([e[i] for e in encoded]) for i, k in enumerate(ROW_KEYS)}


@functools.cache  # One compiled scorer per model (modules are hashable values).
def _score_fn(model):
  @jax.jit
  def score(params, inputs, targets, weights):
    logits = model.apply({"params": params}, inputs)
    return sequence_logprobs(logits, targets, weights)[0]

  return score


def score(model, params, rows: dict[str, np.ndarray]) -> np.ndarray:
  """Sequence log-probabilities Σ log p(response token) of every row under `params` (float32)."""
  fn = _score_fn(model)
  n = len(rows["inputs"])
  out = []
  for start in range(0, n, SCORE_BATCH):
    chunk = {k: v[start : start + SCORE_BATCH] for k, v in rows.items()}
    real = len(chunk["inputs"])
    pad = SCORE_BATCH - real
    chunk = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in chunk.items()}
    out.append(np.asarray(fn(params, *(jnp.asarray(chunk[k]) for k in ROW_KEYS)))[:real])
  return np.concatenate(out).astype(np.float32)


def build(
  model,
  params,
  tokenizer,
  problems: Sequence[instruct.Problem],
  *,
  seq_len: int,
  temperature: float,
  top_p: float,
  seed: int,
) -> tuple[dict[str, np.ndarray], list[str], dict[str, float]]:
  """The pairs for `problems`: arrays `real_*` / `generated_*` (inputs, targets, weights) and
  `opponent_real` / `opponent_generated` (θ_t's sequence log-probs), the generated texts, and
  generation statistics (tokens/s, the checker's accuracy of y')."""
  prompts = [tokenizer.encode(instruct.prompt_text(p)) for p in problems]
  max_new = max(1, seq_len + 1 - max(len(p) for p in prompts))
  max_new = min(max_new, instruct_task.max_answer_tokens(tokenizer, problems))
  texts, ids, tokens_per_s = instruct_task.answers(
    model,
    params,
    tokenizer,
    problems,
    max_new_tokens=max_new,
    strategy=Sample(),
    sampling=Sampling(temperature=temperature, top_p=top_p),
    seed=seed,
  )
  gold = [tokenizer.encode(p.response, add_eos=True) for p in problems]
  arrays = {}
  for side, responses in zip(SIDES, (gold, ids), strict=True):
    rows = _rows(prompts, responses, seq_len)
    arrays.update({f"{side}_{k}": v for k, v in rows.items()})
    arrays[f"opponent_{side}"] = score(model, params, rows)
  correct = [instruct.check(p, t) for p, t in zip(problems, texts, strict=True)]
  stats = {
    "generation_tokens_per_s": tokens_per_s,
    "generated_exact_match": float(np.mean(correct)),
    "generated_mean_tokens": float(np.mean([len(i) for i in ids])),
  }
  return arrays, texts, stats


def side_rows(arrays: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
  """The inputs/targets/weights of one side (`real` or `generated`)."""
  return {k: arrays[f"{side}_{k}"] for k in ROW_KEYS}


def rescore(model, params, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The same pairs with the opponent log-probs recomputed under `params` (mixing in an older
  iteration's pairs: its y' came from θ_{t−1}, its opponent is now θ_t)."""
  out = dict(arrays)
  for side in SIDES:
    out[f"opponent_{side}"] = score(model, params, side_rows(arrays, side))
  return out


def concat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def save(path: epath.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the pairs (npz) atomically; `meta` (JSON) rides along under the key `meta`."""
  buffer = io.BytesIO()
  np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
  write_atomic(epath.Path(path), buffer.getvalue())


def load(path: epath.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The arrays and meta `save` wrote."""
  with epath.Path(path).open("rb") as f:
    data = np.load(io.BytesIO(f.read()))
    arrays = {k: data[k] for k in data.files if k != "meta"}
    meta = json.loads(data["meta"].tobytes().decode()) if "meta" in data.files else {}
  return arrays, meta


def load_iteration_rows(path: str, key: str, run: str, recipe: str) -> dict[str, np.ndarray]:
  """The arrays an iteration of a driven run (SPIN, agent improvement) trains on, named by its
  config `key` = `path`; one line when this is the top-level config or the file is missing.
  Checked when the rows are read, not when the config is: a finished iteration (a moved workdir
  holds a stale path) still loads for evaluation and decoding."""
  if not path:
    raise UserError(
      f"this is {run} run's top-level config; its iterations train in WORKDIR/iterations/T"
    )
  if not epath.Path(path).exists():
    raise UserError(
      f"{key}={path} does not exist; the {recipe} driver writes it (run the {recipe} recipe's "
      "top-level workdir, not an iteration's)"
    )
  return load(path)[0]
