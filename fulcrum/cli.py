"""The `fulcrum` command (also `python -m fulcrum`).

  fulcrum recipes
  fulcrum train --recipe NAME --workdir DIR [--set key=value ...]
  fulcrum eval --workdir DIR [--json]
  fulcrum decode --workdir DIR --prompt TEXT [--strategy greedy|sample|lookahead|speculative|
                 cascade] [--draft-workdir DIR] [--max-new-tokens N] [--json]
  fulcrum calibrate --workdir DIR [--method kvquant|int-token|int-channel] [--bits 2|3|4]
  fulcrum attribute --workdir DIR --input TEXT --method NAME [--out FILE] [--json]
  fulcrum bench NAME [--json]

User errors exit with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
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
  from fulcrum.platform.data import ByteTokenizer
  from fulcrum.platform.decode import Sampling, generate
  from fulcrum.platform.decode.kvquant import load_workdir_specs
  from fulcrum.platform.trainer import load_workdir

  if not args.prompt:
    raise UserError("--prompt is empty; pass the text to continue, e.g. --prompt 'def main('")
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  exp, state, step = load_workdir(args.workdir)
  if exp.config.task != "lm":
    raise UserError(f"{args.workdir} trains task {exp.config.task!r}; decode needs an LM")
  d = exp.config.decode
  strategy = args.strategy or d.strategy
  pick = lambda value, default: default if value is None else value
  try:
    # decode.temperature is the default of `sample`; the other strategies are greedy unless
    # --temperature is given (speculative/cascade then sample; greedy/lookahead ignore it).
    default_t = d.temperature if strategy == "sample" else 0.0
    sampling = Sampling(
      temperature=0.0 if strategy in ("greedy", "lookahead") else pick(args.temperature, default_t),
      top_k=pick(args.top_k, d.top_k),
      top_p=pick(args.top_p, d.top_p),
    )
  except ValueError as e:
    raise UserError(str(e)) from None
  draft = None
  if strategy in ("speculative", "cascade"):
    if not args.draft_workdir:
      raise UserError(f"--strategy {strategy} needs --draft-workdir (e.g. a `lm_draft` run)")
    draft_exp, draft_state, _ = load_workdir(args.draft_workdir)
    draft = (draft_exp.model, draft_state.params)
  kv_cache = args.kv_cache or d.kv_cache
  kv_quant = None
  if kv_cache != "none":
    kv_quant = load_workdir_specs(args.workdir, exp.model, step, kv_cache, d.kv_bits)
  tok = ByteTokenizer()
  prompt = tok.encode(args.prompt)
  window = [int(x) for x in (args.lookahead or "").split(",") if x] or [
    d.lookahead_window,
    d.lookahead_ngram,
    d.lookahead_candidates,
  ]
  try:
    out = generate(
      exp.model,
      state.params,
      [prompt],
      args.max_new_tokens,
      strategy=strategy,
      sampling=sampling,
      stop_tokens=tok.encode(args.stop) if args.stop else (),
      seed=args.seed,
      draft=draft,
      gamma=pick(args.gamma, d.gamma),
      lookahead=tuple(window),
      rule=pick(args.rule, d.cascade_rule),
      alpha=pick(args.alpha, d.cascade_alpha),
      kv_quant=kv_quant,
      max_len=d.max_len,
    )
  except ValueError as e:
    raise UserError(str(e)) from None
  tokens = out.rows()[0]
  text = tok.decode(tokens)
  if args.json:
    summary = {
      "text": text,
      "tokens": tokens.tolist(),
      "target_calls": out.target_calls,
      "draft_calls": out.draft_calls,
      "tokens_per_s": out.tokens_per_s,
      "strategy": strategy,
      "kv_cache": kv_cache,
    }
    print(json.dumps(summary))
  else:
    print(args.prompt + text)
  return 0


def _cmd_calibrate(args) -> int:
  from fulcrum.platform.decode.kvquant import calibrate_workdir

  r = calibrate_workdir(args.workdir, args.method, args.bits, args.batches)
  ratio = r["bf16_bytes_per_token"] / r["bytes_per_token"]
  print(
    f"{r['method']} {r['bits']}-bit KV cache: {r['bytes_per_token']} bytes/token "
    f"({ratio:.2f}x smaller than bfloat16); validation perplexity {r['perplexity']:.4f} "
    f"(full precision {r['full_precision_perplexity']:.4f})"
  )
  print(f"saved: {r['path']}")
  return 0


def _series_input(exp, text: str):
  """A forecaster's input window (standardised) from `validation[:N]`, a CSV file or numbers."""
  import numpy as np

  series = exp.task.series
  need, c = series.input_len, series.num_channels
  if text == "validation" or text.startswith("validation:"):
    inputs, _ = series.windows("validation")
    index = text.partition(":")[2] or "0"
    if not index.lstrip("-").isdigit() or not -len(inputs) <= int(index) < len(inputs):
      raise UserError(f"--input {text!r}: the validation split has {len(inputs)} windows")
    return inputs[int(index)], f"validation window {int(index) % len(inputs)}"
  path = Path(text)
  try:
    if path.suffix == ".csv" and path.exists():
      raw = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1, dtype=np.float64)
      source = str(path)
    else:
      raw = np.array([float(v) for v in text.split(",")], np.float64)[:, None]
      source = "--input values"
  except ValueError:
    raise UserError(
      "--input for a forecaster is `validation[:N]`, a CSV file (header row, one column per "
      "channel) or comma-separated numbers"
    ) from None
  if raw.shape[1] != c or raw.shape[0] < need:
    raise UserError(
      f"--input gives {raw.shape[0]} steps x {raw.shape[1]} channel(s); the model needs the "
      f"last {need} steps of {c} channel(s) ({', '.join(series.channels)})"
    )
  return series.normalize(raw[-need:]), source


