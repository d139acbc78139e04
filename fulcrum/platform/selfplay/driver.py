"""The SPIN iterations (Chen et al. 2024, Algorithm 1), with generation from the live weights.

  θ_0 = the SFT run's newest checkpoint (`spin.init_from`)
  for t = 0 .. T−1:
    1. y' ~ p_θt(·|x) for `spin.num_prompts` training prompts: the compiled batched `generate`
       on the parameters already in memory (no export, no reload, no second engine);
    2. θ_t's sequence log-probs of y and y', computed once and stored with the pairs;
    3. θ_{t+1} = an ordinary training run of `task = spin` from θ_t's parameters, in
       WORKDIR/iterations/t/ (its own checkpoints, metrics and lock: a kill resumes mid-iteration,
       on exactly the stored pairs);
    4. one row per iteration in WORKDIR/metrics.jsonl: eval/exact_match, reward accuracy, mean
       log p(y) and log p(y'), generation tokens/s.

WORKDIR/sft.json holds θ_0's metrics (the row "SFT" of the table); WORKDIR/iterations/t/spin.json
each iteration's row, written once the iteration is whole.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from fulcrum import modules
from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.data import instruct_pipeline
from fulcrum.platform.errors import UserError
from fulcrum.platform.files import write_atomic
from fulcrum.platform.selfplay import pairs as pairs_lib
from fulcrum.platform.selfplay.loss import margin
from fulcrum.platform.training import init_from, trainer
from fulcrum.platform.training.experiment import build_experiment
from fulcrum.platform.training.tasks import instruction_following as instruct_task

log = logging.getLogger("fulcrum")

STATS_PAIRS = 512  # Pairs the per-iteration log-prob and reward statistics are measured on.
# Keys that must be the SFT run's: the model and the tokenizer its parameters were trained with.
INHERITED = ("model", "data.tokenizer")


SOURCE_KEY = "spin.init_from"  # The key naming θ_0's workdir (an agent's improvement: its own).


def source_config(config: ml_collections.ConfigDict, key: str = SOURCE_KEY):
  section, field = key.split(".")
  value = config[section][field]
  if not value.strip():
    raise UserError(
      f"{key} is empty; pass the workdir the run starts from (θ_0), e.g. --set "
      f"{key}=runs/{'instruct_sft' if key == SOURCE_KEY else 'agent_bc'}"
    )
  source = workdir_lib.resolve(value)
  return source, workdir_lib.read_config(source)


def with_source_model(config: ml_collections.ConfigDict, key: str = SOURCE_KEY):
  """`config` with the source run's model section (as `train.init_from=workdir:` would take it:
  the run keeps how it computes and its LoRA keys) and its tokenizer; `key` names the source."""
  _, sft = source_config(config, key)
  value = config[key.split(".")[0]][key.split(".")[1]]
  probe = copy.deepcopy(config)
  with probe.unlocked():
    probe.train.init_from = f"workdir:{value}"
  try:
    out = init_from.resolve_config(probe)
  except UserError as e:  # Name the key the user set, not the probe's.
    raise UserError(
      str(e).replace(f"train.init_from={probe.train.init_from}", f"{key}={value}", 1)
    ) from None
  with out.unlocked():
    out.train.init_from = ""  # Iterations start from parameters in memory, not from a source.
    if "tokenizer" in sft.data:
      out.data.tokenizer = sft.data.tokenizer
  return out


def iteration_config(config: ml_collections.ConfigDict, t: int, workdir: epath.Path):
  """The config of iteration t's training run (in `iteration_dir(workdir, t)`)."""
  s = config.spin
  c = copy.deepcopy(config)
  with c.unlocked():
    c.spin.pairs = str(iteration_dir(workdir, t) / "pairs.npz")
    c.train.steps = s.steps
    c.train.seed = config.train.seed + t
    c.optimizer.learning_rate = config.optimizer.learning_rate * s.lr_decay**t
  return c


iteration_dir = workdir_lib.iteration_dir


