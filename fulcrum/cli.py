"""The `fulcrum` command (also `python -m fulcrum`).

  fulcrum recipes
  fulcrum train --recipe NAME --workdir DIR [--set key=value ...]
  fulcrum eval --workdir DIR [--json]
  fulcrum decode --workdir DIR --prompt TEXT [--strategy greedy|sample] [--max-new-tokens N]
  fulcrum bench NAME [--json]

User errors exit with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fulcrum.platform.errors import UserError

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not usage + error.
    raise UserError(f"{message} (see `{self.prog} --help`)")


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


def _cmd_train(args) -> int:
  from fulcrum import recipes
  from fulcrum.platform import config as config_lib

  config = recipes.get(args.recipe)
  config_lib.apply_overrides(config, args.set or [])
  config_lib.validate(config)
  from fulcrum.platform.trainer import train

  result = train(config, args.workdir)
  workdir = Path(result["workdir"])
  from fulcrum.platform.trainer import eval_summary

  summary = eval_summary(result)
  if summary:
    print(f"step {result['step']}: validation {summary}")
  print(f"metrics: {workdir / 'metrics.jsonl'}")
  print(f"tensorboard: tensorboard --logdir {workdir / 'tensorboard'}")
  print(f"checkpoints: {workdir / 'checkpoints'}")
  return 0


def _cmd_eval(args) -> int:
  from fulcrum.platform.trainer import evaluate

  metrics = evaluate(args.workdir)
  if args.json:
    print(json.dumps(metrics))
  else:
    for key, value in metrics.items():
      print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
  return 0


def _cmd_decode(args) -> int:
  import time

  from fulcrum.platform.data import ByteTokenizer
  from fulcrum.platform.decode import generate
  from fulcrum.platform.trainer import load_workdir

  if not args.prompt:
    raise UserError("--prompt is empty; pass the text to continue, e.g. --prompt 'def main('")
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  exp, state, _ = load_workdir(args.workdir)
  tok = ByteTokenizer()
  prompt = tok.encode(args.prompt)
  temperature = 0.0 if args.strategy == "greedy" else args.temperature
  start = time.perf_counter()
  out = generate(
    exp.model,
    state.params,
    prompt[None],
    args.max_new_tokens,
    temperature=temperature,
    seed=args.seed,
  )[0]
  elapsed = time.perf_counter() - start
  text = tok.decode(out)
  if args.json:
    print(
      json.dumps(
        {
          "text": text,
          "tokens": out.tolist(),
          "target_calls": len(out),
          "draft_calls": 0,
          "tokens_per_s": len(out) / elapsed,
        }
      )
    )
  else:
    print(args.prompt + text)
  return 0


def _cmd_bench(args) -> int:
  import importlib

  available = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
  if args.name not in available:
    raise UserError(f"unknown benchmark {args.name!r}; available: {', '.join(available)}")
  # Benchmarks live in the repository's benchmarks/ folder, beside the package.
  if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))
  module = importlib.import_module(f"benchmarks.bench_{args.name}")
  result = module.run(quick=args.quick)
  markdown = result.pop("markdown", "")
  print(json.dumps(result, indent=2) if args.json else markdown)
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="fulcrum", description="Fulcrum: train, evaluate and decode JAX models.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  sub.add_parser("recipes", help="list recipes").set_defaults(fn=_cmd_recipes)

  t = sub.add_parser("train", help="train (or resume) a recipe in a workdir")
  t.add_argument("--recipe", required=True)
  t.add_argument("--workdir", required=True)
  t.add_argument(
    "--set",
    action="append",
    metavar="KEY=VALUE",
    help="override a config key (repeatable), e.g. --set train.steps=100",
  )
  t.set_defaults(fn=_cmd_train)

  e = sub.add_parser("eval", help="validation metrics of a workdir's newest checkpoint")
  e.add_argument("--workdir", required=True)
  e.add_argument("--json", action="store_true")
  e.set_defaults(fn=_cmd_eval)

  d = sub.add_parser("decode", help="continue a prompt with a trained model")
  d.add_argument("--workdir", required=True)
  d.add_argument("--prompt", required=True)
  d.add_argument("--strategy", choices=("greedy", "sample"), default="greedy")
  d.add_argument("--max-new-tokens", type=int, default=128)
  d.add_argument("--temperature", type=float, default=0.8)
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--json", action="store_true")
  d.set_defaults(fn=_cmd_decode)

  b = sub.add_parser("bench", help="run a benchmark from benchmarks/")
  b.add_argument("name")
  b.add_argument("--json", action="store_true")
  b.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
  b.set_defaults(fn=_cmd_bench)
  return p


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
