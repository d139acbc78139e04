"""`fulcrum attribute` end to end, in process (`fulcrum.cli.main`; a subprocess per command costs
~5 s): a tiny LM workdir (integrated gradients with its metrics and HTML heatmap, a span target,
rollout, layer attribution, a logit target) and a tiny forecaster workdir (PNG plots from a
validation window and from typed values), and the one-line user errors (exit status 2). The
workflow behind it, `fulcrum.platform.attribution.explain`, is also called as a library.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_overrides, train_recipe

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")

INPUT = "def f(x):"  # 9 byte-level tokens.
KEYS = {"method", "target", "attributions", "completeness_gap", "steps", "metrics", "out"}
METRICS = {
  "deletion_auc",
  "insertion_auc",
  "random_deletion_auc",
  "random_insertion_auc",
  "f_x",
  "f_baseline",
}
_SPAN = re.compile(r'<span class="tok"[^>]*>(.*?)</span>', re.DOTALL)
INPUT_LEN, HORIZON = 24, 4  # The forecaster's window.


@pytest.fixture(scope="module")
def lm_workdir(tiny_corpus, tmp_path_factory):
  """A 1-layer, 16-wide byte-level transformer (unscanned: blocks_0) after 2 steps."""
  values = {"train.steps": 2, "model.d_model": 16, "model.num_layers": 1}
  overrides = tiny_overrides(tiny_corpus, **values)
  return train_recipe("demo", overrides, tmp_path_factory.mktemp("attribute_lm"))


@pytest.fixture(scope="module")
def forecast_workdir(tmp_path_factory):
  """DLinear on yearly sunspots (one channel), 24 steps in, 4 out, after 3 steps."""
  values = {
    "data.data_dir": str(tmp_path_factory.mktemp("attribute_series_tfds")),
    "data.series": "sunspots_yearly",
    "model.input_len": INPUT_LEN,
    "model.horizon": HORIZON,
    "train.steps": 3,
    "train.eval_every": 0,
    "train.progress": False,
    "train.async_checkpointing": False,
  }
  overrides = [f"{k}={v}" for k, v in values.items()]
  return train_recipe("forecast", overrides, tmp_path_factory.mktemp("attribute_forecast"))


def run_json(cli, *args) -> dict:
  code, out, err = cli("attribute", *args, "--json")
  assert code == 0, err
  return json.loads(out)


def assert_user_error(result, *fragments):
  code, _, err = result
  assert code == 2, result
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("fulcrum: error:"), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def assert_complete(summary: dict):
  change = summary["target"]["value"] - summary["baseline_target"]
  assert abs(change) > 1e-3
  assert summary["completeness_gap"] < 0.01
  assert abs(np.sum(summary["attributions"]) - change) <= 0.01 * abs(change)


def test_cli_lists_the_engines_methods():
  """`--method` accepts exactly the engine's methods, and `attribute --help` names them."""
  from fulcrum import cli as cli_lib
  from fulcrum.platform import attribution

  parser = cli_lib.build_parser()
  (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  (method,) = [a for a in sub.choices["attribute"]._actions if "--method" in a.option_strings]
  assert tuple(method.choices) == attribution.METHODS
  usage = sub.choices["attribute"].format_help()
  assert "{" + ",".join(attribution.METHODS) + "}" in usage


def test_user_errors_before_loading_a_model(cli, tmp_path):
  from fulcrum.platform import attribution

  missing = tmp_path / "nothing"
  base = ("attribute", "--workdir", missing)
  # argparse rejects an unknown method (its `choices`) and lists the engine's.
  unknown = cli(*base, "--input", "x", "--method", "nope")
  assert_user_error(unknown, "--method", "invalid choice", "'nope'", *attribution.METHODS)
  assert_user_error(cli(*base, "--input", "", "--method", "saliency"), "--input is empty")
  assert_user_error(cli(*base, "--input", "x", "--method", "saliency"), "config.json")
  assert_user_error(cli(*base, "--input", "x"), "--method")  # Required.


def test_library_user_errors_before_loading_a_model(tmp_path):
  """`explain_workdir` checks its arguments itself: a library caller has no argparse."""
  from fulcrum.platform.attribution import METHODS, explain
  from fulcrum.platform.errors import UserError

  missing = tmp_path / "nothing"
  with pytest.raises(UserError, match=f"unknown method 'nope'; choose one of {', '.join(METHODS)}"):
    explain.explain_workdir(missing, "x", "nope")
  with pytest.raises(UserError, match="--input is empty"):
    explain.explain_workdir(missing, "", "saliency")
  with pytest.raises(UserError, match="config.json"):
    explain.explain_workdir(missing, "x", "saliency")


def test_render_lists_the_value_top_tokens_metrics_and_file():
  """The plain-text report of a summary: the value, the top 8 tokens by score (LM only), the
  AUCs / Spearman ρ / completeness gap (not F(x), F(x')), the file."""
  from fulcrum.platform.attribution import explain

  scores = [0.5, -1.0, 2.0, 0.0, 0.25, 0.125, 3.0, -0.5, 1.0, 0.75]
  summary = {
    "method": "integrated_gradients",
    "target": {"description": "log p('x') at position 9", "value": -1.234567},
    "attributions": scores,
    "completeness_gap": 0.00123,
    "steps": 64,
    "metrics": {"deletion_auc": 0.25, "insertion_auc": 0.75, "f_x": -1.23, "f_baseline": -4.0},
    "out": "/tmp/ig.html",
    "tokens": list("abcdefghij"),
    "baseline_target": -4.0,
  }
  assert explain.render(summary).split("\n") == [
    "integrated_gradients: log p('x') at position 9 = -1.235",
    "top tokens: 'g'@6 +3, 'c'@2 +2, 'i'@8 +1, 'j'@9 +0.75, 'a'@0 +0.5, 'e'@4 +0.25, "
    "'f'@5 +0.125, 'd'@3 +0",
    "  deletion_auc: 0.25",
    "  insertion_auc: 0.75",
    "  completeness_gap: 0.00123",
    "saved: /tmp/ig.html",
  ]
  # A forecaster's summary has no tokens (and per-value scores): no top-tokens line.
  series = {**summary, "attributions": [[1.0], [2.0]], "completeness_gap": None, "metrics": {}}
  del series["tokens"]
  assert explain.render(series).split("\n") == [
    "integrated_gradients: log p('x') at position 9 = -1.235",
    "saved: /tmp/ig.html",
  ]


def test_language_model_attribution(lm_workdir, cli):
  base = ("--workdir", lm_workdir, "--input", INPUT)
  ig = run_json(cli, *base, "--method", "integrated_gradients")
  assert set(ig) == KEYS | {"tokens", "baseline_target"}
  assert ig["method"] == "integrated_gradients"
  assert set(ig["target"]) == {"description", "value"}
  assert ig["target"]["description"].startswith("log p(")
  assert ig["target"]["description"].endswith(f"at position {len(INPUT) - 1}")
  assert len(ig["attributions"]) == len(INPUT.encode()) and ig["tokens"] == list(INPUT)
  assert ig["steps"] >= 64
  assert_complete(ig)
  assert set(ig["metrics"]) == METRICS
  assert ig["metrics"]["f_x"] == pytest.approx(ig["target"]["value"], rel=1e-5)
  assert ig["metrics"]["f_baseline"] == pytest.approx(ig["baseline_target"], rel=1e-5)
  assert all(np.isfinite(v) for v in ig["metrics"].values()), ig["metrics"]
  out = Path(ig["out"])
  assert out == Path(lm_workdir) / "attribution" / "integrated_gradients.html"
  page = out.read_text()
  assert [html.unescape(token) for token in _SPAN.findall(page)] == list(INPUT)
  assert "integrated_gradients" in page and "completeness_gap" in page

  # The log-likelihood of a continuation: the last token predicts nothing scored. (Gradient ×
  # input: one compiled program for the new target; the engine tests span completeness.)
  span = run_json(
    cli, *base[:3], "def ", "--continuation", "f(x):", "--method", "grad_x_input", "--no-metrics"
  )
  assert span["target"]["description"] == "log-likelihood of tokens 4:9"
  assert span["tokens"] == list(INPUT) and span["metrics"] == {}
  assert span["completeness_gap"] is None and "baseline_target" not in span
  assert span["attributions"][-1] == 0.0 and span["attributions"][0] != 0.0

  # Rollout: a row of a row-stochastic matrix, no quadrature, the same deletion baselines.
  roll = run_json(cli, *base, "--method", "rollout")
  assert roll["completeness_gap"] is None and roll["steps"] is None
  assert "baseline_target" not in roll and set(roll["metrics"]) == METRICS
  assert min(roll["attributions"]) >= 0 and sum(roll["attributions"]) == pytest.approx(1.0)
  assert roll["target"] == ig["target"]
  assert roll["metrics"]["random_deletion_auc"] == ig["metrics"]["random_deletion_auc"]
  assert Path(roll["out"]) == Path(lm_workdir) / "attribution" / "rollout.html"
  assert Path(roll["out"]).is_file()

  # Layer attribution at a block's output; a bad name lists the real ones.
  layer_error = cli("attribute", *base, "--method", "layer", "--layer", "blocks_9/output")
  assert_user_error(layer_error, "no tapped activation 'blocks_9/output'", "blocks_0/output")
  layer = run_json(cli, *base, "--method", "layer", "--layer", "blocks_0/output", "--steps", 8)
  assert len(layer["attributions"]) == len(INPUT) and layer["metrics"] == {}
  assert layer["target"] == ig["target"]
  assert_complete(layer)

  # A logit of a chosen token; plain-text output.
  code, out, err = cli(
    "attribute", *base, "--method", "saliency", "--target", "logit", "--token", "(",
    "--no-metrics",
  )  # fmt: skip
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith(f"saliency: logit('(') at position {len(INPUT) - 1} = ")
  assert lines[1].startswith("top tokens: ") and len(lines) == 3  # No metrics.
  assert lines[2] == f"saved: {Path(lm_workdir) / 'attribution' / 'saliency.html'}"

  for extra, message in [
    (("--method", "saliency", "--token", "ab"), "--token must be one byte-level token"),
    (("--method", "layer"), "needs a layer name"),
    (("--method", "integrated_gradients", "--baseline", "mean"), "unknown baseline 'mean'"),
  ]:
    assert_user_error(cli("attribute", *base, *extra), message)


def test_explain_workdir_as_a_library(lm_workdir, cli):
  """`explain_workdir` returns what `--json` prints, and `render` what the CLI prints."""
  from fulcrum.platform.attribution import explain
  from fulcrum.platform.errors import UserError

  args = dict(target="logit", token="(", metrics=False)
  summary = explain.explain_workdir(lm_workdir, INPUT, "saliency", **args)
  assert set(summary) == KEYS | {"tokens"} and summary["metrics"] == {}
  assert summary["tokens"] == list(INPUT) and len(summary["attributions"]) == len(INPUT)
  assert json.loads(json.dumps(summary)) == summary  # JSON-ready.
  out = Path(lm_workdir) / "attribution" / "saliency.html"
  assert summary["out"] == str(out) and out.is_file()
  text = explain.render(summary)
  value = summary["target"]["value"]
  first = f"saliency: logit('(') at position {len(INPUT) - 1} = {value:.4g}"
  assert text.splitlines()[0] == first
  flags = ("--target", "logit", "--token", "(", "--no-metrics")
  code, printed, err = cli("attribute", "--workdir", lm_workdir, "--input", INPUT,
                           "--method", "saliency", *flags)  # fmt: skip
  assert code == 0, err
  assert printed == text + "\n"

  for kwargs, message in [
    (dict(method="layer"), "needs a layer name"),
    (dict(method="saliency", token="ab"), "--token must be one byte-level token"),
  ]:
    with pytest.raises(UserError, match=message):
      explain.explain_workdir(lm_workdir, INPUT, **kwargs)


def test_forecaster_attribution(forecast_workdir, cli, tmp_path):
  base = ("--workdir", forecast_workdir)
  ig = run_json(cli, *base, "--input", "validation:1", "--method", "integrated_gradients")
  assert set(ig) == KEYS | {"baseline_target"}  # No tokens.
  assert ig["target"]["description"] == "forecast at step 0, channel 0"
  assert np.shape(ig["attributions"]) == (INPUT_LEN, 1)
  assert_complete(ig)
  assert set(ig["metrics"]) == METRICS
  out = Path(ig["out"])
  assert out == Path(forecast_workdir) / "attribution" / "integrated_gradients.png"
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # The model-randomisation check: one more metric.
  checked = run_json(
    cli, *base, "--input", "validation:1", "--method", "integrated_gradients", "--sanity-check"
  )
  assert set(checked["metrics"]) == METRICS | {"randomisation_spearman"}
  assert -1 <= checked["metrics"]["randomisation_spearman"] <= 1
  assert checked["attributions"] == ig["attributions"]

  # Typed values (the last INPUT_LEN are used), another step, another file.
  values = ",".join(f"{v:.3f}" for v in 50 + 40 * np.sin(np.arange(INPUT_LEN + 6) / 3))
  png = tmp_path / "plots" / "saliency.png"
  saliency = run_json(
    cli, *base, "--input", values, "--method", "saliency", "--step", HORIZON - 1, "--out", png
  )
  assert saliency["target"]["description"] == f"forecast at step {HORIZON - 1}, channel 0"
  assert saliency["out"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert np.shape(saliency["attributions"]) == (INPUT_LEN, 1)

  def attribute(*args):
    return cli("attribute", *base, "--method", "integrated_gradients", *args)

  assert_user_error(attribute("--input", "1,2,3"), "3 steps x 1 channel(s)", f"{INPUT_LEN} steps")
  assert_user_error(attribute("--input", "one,two"), "comma-separated numbers")
  assert_user_error(attribute("--input", "validation:100000"), "validation split has")
  assert_user_error(attribute("--input", "validation", "--step", HORIZON), "outside the")
  assert_user_error(attribute("--input", "validation", "--baseline", "pad"), "unknown baseline")