def read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def write_json(path: epath.Path, value: dict[str, Any]) -> None:
  write_atomic(path, json.dumps(value, sort_keys=True) + "\n")


def load_params(workdir: epath.Path):
  _, state, _ = workdir_lib.load(workdir)
  return state.params


def source_params(config: ml_collections.ConfigDict, source: epath.Path):
  """θ_0: the SFT run's newest params placed into this run's model as `train.init_from=workdir:`
  places them (this run's `scan_layers` layout; fresh LoRA adapters when this run adds them),
  not in the SFT run's own layout, which this run's model may not read."""
  probe = copy.deepcopy(config)
  with probe.unlocked():
    probe.train.init_from = f"workdir:{source}"
  exp = build_experiment(probe)
  fresh = exp.init_state().params if config.model.lora_rank else None
  return init_from.initial_params(probe, exp, fresh)


def _pair_stats(model, params, arrays, beta: float) -> dict[str, float]:
  """Mean log p(y), log p(y') under `params` and the implicit-reward accuracy (h > 0) on the
  first STATS_PAIRS pairs."""
  head = {k: v[:STATS_PAIRS] for k, v in arrays.items()}
  real = pairs_lib.score(model, params, pairs_lib.side_rows(head, "real"))
  gen = pairs_lib.score(model, params, pairs_lib.side_rows(head, "generated"))
  h = np.asarray(margin(real, gen, head["opponent_real"], head["opponent_generated"], beta))
  return {
    "spin/reward_accuracy": float(np.mean(h > 0)),
    "spin/logp_real": float(real.mean()),
    "spin/logp_generated": float(gen.mean()),
    "spin/opponent_logp_real": float(head["opponent_real"].mean()),
    "spin/opponent_logp_generated": float(head["opponent_generated"].mean()),
  }


