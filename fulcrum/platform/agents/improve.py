"""Improving an LM agent beyond its demonstrations, in rounds on its own rollouts
(`task = agent_improve`): policy gradient with a leave-one-out baseline and PPO's clipped ratio,
and (`improve.relabel`) DAgger's expert labels for the states the agent itself reached.

  θ_0 = the agent run's newest checkpoint (`improve.init_from`, e.g. agent_bc's)
  for t = 0 .. T−1:
    1. θ_t plays `improve.episodes` episodes of every selected task on fresh training seeds,
       sampling its actions (`improve.temperature`) in compiled rollouts (one per episode length,
       so short tasks do not wait for long ones);
    2. each episode's return R = best progress + `improve.success_bonus` · success; its advantage
       A = R − the mean return of the other episodes of the same task (the RLOO baseline: the
       gradient stays unbiased, and tasks the agent always or never solves add no rows);
    3. every turn of an episode with A ≠ 0 becomes a row (its context → the action written) with
       A / the episode's turns (× the mean turns: every episode weighs alike, as GRPO's
       per-sequence normalisation) and θ_t's log-prob of the action; θ_{t+1} = an ordinary run
       of `task = agent_improve` from θ_t on those rows (the clipped loss in
       `tasks/agent_policy_gradient.py`), in
       WORKDIR/iterations/t/ (its own checkpoints, metrics and lock: a kill resumes there);
       with `improve.relabel`, every turn played also becomes a demonstration row labelled with
       the planner's action in that state (`relabel.py`), trained with `improve.demo_weight`
       beside `improve.demos_per_task` planner episodes a task: the agent learns what to do in
       the states its own mistakes lead to, which behaviour cloning never shows it; with
       `improve.aggregate` each round also keeps every earlier round's labelled states
       (DAgger's aggregate dataset, WORKDIR/iterations/s/relabelled.npz); `improve.pg_weight`
       scales the policy-gradient term (0: DAgger alone);
    4. one row per iteration in WORKDIR/metrics.jsonl: held-out success, the rollouts' success
       and return, rows, env steps/s.

WORKDIR/base.json holds θ_0's held-out evaluation; WORKDIR/iterations/t/improve.json each
iteration's row, written once the iteration is whole.
"""

from __future__ import annotations

import collections
import copy
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from fulcrum import modules
from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import demos, envs, evaluation, relabel, rollout
from fulcrum.platform.data.instruct_pipeline import masked_row
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.errors import UserError
from fulcrum.platform.selfplay import driver
from fulcrum.platform.selfplay import pairs as arrays_file
from fulcrum.platform.training import init_from, trainer
from fulcrum.platform.training.tasks.agent_policy_gradient import AgentImprove

log = logging.getLogger("fulcrum")

SOURCE_KEY = "improve.init_from"
TRAIN_SEED = 100_000  # Rollout seeds: iteration t plays from TRAIN_SEED + t · SEED_STRIDE.
SEED_STRIDE = 10_000  # (Demonstrations use seeds from 0, evaluation from EVAL_SEED.)
ROW_KEYS = ("inputs", "targets", "weights")
RELABELLED = "relabelled.npz"  # An iteration's own relabelled rows (improve.aggregate reads them).


def with_source_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model of the agent run it starts from (`improve.init_from`); a source
  that is not an agent is refused in one line."""
  source, source_config = driver.source_config(config, SOURCE_KEY)
  if source_config.get("task") not in ("agent", "agent_improve"):
    raise UserError(
      f"improve.init_from={config.improve.init_from}: {source} trained "
      f"task={source_config.get('task')!r}, not an agent; start from an agent_bc run"
    )
  return driver.with_source_model(config, SOURCE_KEY)


def iteration_config(config: ml_collections.ConfigDict, t: int, workdir: epath.Path):
  """The config of iteration t's training run (in `iteration_dir(workdir, t)`)."""
  i = config.improve
  c = copy.deepcopy(config)
  with c.unlocked():
    c.improve.rollouts = str(workdir_lib.iteration_dir(workdir, t) / "rollouts.npz")
    c.train.steps = i.steps
    c.train.seed = config.train.seed + t
    c.train.eval_every = 0  # Evaluated once, at the iteration's end.
    c.train.checkpoint_every = i.steps
  return c


def advantages(returns: np.ndarray) -> np.ndarray:
  """[groups, n] returns → each one minus the mean of the other n − 1 of its group (RLOO)."""
  n = returns.shape[-1]
  return returns - (returns.sum(-1, keepdims=True) - returns) / (n - 1)