def _cmd_attribute(args) -> int:
  import numpy as np

  from fulcrum.platform import attribution
  from fulcrum.platform.attribution import report
  from fulcrum.platform.data import ByteTokenizer
  from fulcrum.platform.trainer import load_workdir

  if not args.input:
    raise UserError("--input is empty; pass the text (or series) to explain")
  if args.method not in attribution.METHODS:
    raise UserError(
      f"unknown method {args.method!r}; choose one of {', '.join(attribution.METHODS)}"
    )
  exp, state, step = load_workdir(args.workdir)
  task = exp.config.task
  if task not in ("lm", "forecast"):
    raise UserError(f"{args.workdir} trains task {task!r}; attribute needs an LM or a forecaster")
  baseline = args.baseline
  if baseline is not None and baseline.isdigit():
    baseline = int(baseline)
  tok = ByteTokenizer()
  try:
    if task == "lm":
      data = (args.input + (args.continuation or "")).encode("utf-8")
      inputs = np.asarray(tok.encode(args.input + (args.continuation or "")), np.int32)
      if args.continuation:
        start = len(tok.encode(args.input))
        target = attribution.Target(kind="span", start=start)
      else:
        token = None
        if args.token is not None:
          ids = tok.encode(args.token)
          if len(ids) != 1:
            raise UserError(f"--token must be one byte-level token, got {args.token!r}")
          token = ids[0]
        target = attribution.Target(kind=args.target, token=token)
      source = None
    else:
      data = None
      inputs, source = _series_input(exp, args.input)
      target = attribution.Target(kind="forecast", step=args.step, channel=args.channel)
    result = attribution.attribute(
      exp.model,
      state.params,
      inputs,
      args.method,
      target=target,
      baseline=baseline,
      steps=args.steps,
      samples=args.samples,
      noise=args.noise,
      layer=args.layer,
    )
    subject = attribution.Subject(exp.model, state.params, inputs, target)
    metrics = {}
    # Deletion / insertion act on the inputs, so not for a layer's attribution.
    if not args.no_metrics and result.layer is None:
      metrics = attribution.faithfulness(subject, result.scores, baseline=baseline)
    if args.sanity_check:
      check = attribution.randomisation_check(
        exp.model, state.params, inputs, args.method, target=target, baseline=baseline,
        steps=args.steps, samples=args.samples, noise=args.noise, layer=args.layer,
      )  # fmt: skip
      metrics["randomisation_spearman"] = check["spearman"]
  except ValueError as e:
    raise UserError(str(e)) from None
  resolved = subject.target
  shown = {k: metrics[k] for k in metrics if k.endswith(("auc", "spearman"))}
  if result.completeness_gap is not None:
    shown["completeness_gap"] = result.completeness_gap
  title = f"{args.method} — {Path(args.workdir).name} (step {step})"
  if task == "lm":
    tokens = report.display_tokens(data)
    what = resolved.describe(lambda t: tok.decode([t]))
    out = Path(args.out or Path(args.workdir) / "attribution" / f"{args.method}.html")
    position = resolved.position if resolved.kind != "span" else None
    html = report.html_heatmap(
      tokens,
      np.asarray(result.scores),
      title=title,
      subtitle=f"explains {what} = {result.target:.4g}",
      metrics=shown,
      target_index=position,
    )
    report.write_html(out, html)
  else:
    what = resolved.describe()
    out = Path(args.out or Path(args.workdir) / "attribution" / f"{args.method}.png")
    forecast = exp.model.apply({"params": state.params}, np.asarray(inputs)[None])[0]
    scores = np.asarray(result.scores)
    if scores.ndim == 1:  # A layer's per-step scores: the same colour for every channel.
      scores = np.repeat(scores[:, None], np.asarray(inputs).shape[-1], 1)
    report.series_png(
      out,
      np.asarray(inputs),
      scores,
      forecast=np.asarray(forecast),
      title=f"{title}: {what} ({source})",
      channel_names=list(exp.task.series.channels),
    )
  if args.json:
    summary = {
      "method": args.method,
      "target": {"description": what, "value": result.target},
      "attributions": np.asarray(result.scores).tolist(),
      "completeness_gap": result.completeness_gap,
      "steps": result.steps,
      "metrics": metrics,
      "out": str(out),
    }
    if task == "lm":
      summary["tokens"] = tokens
    if result.baseline_target is not None:
      summary["baseline_target"] = result.baseline_target
    print(json.dumps(summary))
  else:
    print(f"{args.method}: {what} = {result.target:.4g}")
    if task == "lm":
      top = np.argsort(-np.asarray(result.scores))[:8]
      print("top tokens: " + ", ".join(f"{tokens[i]!r}@{i} {result.scores[i]:+.3g}" for i in top))
    for name, value in shown.items():
      print(f"  {name}: {value:.4g}")
    print(f"saved: {out}")
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
  # What a benchmark prints while it runs (training runs' eval lines) goes to stderr: stdout
  # holds only the result, so `--json` output parses.
  with contextlib.redirect_stdout(sys.stderr):
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
  d.add_argument(
    "--strategy",
    choices=("greedy", "sample", "lookahead", "speculative", "cascade"),
    help="default: the workdir's decode.strategy (greedy)",
  )
  d.add_argument("--draft-workdir", help="draft model for speculative / cascade")
  d.add_argument("--max-new-tokens", type=int, default=128)
  d.add_argument("--temperature", type=float)
  d.add_argument("--top-k", type=int)
  d.add_argument("--top-p", type=float)
  d.add_argument("--stop", help="end a row at any of these characters")
  d.add_argument("--gamma", type=int, help="speculative: draft tokens per target call")
  d.add_argument("--lookahead", metavar="W,N,G", help="lookahead window, n-gram, candidates")
  d.add_argument("--rule", choices=("chow", "diff", "opt"), help="cascade deferral rule")
  d.add_argument("--alpha", type=float, help="cascade deferral threshold")
  d.add_argument("--kv-cache", choices=("none", "kvquant", "int-token", "int-channel"))
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--json", action="store_true")
  d.set_defaults(fn=_cmd_decode)

  c = sub.add_parser("calibrate", help="fit KV-cache quantization (KVQuant) for a workdir")
  c.add_argument("--workdir", required=True)
  c.add_argument("--method", choices=("kvquant", "int-token", "int-channel"))
  c.add_argument("--bits", type=int, choices=(2, 3, 4))
  c.add_argument("--batches", type=int, help="calibration batches (default decode.*)")
  c.set_defaults(fn=_cmd_calibrate)

  a = sub.add_parser("attribute", help="explain a prediction: token heatmap or series plot")
  a.add_argument("--workdir", required=True)
  a.add_argument(
    "--input",
    required=True,
    help="text (LM), or for a forecaster: validation[:N], a CSV file or comma-separated values",
  )
  a.add_argument(
    "--method",
    required=True,
    help="saliency, grad_x_input, integrated_gradients, smoothgrad, rollout, hidden_attention "
    "or layer",
  )
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