def _make_pairs(config, t, workdir, model, params, tokenizer) -> dict[str, Any]:
  """Writes iteration t's pairs (from θ_t = `params`); returns the generation statistics."""
  s = config.spin
  problems = instruct_pipeline.eval_problems(config.data, "train", s.num_prompts)
  arrays, texts, stats = pairs_lib.build(
    model,
    params,
    tokenizer,
    problems,
    seq_len=config.train.seq_len,
    temperature=s.temperature,
    top_p=s.top_p,
    seed=config.train.seed * 1000 + t,
  )
  meta = {"iteration": t, "new_pairs": len(problems), **stats}
  if s.mix_previous and t > 0:
    previous, prev_meta = pairs_lib.load(iteration_dir(workdir, t - 1) / "pairs.npz")
    own = {k: v[: prev_meta.get("new_pairs", len(v))] for k, v in previous.items()}
    arrays = pairs_lib.concat(arrays, pairs_lib.rescore(model, params, own))
  directory = iteration_dir(workdir, t)
  directory.mkdir(parents=True, exist_ok=True)
  samples = [
    {"instruction": p.instruction, "gold": p.response, "generated": x}
    for p, x in zip(problems[:50], texts[:50], strict=True)
  ]
  write_atomic(directory / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
  pairs_lib.save(directory / "pairs.npz", arrays, meta)
  return meta


def write_metrics(workdir: epath.Path, rows: list[dict[str, Any]]) -> None:
  write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def iteration_table(rows: list[dict[str, Any]], first: str, later: str, columns) -> str:
  """Markdown, a line per row: `first` names θ_0's row (iteration −1), `later` the others
  (formatted with the iteration); `columns` are (title, key, format) with "–" where a row lacks
  the key."""
  lines = [
    "| " + " | ".join(["model"] + [c[0] for c in columns]) + " |",
    "|---|" + "---|" * len(columns),
  ]
  for r in rows:
    name = first if r["iteration"] < 0 else later.format(r["iteration"])
    cells = [f.format(r[k]) if k in r else "–" for _, k, f in columns]
    lines.append("| " + " | ".join([name, *cells]) + " |")
  return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
  """The per-iteration table (Markdown): exact match, reward accuracy, log-probs, gen tok/s."""
  columns = [
    ("exact match", "eval/exact_match", "{:.3f}"),
    ("reward acc.", "spin/reward_accuracy", "{:.3f}"),
    ("log p(y)", "spin/logp_real", "{:.2f}"),
    ("log p(y')", "spin/logp_generated", "{:.2f}"),
    ("gen tok/s", "spin/generation_tokens_per_s", "{:.0f}"),
  ]
  return iteration_table(rows, "SFT (θ_0)", "SPIN iteration {}", columns)


def run(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Runs (or resumes) SPIN from `spin.init_from` in `workdir`; returns the last row, the rows
  and the table."""
  sections.validate(config)
  config = with_source_model(config)
  sections.validate(config)
  source, _ = source_config(config)
  workdir = workdir_lib.prepare(workdir, config)
  with workdir_lib.Lock(workdir):
    params = source_params(config, source)  # θ_0, checked before anything is written.
    workdir_lib.accept(workdir, config)
    return _iterate(config, workdir, source, params)


def _iterate(config, workdir, source, params) -> dict[str, Any]:
  s = config.spin
  model = modules.build(config.model)
  tokenizer = instruct_task.get_tokenizer(config)
  problems = instruct_task.Instruct(config).eval_problems()
  sft = read_json(workdir / "sft.json")
  source_step = init_from.newest_step(str(source))
  if sft is None:
    sft = {
      "iteration": -1,
      "step": 0,
      "source": str(source),
      "source_step": source_step,
      "eval/exact_match": instruct_task.exact_match(model, params, tokenizer, problems),
    }
    write_json(workdir / "sft.json", sft)
  elif sft.get("source_step", source_step) != source_step:
    # The iterations here started from another θ_0: resuming them from this one would mix runs.
    raise UserError(
      f"{workdir} started SPIN from step {sft['source_step']} of {source}, which now holds step "
      f"{source_step}; use a new --workdir (or the original checkpoint)"
    )
  rows = [sft]
  log.info("spin: θ_0 (%s) exact match %.3f", source, sft["eval/exact_match"])
  for t in range(s.iterations):
    directory = iteration_dir(workdir, t)
    row = read_json(directory / "spin.json")
    if row is not None:  # Finished before: θ_{t+1} is read only if the next pairs need it.
      rows.append(row)
      params = None
      continue
    sub = iteration_config(config, t, workdir)
    if not (directory / "pairs.npz").exists():
      if params is None:
        params = load_params(iteration_dir(workdir, t - 1))
      gen = _make_pairs(config, t, workdir, model, params, tokenizer)
      log.info(
        "spin %d: %d pairs, y' exact match %.3f, %.0f tokens/s",
        t, gen["new_pairs"], gen["generated_exact_match"], gen["generation_tokens_per_s"],
      )  # fmt: skip
    arrays, gen = pairs_lib.load(directory / "pairs.npz")
    result, state = trainer.run(sub, directory, initial_params=params)
    if result.get("preempted"):  # Stopped mid-iteration (saved): rerunning resumes here.
      return {**result, "rows": rows, "table": format_table(rows), "workdir": str(workdir)}
    params = state.params
    row = {
      "iteration": t,
      "step": (t + 1) * s.steps,
      "pairs": int(len(arrays["opponent_real"])),
      "spin/generation_tokens_per_s": gen["generation_tokens_per_s"],
      "spin/generated_exact_match": gen["generated_exact_match"],
      "spin/loss": float(result.get("loss", float("nan"))),
      **{k: v for k, v in result.items() if k.startswith("eval/")},
      **_pair_stats(model, params, arrays, s.beta),
    }
    write_json(directory / "spin.json", row)
    rows.append(row)
    write_metrics(workdir, rows[1:])
    log.info("spin %d: exact match %.3f", t, row.get("eval/exact_match", float("nan")))
  write_metrics(workdir, rows[1:])
  jax.effects_barrier()
  table = format_table(rows)
  return {**rows[-1], "rows": rows, "table": table, "workdir": str(workdir)}
