"""`fulcrum attribute`: explain one prediction of a trained workdir's model.

  summary = explain_workdir(workdir, "def f(x):", "integrated_gradients")
  print(render(summary))

An LM explains a next-token log p or logit (or a continuation's log-likelihood) and writes an
HTML token heatmap; a forecaster explains one forecast value and writes a PNG of the input
window. The workdir is read through `fulcrum.platform.workdir` (never the trainer). Reports go
to DIR/attribution/METHOD.html|png unless `out` names a file; both may be local paths or
object-store URLs (gs://...), written through `etils.epath`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from fulcrum.platform import workdir as workdir_lib
from fulcrum.platform.attribution import (
  METHODS,
  Subject,
  Target,
  attribute,
  faithfulness,
  randomisation_check,
  report,
)
from fulcrum.platform.data import tokenizer as tokenizer_lib
from fulcrum.platform.errors import UserError


def _series_input(exp, text: str) -> tuple[np.ndarray, str]:
  """A forecaster's input window (standardised) from `validation[:N]`, a CSV file or numbers,
  and where it came from."""
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


def _lm_target(tok: tokenizer_lib.Tokenizer, target: str, token: str | None) -> Target:
  """The next-token target at the last position: `token` (one token) or the top prediction."""
  token_id = None
  if token is not None:
    ids = tok.encode(token)
    if len(ids) != 1:
      own = tok.spec == tokenizer_lib.BYTES
      kind = "byte-level token" if own else f"token of the run's tokenizer ({tok.spec})"
      raise UserError(f"--token must be one {kind}, got {token!r} ({len(ids)} tokens)")
    token_id = ids[0]
  return Target(kind=target, token=token_id)


def _lm_inputs(tok: tokenizer_lib.Tokenizer, text: str, continuation: str):
  """Token ids of text + continuation, each token's display string, and the index of the first
  token of the continuation (a token across the boundary belongs to the continuation)."""
  full = text + continuation
  pieces = tok.pieces(full)
  ends = np.cumsum([len(p) for p in pieces])
  start = int(np.searchsorted(ends, len(text), side="right"))
  shown = ["".join(report.display_tokens(p.encode("utf-8"))) for p in pieces]
  return np.asarray(tok.encode(full), np.int32), shown, start


def _write(path: epath.Path, write: Callable[[], Any]) -> None:
  """Runs `write` (which writes the report to `path`); an OSError becomes one line."""
  try:
    write()
  except OSError as e:
    raise UserError(
      f"cannot write the report to {path} ({e.strerror or e}); pass --out a file in a writable "
      "folder"
    ) from None


def _shown(metrics: dict[str, float], completeness_gap: float | None) -> dict[str, float]:
  """The headline figures: AUCs, the Spearman ρ and integrated gradients' completeness gap."""
  shown = {k: metrics[k] for k in metrics if k.endswith(("auc", "spearman"))}
  if completeness_gap is not None:
    shown["completeness_gap"] = completeness_gap
  return shown