def _rows(interface: rollout.Interface, contexts: np.ndarray, actions: np.ndarray):
  """Masked rows of (context → action) pairs, loss on the action's bytes."""
  n = demos.seq_len(interface)
  if not len(actions):
    return {k: np.zeros((0, n), np.float32 if k == "weights" else np.int32) for k in ROW_KEYS}
  out = [
    masked_row(
      np.concatenate([ctx, np.frombuffer(interface.actions[a].encode(), np.uint8)]), len(ctx), n
    )
    for ctx, a in zip(contexts, actions, strict=True)
  ]
  return {k: np.stack([r[k] for r in out]).astype(out[0][k].dtype) for k in ROW_KEYS}


def collect(model, params, config: ml_collections.ConfigDict, t: int):
  """θ_t's rollouts of iteration t: (policy-gradient rows with their advantages, the planner's
  labels of the states they reached as demonstration rows (None without `improve.relabel`),
  statistics)."""
  i = config.improve
  interface = evaluation.interface(config)
  groups = collections.defaultdict(list)
  for task in evaluation.selected_tasks(config):
    groups[task.max_steps].append(task)
  sampling = Sampling(temperature=i.temperature)
  seed = TRAIN_SEED + t * SEED_STRIDE
  contexts, actions, weights, returns, successes, episode_turns = [], [], [], [], [], []
  expert_contexts, expert_actions, greedy_success = [], [], []
  agreement = {"sampled": [], "greedy": []}
  start = time.perf_counter()
  for steps, chosen in sorted(groups.items()):
    played = [task for task in chosen for _ in range(i.episodes)]
    seeds = jnp.asarray(seed + np.arange(len(played)), jnp.int32)
    seed += len(played)
    task_arrays = envs.stack([envs.to_arrays(x) for x in played])
    turns, _ = rollout.rollout(
      model, interface, sampling, steps, params, task_arrays, seeds, jax.random.key(seed)
    )  # fmt: skip
    if i.relabel:
      played_turns = [("sampled", turns)]
      if i.relabel_greedy:  # The states the agent reaches as it is evaluated (its loops).
        greedy, _ = rollout.rollout(
          model, interface, Sampling(), steps, params, task_arrays, seeds, jax.random.key(seed)
        )  # fmt: skip
        played_turns.append(("greedy", greedy))
        greedy_success.append(evaluation.episode_outcomes(greedy)["success"])
      for kind, source in played_turns:
        labels = relabel.oracle_actions(interface, task_arrays, seeds, source)
        step_idx, env_idx = np.nonzero(labels >= 0)
        expert_contexts.append(np.asarray(source.context)[step_idx, env_idx])
        expert_actions.append(labels[step_idx, env_idx])
        agreement[kind].append(np.asarray(source.action)[step_idx, env_idx] == expert_actions[-1])
    outcomes = evaluation.episode_outcomes(turns)
    ret = outcomes["progress"] + i.success_bonus * outcomes["success"]
    adv = advantages(ret.reshape(len(chosen), i.episodes)).reshape(-1)
    live = np.asarray(turns.live) & (np.asarray(turns.action) >= 0)
    lengths = np.maximum(live.sum(0), 1)  # Each episode's turns.
    keep = (adv != 0) & (i.pg_weight > 0)  # pg_weight = 0: no policy-gradient rows.
    step_idx, env_idx = np.nonzero(live & keep[None])
    contexts.append(np.asarray(turns.context)[step_idx, env_idx])
    actions.append(np.asarray(turns.action)[step_idx, env_idx])
    weights.append((adv / lengths)[env_idx].astype(np.float32))
    episode_turns.append(lengths)
    returns.append(ret)
    successes.append(outcomes["success"])
  seconds = time.perf_counter() - start
  episode_turns = np.concatenate(episode_turns)
  contexts, actions = np.concatenate(contexts), np.concatenate(actions)
  if not len(actions) and not i.relabel and i.demo_weight == 0:  # (pg_weight > 0 here)
    raise UserError(
      f"iteration {t}: every task's {i.episodes} episodes had the same return, so there is "
      "nothing to learn from; raise improve.episodes or improve.temperature"
    )
  arrays = _rows(interface, contexts, actions)
  # Each episode's rows share its advantage: A / its turns, times the mean episode's turns (an
  # episode weighs A whatever its length, as GRPO's per-sequence normalisation; unnormalised,
  # long failing episodes' rows outnumbered the short successes' and lowered success).
  arrays["advantage"] = np.concatenate(weights) * np.float32(episode_turns.mean())
  arrays["demo"] = np.zeros(len(actions), np.float32)
  # θ_t's log-probabilities of the actions it took, as the loss computes them (the ratio's base).
  arrays["old_logp"] = arrays_file.score(model, params, arrays) if len(actions) else \
    np.zeros(0, np.float32)  # fmt: skip
  expert = None
  if i.relabel:
    expert = _as_demos(_rows(interface, np.concatenate(expert_contexts),
                             np.concatenate(expert_actions)))  # fmt: skip
  stats = {
    "improve/rollout_success": float(np.concatenate(successes).mean()),
    "improve/rollout_return": float(np.concatenate(returns).mean()),
    "improve/rows": int(len(actions)),
    "improve/turns": int(episode_turns.sum()),
    "improve/rollout_steps_per_s": int(episode_turns.sum()) / seconds,  # Compilation included.
  }
  if i.relabel:  # How often the agent's action was the planner's (on its own states).
    stats["improve/planner_agreement"] = float(np.concatenate(agreement["sampled"]).mean())
    stats["improve/relabelled"] = int(sum(len(a) for a in expert_actions))
  if greedy_success:  # θ_t greedy on the training seeds, and its agreement with the planner.
    stats["improve/greedy_success"] = float(np.concatenate(greedy_success).mean())
    stats["improve/planner_agreement_greedy"] = float(np.concatenate(agreement["greedy"]).mean())
  return arrays, expert, stats


