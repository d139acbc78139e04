"""PPO (Schulman et al. 2017) on a JAX environment, every update one compiled program
(`task = ppo`; Craftax-Classic's achievements reported as its paper does).

One update: the policy and `ppo.num_envs` environments step `ppo.num_steps` times in a
`lax.scan` (episodes that end restart from a pool of fresh worlds), GAE(γ, λ) advantages, then
`ppo.epochs` passes of `ppo.minibatches` minibatches of the clipped surrogate
  L = −min(r·Â, clip(r, 1 ± ε)·Â) + c_v · ½ max((V − R)², (V_clip − R)²) − c_e · H(π),
Â normalised per minibatch, Adam with a linearly annealed learning rate and a global-norm clip.
The network (`ppo.backbone`, `policies.py`): separate MLP towers for the policy and the value,
or a Mamba / Hawk block stack whose memory runs over the episode (reset where one opens); the
recurrent update trains on whole rollout sequences per environment, from the memory the rollout
started with (minibatches of environments, not of steps).

A run writes WORKDIR/config.json, checkpoints (the whole runner: parameters, optimizer,
environments, PRNG keys; every `ppo.checkpoint_every` updates, at the end and on SIGTERM: a
rerun resumes exactly), metrics.jsonl (a row every `ppo.log_every` updates: return, episode
length, achievements per episode, losses, steps/s) and achievements.json: each achievement's
success rate over the episodes that ended in the last `ppo.report_fraction` of training, and the
Crafter score (the geometric mean of 1 + rate %, less 1).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from fulcrum.platform import sections
from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.agents import policies
from fulcrum.platform.agents.envs import craftax
from fulcrum.platform.errors import UserError
from fulcrum.platform.files import write_atomic
from fulcrum.platform.training.checkpoint import Checkpointer
from fulcrum.platform.training.metrics import progress_bar
from fulcrum.platform.training.trainer import StopSignal

log = logging.getLogger("fulcrum")


class Runner(NamedTuple):
  """Everything an update reads and writes (checkpointed whole)."""

  params: Any
  opt_state: Any
  env: craftax.CraftaxState  # [num_envs].
  obs: jax.Array  # [num_envs, obs].
  pool: craftax.WorldPool
  key: jax.Array  # Raw uint32 key (checkpointable).
  update: jax.Array  # Updates done.
  # A recurrent backbone's (first [num_envs] bool: the observation opens an episode, the
  # layers' caches); () for the MLP.
  memory: Any = ()


class Transition(NamedTuple):
  obs: jax.Array
  first: jax.Array  # The observation opened an episode.
  action: jax.Array
  logp: jax.Array
  value: jax.Array
  reward: jax.Array
  ended: jax.Array  # The episode ended at this step (the next observation is a new one's).
  achievements: jax.Array  # [n, 22] bool, of the episode this step ended.
  episode_return: jax.Array
  episode_length: jax.Array


def num_updates(p: ml_collections.ConfigDict) -> int:
  return p.total_steps // (p.num_envs * p.num_steps)


def network(p: ml_collections.ConfigDict):
  return policies.build(p.backbone, len(craftax.ACTIONS), p.width, p.depth)


def _recurrent(p: ml_collections.ConfigDict) -> bool:
  return p.backbone in policies.RECURRENT


def _split_memory(p, memory, n: int):
  """(first [n], the network's memory) of a Runner's `memory` field."""
  if _recurrent(p):
    return memory
  return jnp.zeros((n,), bool), ()


def _policy(net, params, obs, first, memory):
  """One step of the network for every environment: (logits, value, memory)."""
  logits, value, memory = net.apply({"params": params}, obs[:, None], first[:, None], memory)
  return logits[:, 0], value[:, 0], memory


def optimizer(p: ml_collections.ConfigDict) -> optax.GradientTransformation:
  steps = num_updates(p) * p.epochs * p.minibatches
  lr = optax.linear_schedule(p.learning_rate, 0.0, steps)
  return optax.chain(optax.clip_by_global_norm(p.max_grad_norm), optax.adam(lr, eps=1e-5))


def init_runner(p: ml_collections.ConfigDict, seed: int) -> Runner:
  key = jax.random.PRNGKey(seed)
  k_net, k_env, k_pool, key = jax.random.split(key, 4)
  env, obs = jax.vmap(craftax.reset)(jax.random.split(k_env, p.num_envs))
  net = network(p)
  params = net.init(k_net, obs[:1, None], jnp.ones((1, 1), bool), net.initial_memory(1))["params"]
  opt_state = optimizer(p).init(params)
  pool = craftax.world_pool(k_pool, p.pool)
  memory = (jnp.ones((p.num_envs,), bool), net.initial_memory(p.num_envs)) if _recurrent(p) else ()
  return Runner(params, opt_state, env, obs, pool, key, jnp.zeros((), jnp.int32), memory)


def gae(rewards, values, ended, last_value, gamma: float, lam: float):
  """Generalised advantage estimates and value targets ([T, n] each), time-major."""

  def body(carry, x):
    adv_next, value_next = carry
    reward, value, done = x
    keep = 1.0 - done.astype(jnp.float32)
    delta = reward + gamma * value_next * keep - value
    adv = delta + gamma * lam * keep * adv_next
    return (adv, value), adv

  init = (jnp.zeros_like(last_value), last_value)
  _, adv = jax.lax.scan(body, init, (rewards, values, ended), reverse=True)
  return adv, adv + values


def ppo_loss(params, forward, batch, p: ml_collections.ConfigDict):
  """The clipped surrogate, clipped value loss and entropy bonus of a minibatch.
  `forward(params, batch)` gives the logits and values of its samples, flattened."""
  logits, value = forward(params, batch)
  flat = {k: batch[k].reshape(-1) for k in ("action", "logp", "value", "adv", "target")}
  logp_all = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(logp_all, flat["action"][:, None], -1)[:, 0]
  ratio = jnp.exp(logp - flat["logp"])
  adv = (flat["adv"] - flat["adv"].mean()) / (flat["adv"].std() + 1e-8)
  policy = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - p.clip, 1 + p.clip) * adv).mean()
  clipped = flat["value"] + jnp.clip(value - flat["value"], -p.clip, p.clip)
  value_loss = 0.5 * jnp.maximum((value - flat["target"]) ** 2,
                                 (clipped - flat["target"]) ** 2).mean()  # fmt: skip
  entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
  total = policy + p.vf_coef * value_loss - p.ent_coef * entropy
  return total, {"policy_loss": policy, "value_loss": value_loss, "entropy": entropy}


def _key(p: ml_collections.ConfigDict) -> tuple:
  return tuple(sorted(p.to_dict().items()))


def make_update(p: ml_collections.ConfigDict):
  """The jitted update: Runner → (Runner, metrics of this update); one per `ppo.*` setting."""
  return _make_update(_key(p))


def _rollout(p: ml_collections.ConfigDict, runner: Runner, steps: int):
  """`steps` steps of every environment with the policy sampling its actions (traced)."""
  net = network(p)

  def act(runner, _):
    key, k_act = jax.random.split(runner.key)
    first, memory = _split_memory(p, runner.memory, runner.obs.shape[0])
    logits, value, memory = _policy(net, runner.params, runner.obs, first, memory)
    action = jax.random.categorical(k_act, logits)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
    env, obs, reward, ended, info, pool = craftax.auto_reset_batch(runner.env, action, runner.pool)
    step = Transition(runner.obs, first, action, logp, value, reward, ended, info["achievements"],
                      info["episode_return"], info["episode_length"])  # fmt: skip
    memory = (ended, memory) if _recurrent(p) else ()  # An ended episode's next obs opens one.
    return runner._replace(env=env, obs=obs, pool=pool, key=key, memory=memory), step

  return jax.lax.scan(act, runner, None, steps)


def _episode_sums(traj: Transition) -> dict[str, jax.Array]:
  ended = traj.ended.astype(jnp.float32)
  return {
    "episodes": ended.sum(),
    "return_sum": (traj.episode_return * ended).sum(),
    "length_sum": (traj.episode_length * ended).sum(),
    "achievements": (traj.achievements * ended[..., None]).sum((0, 1)),
  }


def play(p: ml_collections.ConfigDict, params, seed: int, steps: int) -> dict[str, Any]:
  """Episode totals (`Tally.add`'s input) of `params`' policy over `steps` steps of
  `ppo.num_envs` fresh environments, and the env steps/s of that compiled loop (its second
  call: compilation excluded). With the policy head zeroed, it is the uniform random agent."""
  fn = _play_fn(_key(p), steps)
  runner = _init_fn(_key(p), seed)()._replace(params=params)
  jax.block_until_ready(fn(runner))
  start = time.perf_counter()
  sums = jax.device_get(fn(runner))
  return {**sums, "steps_per_s": p.num_envs * steps / (time.perf_counter() - start)}


@functools.cache
def _play_fn(key: tuple, steps: int):
  p = ml_collections.ConfigDict(dict(key))
  return jax.jit(lambda runner: _episode_sums(_rollout(p, runner, steps)[1]))


def uniform_policy(params):
  """`params` with the policy head zeroed: every action equally likely (the random agent)."""

  def zero(path, x):
    return jnp.zeros_like(x) if any(getattr(k, "key", None) == "policy" for k in path) else x

  return jax.tree_util.tree_map_with_path(zero, params)


@functools.cache
def _make_update(key: tuple):
  p = ml_collections.ConfigDict(dict(key))
  net, tx = network(p), optimizer(p)

  recurrent = _recurrent(p)

  def forward(params, batch):
    if recurrent:  # Whole sequences [envs, T] from the memory their rollout started with.
      logits, value, _ = net.apply({"params": params}, batch["obs"], batch["first"],
                                   batch["memory"])  # fmt: skip
      return logits.reshape(-1, logits.shape[-1]), value.reshape(-1)
    logits, value, _ = net.apply({"params": params}, batch["obs"][:, None])
    return logits[:, 0], value[:, 0]

  def update(runner: Runner):
    start_memory = _split_memory(p, runner.memory, p.num_envs)[1]
    runner, traj = _rollout(p, runner, p.num_steps)
    first, memory = _split_memory(p, runner.memory, p.num_envs)
    _, last_value, _ = _policy(net, runner.params, runner.obs, first, memory)
    adv, target = gae(traj.reward, traj.value, traj.ended, last_value, p.gamma, p.gae_lambda)
    data = {
      "obs": traj.obs, "first": traj.first, "action": traj.action, "logp": traj.logp,
      "value": traj.value, "adv": adv, "target": target,
    }  # fmt: skip
    if recurrent:  # Minibatches of environments: [envs, T, ...] and each one's start memory.
      n = p.num_envs
      data = {**jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), data), "memory": start_memory}
    else:  # Minibatches of steps.
      n = p.num_envs * p.num_steps
      data = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), data)

    def epoch(carry, key):
      params, opt_state = carry
      order = jax.random.permutation(key, n).reshape(p.minibatches, -1)

      def minibatch(carry, idx):
        params, opt_state = carry
        batch = jax.tree.map(lambda x: x[idx], data)
        grads, stats = jax.grad(ppo_loss, has_aux=True)(params, forward, batch, p)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), stats

      return jax.lax.scan(minibatch, (params, opt_state), order)

    key, k_epochs = jax.random.split(runner.key)
    (params, opt_state), stats = jax.lax.scan(
      epoch, (runner.params, runner.opt_state), jax.random.split(k_epochs, p.epochs)
    )
    metrics = {**_episode_sums(traj), **jax.tree.map(jnp.mean, stats)}
    runner = runner._replace(params=params, opt_state=opt_state, key=key,
                             update=runner.update + 1)  # fmt: skip
    return runner, metrics

  return jax.jit(update, donate_argnums=0)


@functools.cache
def _init_fn(key: tuple, seed: int):
  p = ml_collections.ConfigDict(dict(key))
  return jax.jit(lambda: init_runner(p, seed))


def crafter_score(rates: dict[str, float]) -> float:
  """Crafter's score: exp(mean ln(1 + 100·rate)) − 1, in percent."""
  return float(np.exp(np.mean([np.log(1 + 100 * r) for r in rates.values()])) - 1)


class Tally:
  """Episode totals over a span of updates."""

  def __init__(self):
    self.episodes, self.returns, self.lengths = 0.0, 0.0, 0.0
    self.achievements = np.zeros(len(craftax.ACHIEVEMENTS))

  def add(self, m: dict[str, Any]) -> None:
    self.episodes += float(m["episodes"])
    self.returns += float(m["return_sum"])
    self.lengths += float(m["length_sum"])
    self.achievements += np.asarray(m["achievements"], np.float64)

  def rates(self) -> dict[str, float]:
    n = max(self.episodes, 1.0)
    return {
      name: float(c / n) for name, c in zip(craftax.ACHIEVEMENTS, self.achievements, strict=True)
    }

  def dump(self) -> dict[str, float]:
    n = max(self.episodes, 1.0)
    return {
      "episodes": self.episodes,
      "episode_return": self.returns / n,
      "episode_length": self.lengths / n,
      "achievements_per_episode": float(self.achievements.sum() / n),
    }


def _read_rows(path: epath.Path, upto: int) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
  return [r for r in rows if r.get("update", 0) <= upto]


def format_table(report: dict[str, Any]) -> str:
  """achievements.json as Markdown: each achievement's success rate, and the score."""
  lines = ["| achievement | success rate |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in report["success_rates"].items()]
  lines.append(f"| **Crafter score** | {report['score']:.2f}% |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Trains (or resumes) PPO in `workdir`; returns the last metrics, the report and its table."""
  sections.validate(config)
  workdir = workdir_lib.prepare(workdir, config)
  with workdir_lib.Lock(workdir):
    p = config.ppo
    total = num_updates(p)
    start = _init_fn(_key(p), config.train.seed)
    abstract = jax.eval_shape(start)
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, async_save=False)
    try:
      restored = ckpt.restore_latest(abstract)
      workdir_lib.accept(workdir, config)
      runner = restored.state if restored else start()
      saved = (restored.data_state or {}).get("tally") if restored else None
      return _loop(config, workdir, ckpt, runner, total, saved)
    finally:
      ckpt.close()


def _loop(config, workdir, ckpt, runner: Runner, total: int, saved) -> dict[str, Any]:
  p = config.ppo
  update = make_update(p)
  start = int(runner.update)
  rows = _read_rows(workdir / "metrics.jsonl", start)
  report_from = total - max(1, round(total * p.report_fraction))
  tally, window = Tally(), Tally()
  if saved:  # The report's span so far, saved with the checkpoint resumed from.
    tally.episodes, tally.returns, tally.lengths = saved["episodes"], saved["returns"], 0.0
    tally.achievements = np.asarray(saved["achievements"], np.float64)
  steps_per_update = p.num_envs * p.num_steps
  bar = progress_bar(total, start, config.train.progress)
  last, clock, preempted = {}, time.perf_counter(), False
  with StopSignal() as stop:
    for u in range(start, total):
      runner, m = update(runner)
      m = jax.device_get(m)
      window.add(m)
      if u >= report_from:
        tally.add(m)
      done = u + 1
      bar.update(1)
      if done % p.log_every == 0 or done == total:
        seconds = time.perf_counter() - clock
        last = {"update": done, "env_steps": done * steps_per_update, **window.dump(),
                **{k: float(m[k]) for k in ("policy_loss", "value_loss", "entropy")},
                "steps_per_s": p.log_every * steps_per_update / seconds}  # fmt: skip
        rows.append(last)
        write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        bar.set_postfix(ret=f"{last['episode_return']:.2f}",
                        ach=f"{last['achievements_per_episode']:.2f}")  # fmt: skip
        window, clock = Tally(), time.perf_counter()
      stopping = stop.agreed(done)
      if done % p.checkpoint_every == 0 or done == total or stopping:
        saved = {"episodes": tally.episodes, "returns": tally.returns,
                 "achievements": tally.achievements.tolist()}  # fmt: skip
        ckpt.save(done, runner, {"tally": saved})
        ckpt.wait()
      if stopping:
        preempted = True
        break
  bar.close()
  if preempted:
    return {**last, "preempted": True, "workdir": str(workdir)}
  report = {
    "episodes": tally.episodes,
    "success_rates": tally.rates(),
    "score": crafter_score(tally.rates()),
    "updates_reported": total - report_from,
    "env_steps": total * steps_per_update,
  }
  write_atomic(workdir / "achievements.json", json.dumps(report, indent=1) + "\n")
  return {**last, "report": report, "table": format_table(report), "workdir": str(workdir)}


def load_params(workdir) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, policy parameters, updates done) of a PPO workdir's newest checkpoint."""
  workdir = workdir_lib.resolve(workdir)
  config = workdir_lib.read_config(workdir)
  abstract = jax.eval_shape(_init_fn(_key(config.ppo), config.train.seed))
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    restored = ckpt.restore_latest(abstract, read_only=True)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"{workdir} has no PPO checkpoint yet; train it first")
  return config, restored.state.params, restored.step