def explain_workdir(
  workdir: epath.PathLike,
  input: str,
  method: str,
  *,
  out: epath.PathLike | None = None,
  target: str = "logprob",
  token: str | None = None,
  continuation: str | None = None,
  step: int = 0,
  channel: int = 0,
  steps: int = 64,
  baseline: str | int | None = None,
  samples: int = 32,
  noise: float = 0.1,
  layer: str | None = None,
  metrics: bool = True,
  sanity_check: bool = False,
) -> dict[str, Any]:
  """Attributes one prediction of a workdir's newest checkpoint and writes its report.

  Args:
    workdir: a `fulcrum train` workdir of an LM or a forecaster.
    input: LM: the text; forecaster: `validation[:N]` (a validation window), a CSV file
      (header row, one column per channel) or comma-separated values (the last input_len used).
    method: one of `METHODS`.
    out: the report's path; default DIR/attribution/METHOD.html (LM) or .png (forecaster).
    target: LM: logprob | logit of the next token.
    token: LM: the explained next token (one token of the workdir's `data.tokenizer`);
      default: the top prediction.
    continuation: LM: explain this text's log-likelihood after `input` instead.
    step, channel: forecaster: the explained horizon step and channel.
    steps: integrated gradients' starting quadrature points.
    baseline: pad | zero | a token id (LM), mean | zero (forecaster); default pad / mean.
    samples, noise: SmoothGrad's sample count and σ as a fraction of the input's range.
    layer: method layer: the tapped activation, e.g. blocks_1/output.
    metrics: deletion / insertion AUC against random orderings (not for a layer).
    sanity_check: also the Spearman ρ against re-initialised weights.

  Returns:
    method, target {description, value}, attributions (per token [t], or per value [l, c]),
    completeness_gap, steps, metrics, out (the report's path), tokens (LM: display text of each
    token) and baseline_target (methods with a baseline): JSON-ready.

  Raises:
    UserError: empty input, an unknown method, a workdir that is no LM or forecaster, or
      anything the engine rejects (target, layer, baseline), with the fix.
  """
  if not input:
    raise UserError("--input is empty; pass the text (or series) to explain")
  if method not in METHODS:
    raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  exp, state, ckpt_step = workdir_lib.load(workdir)
  task = exp.config.task
  if task not in ("lm", "forecast"):
    raise UserError(f"{workdir} trains task {task!r}; attribute needs an LM or a forecaster")
  if isinstance(baseline, str) and baseline.isdigit():
    baseline = int(baseline)
  try:
    if task == "lm":
      tok = tokenizer_lib.get_tokenizer(exp.config.data.tokenizer)
      inputs, tokens, start = _lm_inputs(tok, input, continuation or "")
      if continuation:
        explained = Target(kind="span", start=start)
      else:
        explained = _lm_target(tok, target, token)
      source = None
    else:
      inputs, source = _series_input(exp, input)
      explained = Target(kind="forecast", step=step, channel=channel)
    kwargs = dict(baseline=baseline, steps=steps, samples=samples, noise=noise, layer=layer)
    result = attribute(exp.model, state.params, inputs, method, target=explained, **kwargs)
    subject = Subject(exp.model, state.params, inputs, explained)
    measured = {}
    # Deletion / insertion act on the inputs, so not for a layer's attribution.
    if metrics and result.layer is None:
      measured = faithfulness(subject, result.scores, baseline=baseline)
    if sanity_check:
      check = randomisation_check(
        exp.model, state.params, inputs, method, target=explained, **kwargs
      )
      measured["randomisation_spearman"] = check["spearman"]
  except ValueError as e:
    raise UserError(str(e)) from None
  resolved = subject.target
  title = f"{method} — {epath.Path(workdir).name} (step {ckpt_step})"
  if task == "lm":
    what = resolved.describe(lambda t: tok.decode([t]))
    path = epath.Path(out or epath.Path(workdir) / "attribution" / f"{method}.html")
    html = report.html_heatmap(
      tokens,
      np.asarray(result.scores),
      title=title,
      subtitle=f"explains {what} = {result.target:.4g}",
      metrics=_shown(measured, result.completeness_gap),
      target_index=resolved.position if resolved.kind != "span" else None,
    )
    _write(path, lambda: report.write_html(path, html))
  else:
    what = resolved.describe()
    path = epath.Path(out or epath.Path(workdir) / "attribution" / f"{method}.png")
    forecast = exp.model.apply({"params": state.params}, np.asarray(inputs)[None])[0]
    values = np.asarray(result.scores)
    if values.ndim == 1:  # A layer's per-step scores: the same colour for every channel.
      values = np.repeat(values[:, None], np.asarray(inputs).shape[-1], 1)
    _write(
      path,
      lambda: report.series_png(
        path,
        np.asarray(inputs),
        values,
        forecast=np.asarray(forecast),
        title=f"{title}: {what} ({source})",
        channel_names=list(exp.task.series.channels),
      ),
    )
  summary = {
    "method": method,
    "target": {"description": what, "value": result.target},
    "attributions": np.asarray(result.scores).tolist(),
    "completeness_gap": result.completeness_gap,
    "steps": result.steps,
    "metrics": measured,
    "out": str(path),
  }
  if task == "lm":
    summary["tokens"] = tokens
  if result.baseline_target is not None:
    summary["baseline_target"] = result.baseline_target
  return summary


def render(summary: dict[str, Any]) -> str:
  """The plain-text report of an `explain_workdir` summary: the explained value, the top 8
  tokens (LM), the headline metrics and the report's path, one per line."""
  target = summary["target"]
  lines = [f"{summary['method']}: {target['description']} = {target['value']:.4g}"]
  if "tokens" in summary:  # An LM: per-token scores.
    tokens, scores = summary["tokens"], np.asarray(summary["attributions"])
    top = np.argsort(-scores)[:8]
    lines.append("top tokens: " + ", ".join(f"{tokens[i]!r}@{i} {scores[i]:+.3g}" for i in top))
  shown = _shown(summary["metrics"], summary["completeness_gap"])
  lines += [f"  {name}: {value:.4g}" for name, value in shown.items()]
  lines.append(f"saved: {summary['out']}")
  return "\n".join(lines)