def training_rows(config, workdir: epath.Path, t: int, arrays, expert, stats):
  """Round t's training rows: its policy-gradient rows, the planner's labels of the states it
  reached (saved in its directory first; with `improve.aggregate` every earlier round's too)
  and the planner demonstrations (demo_weight > 0); and `stats` with the labelled rows' count."""
  i = config.improve
  directory = workdir_lib.iteration_dir(workdir, t)
  directory.mkdir(parents=True, exist_ok=True)
  if expert is not None:  # This round's labelled states, kept apart for later rounds.
    arrays_file.save(directory / RELABELLED, expert, {"iteration": t})
    if i.aggregate:  # DAgger's aggregate dataset: every earlier round's labelled states too.
      expert = arrays_file.concat(*[_relabelled(workdir, s) for s in range(t)], expert)
    stats = {**stats, "improve/relabelled_total": len(expert["inputs"])}
    arrays = arrays_file.concat(arrays, expert)
  if i.demo_weight > 0:
    arrays = arrays_file.concat(arrays, _demo_rows(config, workdir))
  return arrays, stats


def _relabelled(workdir: epath.Path, t: int) -> dict[str, np.ndarray]:
  """Round t's relabelled rows (written before its rollout file, so present once that is)."""
  path = workdir_lib.iteration_dir(workdir, t) / RELABELLED
  if not path.exists():
    raise UserError(
      f"improve.aggregate: {path} is missing (round {t} ran without improve.relabel); use a new "
      "--workdir"
    )
  return arrays_file.load(path)[0]


