"""The `fulcrum` command (also `python -m fulcrum`): it parses and dispatches, nothing more.

  fulcrum recipes
  fulcrum train --recipe NAME|PATH --workdir DIR [--set key=value ...]
  fulcrum config NAME|PATH [--set key=value ...]
  fulcrum eval --workdir DIR [--json]
  fulcrum decode --workdir DIR --prompt TEXT [--strategy greedy|sample|lookahead|speculative|
                 cascade] [--draft-workdir DIR] [--max-new-tokens N] [--json]
  fulcrum calibrate --workdir DIR [--method kvquant|int-token|int-channel] [--bits 2|3|4]
  fulcrum attribute --workdir DIR --input TEXT --method NAME [--out FILE] [--json]
  fulcrum bench NAME [--json] [--out DIR]
  fulcrum agent eval --workdir DIR [--tasks lite|all|ID ...] [--episodes N] [--json]
                     [--record PATH]
  fulcrum --version

Every option list in `choices` is imported from the package that owns it. User errors exit
with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

import fulcrum
from fulcrum.platform.errors import UserError


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not usage + error.
    raise UserError(f"{message} (see `{self.prog} --help`)")


def _folder(text: str) -> str:
  """A --workdir value; an empty one would silently mean the current folder."""
  if not text.strip():
    raise argparse.ArgumentTypeError("is empty; name a folder, e.g. --workdir runs/demo")
  return text


def _quiet_logs() -> None:
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("fulcrum: %(message)s"))
  ours = logging.getLogger("fulcrum")
  ours.handlers[:] = [handler]
  ours.setLevel(logging.INFO)
  ours.propagate = False
  for name in ("absl", "orbax", "jax", "grain", "tensorflow_datasets", "etils"):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _cmd_recipes(args) -> int:
  from fulcrum import recipes

  width = max(len(n) for n in recipes.names())
  for name in recipes.names():
    print(f"{name:<{width}}  {recipes.describe(name)}")
  return 0


def _resolved_config(args):
  from fulcrum import recipes
  from fulcrum.platform import config as config_lib
  from fulcrum.platform import sections

  config = recipes.get(args.recipe)
  config_lib.apply_overrides(config, args.set or [])
  sections.validate(config)
  return config


def _cmd_config(args) -> int:
  from fulcrum.platform import config as config_lib
  from fulcrum.platform.launch import resolved_config

  print(config_lib.to_json(resolved_config(_resolved_config(args))))
  return 0


def _cmd_train(args) -> int:
  from etils import epath

  from fulcrum.platform.launch import train
  from fulcrum.platform.training.experiment import eval_summary
  from fulcrum.platform.training.metrics import tensorboard_command

  result = train(_resolved_config(args), args.workdir)
  if "table" in result:  # Iterated runs (SPIN, agent_improve): one row per iteration.
    print(result["table"])
  workdir = epath.Path(result["workdir"])  # pathlib would turn gs://b/run into gs:/b/run
  summary = eval_summary(result)
  if summary:
    print(f"step {result['step']}: validation {summary}")
  print(f"metrics: {workdir / 'metrics.jsonl'}")
  print(f"tensorboard: {tensorboard_command(workdir)}")
  print(f"checkpoints: {workdir / 'checkpoints'}")
  return 0


def _cmd_eval(args) -> int:
  from fulcrum.platform import workdir

  metrics = workdir.evaluate(args.workdir)
  if args.json:
    print(json.dumps(metrics))
  else:
    for key, value in metrics.items():
      print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
  return 0


def _cmd_decode(args) -> int:
  from fulcrum.platform.decode import prompt

  summary = prompt.decode_prompt(
    args.workdir,
    args.prompt,
    strategy=args.strategy,
    draft_workdir=args.draft_workdir,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    stop=args.stop,
    gamma=args.gamma,
    lookahead=args.lookahead,
    rule=args.rule,
    alpha=args.alpha,
    kv_cache=args.kv_cache,
    seed=args.seed,
  )
  print(json.dumps(summary) if args.json else args.prompt + summary["text"])
  return 0


def _cmd_calibrate(args) -> int:
  from fulcrum.platform import workdir

  r = workdir.calibrate(args.workdir, args.method, args.bits, args.batches)
  ratio = r["bf16_bytes_per_token"] / r["bytes_per_token"]
  print(
    f"{r['method']} {r['bits']}-bit KV cache: {r['bytes_per_token']} bytes/token "
    f"({ratio:.2f}x smaller than bfloat16); validation perplexity {r['perplexity']:.4f} "
    f"(full precision {r['full_precision_perplexity']:.4f})"
  )
  print(f"saved: {r['path']}")
  return 0


def _cmd_attribute(args) -> int:
  from fulcrum.platform.attribution import explain

  summary = explain.explain_workdir(
    args.workdir,
    args.input,
    args.method,
    out=args.out,
    target=args.target,
    token=args.token,
    continuation=args.continuation,
    step=args.step,
    channel=args.channel,
    steps=args.steps,
    baseline=args.baseline,
    samples=args.samples,
    noise=args.noise,
    layer=args.layer,
    metrics=not args.no_metrics,
    sanity_check=args.sanity_check,
  )
  print(json.dumps(summary) if args.json else explain.render(summary))
  return 0


def _cmd_agent_eval(args) -> int:
  from fulcrum.platform.agents import evaluation

  tasks = ",".join(args.tasks) if args.tasks else None
  result = evaluation.evaluate_workdir(
    args.workdir, tasks=tasks, episodes=args.episodes, record=args.record
  )
  print(json.dumps(result) if args.json else evaluation.render(result))
  return 0


def _cmd_bench(args) -> int:
  from fulcrum import benchmarks

  # What a benchmark prints while it runs (training runs' eval lines) goes to stderr: stdout
  # holds only the result, so `--json` output parses.
  with contextlib.redirect_stdout(sys.stderr):
    result = benchmarks.run(args.name, quick=args.quick, out=args.out)
  markdown = result.pop("markdown", "")
  print(json.dumps(result, indent=2) if args.json else markdown)
  return 0


def build_parser() -> argparse.ArgumentParser:
  from fulcrum.benchmarks import names as benchmark_names
  from fulcrum.platform.attribution import METHODS as ATTRIBUTION_METHODS
  from fulcrum.platform.decode import kv_calibration, speculative, strategies

  p = _Parser(prog="fulcrum", description="Fulcrum: train, evaluate and decode JAX models.")
  p.add_argument("--version", action="version", version=f"fulcrum {fulcrum.__version__}")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  sub.add_parser("recipes", help="list recipes").set_defaults(fn=_cmd_recipes)

  t = sub.add_parser("train", help="train (or resume) a recipe in a workdir")
  t.add_argument("--recipe", required=True, help="a recipe name or the path of a recipe file")
  t.add_argument("--workdir", required=True, type=_folder)
  _add_set(t)
  t.set_defaults(fn=_cmd_train)

  r = sub.add_parser("config", help="print a recipe's resolved config (a dry run) and exit")
  r.add_argument("recipe", help="a recipe name or the path of a recipe file")
  _add_set(r)
  r.set_defaults(fn=_cmd_config)

  e = sub.add_parser("eval", help="validation metrics of a workdir's newest checkpoint")
  e.add_argument("--workdir", required=True, type=_folder)
  e.add_argument("--json", action="store_true")
  e.set_defaults(fn=_cmd_eval)

  d = sub.add_parser("decode", help="continue a prompt with a trained model")
  d.add_argument("--workdir", required=True, type=_folder)
  d.add_argument("--prompt", required=True)
  d.add_argument(
    "--strategy",
    choices=strategies.STRATEGIES,
    help="default: the workdir's decode.strategy (greedy)",
  )
  d.add_argument("--draft-workdir", type=_folder, help="draft model for speculative / cascade")
  d.add_argument("--max-new-tokens", type=int, default=128)
  d.add_argument("--temperature", type=float)
  d.add_argument("--top-k", type=int)
  d.add_argument("--top-p", type=float)
  d.add_argument("--stop", help="end a row at any of these characters")
  d.add_argument("--gamma", type=int, help="speculative: draft tokens per target call")
  d.add_argument("--lookahead", metavar="W,N,G", help="lookahead window, n-gram, candidates")
  d.add_argument("--rule", choices=speculative.RULES, help="cascade deferral rule")
  d.add_argument("--alpha", type=float, help="cascade deferral threshold")
  d.add_argument("--kv-cache", choices=strategies.KV_CACHES)
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--json", action="store_true")
  d.set_defaults(fn=_cmd_decode)

  c = sub.add_parser("calibrate", help="fit KV-cache quantization (KVQuant) for a workdir")
  c.add_argument("--workdir", required=True, type=_folder)
  c.add_argument("--method", choices=kv_calibration.METHODS)
  c.add_argument("--bits", type=int, choices=kv_calibration.BITS)
  c.add_argument("--batches", type=int, help="calibration batches (default decode.*)")
  c.set_defaults(fn=_cmd_calibrate)

  a = sub.add_parser("attribute", help="explain a prediction: token heatmap or series plot")
  a.add_argument("--workdir", required=True, type=_folder)
  a.add_argument(
    "--input",
    required=True,
    help="text (LM), or for a forecaster: validation[:N], a CSV file or comma-separated values",
  )
  a.add_argument("--method", required=True, choices=ATTRIBUTION_METHODS)
  a.add_argument("--out", help="HTML (LM) or PNG (forecaster); default DIR/attribution/METHOD.*")
  a.add_argument("--json", action="store_true")
  a.add_argument(
    "--target", choices=("logprob", "logit"), default="logprob", help="LM: what is explained"
  )
  a.add_argument("--token", help="LM: the next token explained (default: the top prediction)")
  a.add_argument("--continuation", help="LM: explain this text's log-likelihood after --input")
  a.add_argument("--step", type=int, default=0, help="forecaster: horizon step explained")
  a.add_argument("--channel", type=int, default=0, help="forecaster: channel explained")
  a.add_argument("--steps", type=int, default=64, help="integrated gradients: quadrature points")
  a.add_argument("--baseline", help="pad | zero | TOKEN_ID (LM), mean | zero (forecaster)")
  a.add_argument("--samples", type=int, default=32, help="smoothgrad: noisy samples")
  a.add_argument("--noise", type=float, default=0.1, help="smoothgrad: σ / input range")
  a.add_argument("--layer", help="method layer: a tapped activation, e.g. blocks_1/output")
  a.add_argument("--no-metrics", action="store_true", help="skip deletion/insertion AUC")
  a.add_argument(
    "--sanity-check",
    action="store_true",
    help="also attribute with re-initialised weights; report the Spearman rank correlation",
  )
  a.set_defaults(fn=_cmd_attribute)

  ag = sub.add_parser("agent", help="LM agents: evaluate a trained agent")
  agent_sub = ag.add_subparsers(dest="agent_command", required=True, parser_class=_Parser)
  ae = agent_sub.add_parser("eval", help="success rates of a trained agent on held-out seeds")
  ae.add_argument("--workdir", required=True, type=_folder)
  ae.add_argument("--tasks", nargs="+", help="lite, all, or task ids (default: the run's)")
  ae.add_argument("--episodes", type=int, help="episodes per task (default: agent.eval_episodes)")
  ae.add_argument("--json", action="store_true")
  ae.add_argument("--record", metavar="PATH", help="write the first episode as PATH.txt/.gif")
  ae.set_defaults(fn=_cmd_agent_eval)

  b = sub.add_parser("bench", help="run a benchmark (fulcrum/benchmarks/)")
  b.add_argument("name", help=", ".join(benchmark_names()))
  b.add_argument("--json", action="store_true")
  b.add_argument("--out", help="results folder (default: benchmarks/results/ in a checkout)")
  b.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
  b.set_defaults(fn=_cmd_bench)
  return p


def _add_set(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--set",
    action="append",
    metavar="KEY=VALUE",
    help="override a config key (repeatable), e.g. --set train.steps=100",
  )


def main(argv: list[str] | None = None) -> int:
  _quiet_logs()
  try:
    args = build_parser().parse_args(argv)
    return args.fn(args)
  except UserError as e:
    print(f"fulcrum: error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"fulcrum: training diverged: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("fulcrum: interrupted", file=sys.stderr)
    return 130