def _as_demos(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rows trained by the demonstration loss (demo_weight × NLL), not the policy gradient."""
  n = len(arrays["inputs"])
  zeros = np.zeros(n, np.float32)
  return {**arrays, "advantage": zeros, "demo": np.ones(n, np.float32), "old_logp": zeros}


def _demo_rows(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, np.ndarray]:
  """Planner demonstration rows for the anchor (made once per run, in WORKDIR/demos.npz)."""
  path = workdir / "demos.npz"
  if path.exists():
    return arrays_file.load(path)[0]
  i = config.improve
  eps = demos.cached_episodes(evaluation.selected_tasks(config), range(i.demos_per_task),
                              demos.cache_dir(config))  # fmt: skip
  rows = demos.rows(evaluation.interface(config), eps)
  arrays = _as_demos({k: v for k, v in rows.items() if k in ROW_KEYS})
  arrays_file.save(path, arrays, {"demos_per_task": i.demos_per_task})
  return arrays


def _episodes(config) -> int:
  return len(evaluation.selected_tasks(config)) * config.agent.eval_episodes


def _with_interval(row: dict[str, Any], config) -> dict[str, Any]:
  """`row` with the Wilson 95% half-width of its held-out success rate."""
  n = _episodes(config)
  return {**row, "eval/success_ci95": evaluation.ci95(round(row["eval/success"] * n), n)}


def _evaluate(model, params, config) -> dict[str, Any]:
  """θ_0's held-out evaluation: what an iteration's run reports at its end (the agent task's
  `generative_metrics`, on the same seeds)."""
  task = AgentImprove(config)
  return _with_interval({f"eval/{k}": v for k, v in task.generative_metrics(model, params).items()},
                        config)  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
  """The per-iteration table (Markdown)."""
  columns = [
    ("held-out success", "eval/success", "{:.3f}"),
    ("± 95%", "eval/success_ci95", "{:.3f}"),
    ("progress", "eval/progress", "{:.3f}"),
    ("rollout success", "improve/rollout_success", "{:.3f}"),
    ("rollout return", "improve/rollout_return", "{:.3f}"),
    ("rows", "improve/rows", "{:d}"),
    ("greedy success (train seeds)", "improve/greedy_success", "{:.3f}"),
    ("relabelled rows", "improve/relabelled", "{:d}"),
    ("labelled rows trained", "improve/relabelled_total", "{:d}"),
  ]
  return driver.iteration_table(rows, "θ_0 (start)", "iteration {}", columns)


def run(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Runs (or resumes) the improvement from `improve.init_from` in `workdir`; returns the last
  row, the rows and the table."""
  sections.validate(config)
  config = with_source_model(config)
  sections.validate(config)
  source, _ = driver.source_config(config, SOURCE_KEY)
  workdir = workdir_lib.prepare(workdir, config)
  with workdir_lib.Lock(workdir):
    params = driver.source_params(config, source)  # θ_0, checked before anything is written.
    workdir_lib.accept(workdir, config)
    return _iterate(config, workdir, source, params)


def _iterate(config, workdir, source, params) -> dict[str, Any]:
  i = config.improve
  model = modules.build(config.model)
  base = driver.read_json(workdir / "base.json")
  source_step = init_from.newest_step(str(source))
  if base is None:
    base = {"iteration": -1, "step": 0, "source": str(source), "source_step": source_step}
    base.update(_evaluate(model, params, config))
    driver.write_json(workdir / "base.json", base)
  elif base.get("source_step", source_step) != source_step:
    raise UserError(
      f"{workdir} started from step {base['source_step']} of {source}, which now holds step "
      f"{source_step}; use a new --workdir (or the original checkpoint)"
    )
  rows = [base]
  log.info("improve: θ_0 (%s) held-out success %.3f", source, base["eval/success"])
  for t in range(i.iterations):
    directory = workdir_lib.iteration_dir(workdir, t)
    row = driver.read_json(directory / "improve.json")
    if row is not None:  # Finished before: θ_{t+1} is read only if the next rollouts need it.
      rows.append(row)
      params = None
      continue
    sub = iteration_config(config, t, workdir)
    path = directory / "rollouts.npz"
    if not path.exists():
      if params is None:
        params = driver.load_params(workdir_lib.iteration_dir(workdir, t - 1))
      arrays, expert, stats = collect(model, params, config, t)
      arrays, stats = training_rows(config, workdir, t, arrays, expert, stats)
      arrays_file.save(path, arrays, {"iteration": t, **stats})
      log.info(
        "improve %d: %d rows, rollout success %.3f, %.0f env steps/s",
        t, stats["improve/rows"], stats["improve/rollout_success"],
        stats["improve/rollout_steps_per_s"],
      )  # fmt: skip
    _, stats = arrays_file.load(path)
    result, state = trainer.run(sub, directory, initial_params=params)
    if result.get("preempted"):  # Stopped mid-iteration (saved): rerunning resumes here.
      return {**result, "rows": rows, "table": format_table(rows), "workdir": str(workdir)}
    params = state.params
    row = {
      "iteration": t,
      "step": (t + 1) * i.steps,
      "improve/loss": float(result.get("loss", float("nan"))),
      **{k: v for k, v in stats.items() if k.startswith("improve/")},
      **{k: v for k, v in result.items() if k.startswith("eval/")},
    }
    row = _with_interval(row, config)
    driver.write_json(directory / "improve.json", row)
    rows.append(row)
    driver.write_metrics(workdir, rows[1:])
    log.info("improve %d: held-out success %.3f", t, row["eval/success"])
  driver.write_metrics(workdir, rows[1:])
  jax.effects_barrier()
  return {**rows[-1], "rows": rows, "table": format_table(rows), "workdir": str(workdir)}
