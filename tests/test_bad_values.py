"""Bad values end as one line on stderr and exit status 2, never a traceback or a NaN run.

Config values are checked by `fulcrum config` (the dry run: the same validation `train` runs
first); the arguments of `decode`, `attribute` and `calibrate` against one tiny trained LM
workdir and one tiny forecaster workdir per module. Every case ran to a traceback, a NaN run
or silent acceptance before these checks (see each group's comment).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import tiny_overrides, train_recipe

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("fulcrum: error:"), err
  assert fragment in lines[0], lines[0]


def sets(*items: str) -> list[str]:
  return [arg for item in items for arg in ("--set", item)]


# (recipe, --set items, what the line names). Before: each trained to a traceback at the first
# step (sizes, cudnn on CPU, a 2**64 seed), a NaN loss (vocab_size, rope_theta, norm_eps, b1=1)
# or silently (warmup_steps, b1 < 0, b2 > 1, a negative seed, soft cap).
CONFIG_CASES = [
  ("demo", ["model.num_kv_heads=-1"], "model.num_kv_heads must be >= 0"),
  ("demo", ["model.num_kv_heads=-2"], "model.num_kv_heads must be >= 0"),
  ("demo", ["model.head_dim=-8"], "model.head_dim must be >= 0"),
  ("demo", ["model.mlp_dim=-1"], "model.mlp_dim must be >= 0"),
  ("demo", ["model.d_model=30", "model.num_heads=2"], "each head has 15"),
  ("demo", ["model.arch=hawk", "model.lru_width=-1"], "model.lru_width must be >= 0"),
  ("demo", ["model.arch=hawk", "model.lru_width=30"], "model.num_heads=4 blocks"),
  ("demo", ["model.arch=hawk", "model.conv_width=-2"], "model.conv_width must be >= 1"),
  ("demo", ["model.arch=griffin", "model.num_kv_heads=-1"], "model.num_kv_heads must be >= 0"),
  ("demo", ["model.arch=mamba", "model.ssm_state=0"], "model.ssm_state must be >= 1"),
  ("demo", ["model.arch=mamba", "model.ssm_state=-1"], "model.ssm_state must be >= 1"),
  ("demo", ["model.arch=mamba", "model.conv_width=0"], "model.conv_width must be >= 1"),
  ("demo", ["model.arch=mamba", "model.ssm_expand=0"], "model.ssm_expand must be >= 1"),
  ("demo", ["model.arch=mamba", "model.dt_rank=-1"], "model.dt_rank must be >= 0"),
  ("forecast", ["model.arch=mamba", "model.ssm_state=0"], "model.ssm_state must be >= 1"),
  ("demo", ["model.vocab_size=100"], "set model.vocab_size=256 or more"),
  ("demo", ["model.rope_theta=0"], "model.rope_theta must be a positive number"),
  ("demo", ["model.rope_theta=-5"], "model.rope_theta must be a positive number"),
  ("demo", ["model.norm_eps=-1"], "model.norm_eps must be a number >= 0"),
  ("demo", ["model.logits_soft_cap=-1"], "model.logits_soft_cap must be >= 0"),
  ("demo", ["model.attention_impl=cudnn"], "needs an NVIDIA GPU"),
  ("demo", ["model.scan_impl=bogus"], "model.scan_impl='bogus' is unknown"),
  ("demo", ["model.attention_impl=bogus"], "model.attention_impl='bogus' is unknown"),
  ("demo", ["optimizer.warmup_steps=-1"], "optimizer.warmup_steps must be >= 0"),
  ("demo", ["optimizer.b1=1.0"], "optimizer.b1 must be in [0, 1)"),
  ("demo", ["optimizer.b1=-0.1"], "optimizer.b1 must be in [0, 1)"),
  ("demo", ["optimizer.b2=1.5"], "optimizer.b2 must be in [0, 1)"),
  ("demo", ["optimizer.min_lr_ratio=nan"], "optimizer.min_lr_ratio must be in [0, 1]"),
  ("demo", ["train.seed=18446744073709551616"], "train.seed must be an integer in [0, 2**63"),
  ("demo", ["train.seed=-1"], "train.seed must be an integer in [0, 2**63"),
  ("forecast", ["model.input_len=0"], "must both be positive"),
]


@pytest.mark.parametrize("recipe,items,fragment", CONFIG_CASES)
def test_config_value_is_one_line(cli, recipe, items, fragment):
  code, _, err = cli("config", recipe, *sets(*items))
  assert_one_line_error(code, err, fragment)


# Checks follow the architecture: keys a block does not read are not checked (before, Mamba,
# Hawk and DLinear were refused for attention-head values, DLinear for vocab_size).
PER_ARCH_ACCEPTED = [
  ("demo", ["model.arch=mamba", "model.num_heads=3"]),
  ("demo", ["model.arch=mamba", "model.num_heads=0", "model.rope_theta=0"]),
  ("demo", ["model.arch=mamba", "model.attention_impl=cudnn", "model.head_dim=-1"]),
  ("demo", ["model.arch=hawk", "model.num_kv_heads=3"]),
  ("demo", ["model.arch=griffin", "model.num_layers=3"]),
  ("forecast", ["model.num_heads=0"]),
  ("forecast", ["model.arch=nlinear", "model.num_heads=7", "model.moving_avg=0"]),
  ("forecast", ["model.arch=dlinear", "model.norm_eps=-1", "model.ssm_state=0"]),
  ("forecast", ["model.arch=mamba", "model.vocab_size=0"]),
]


@pytest.mark.parametrize("recipe,items", PER_ARCH_ACCEPTED)
def test_keys_an_arch_does_not_read_are_not_checked(cli, recipe, items):
  code, out, err = cli("config", recipe, *sets(*items))
  assert code == 0, err
  assert '"model"' in out


@pytest.mark.parametrize(
  "args",
  [
    ["train", "--recipe", "demo"],
    ["eval"],
    ["decode", "--prompt", "x"],
    ["calibrate"],
    ["attribute", "--input", "x", "--method", "saliency"],
  ],
)
def test_empty_workdir_is_refused(cli, args, tmp_path, monkeypatch):
  """Before: `--workdir ''` meant the current folder (train wrote its run there)."""
  monkeypatch.chdir(tmp_path)
  code, _, err = cli(*args, "--workdir", "")
  assert_one_line_error(code, err, "argument --workdir: is empty")
  assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lm(tiny_corpus, tmp_path_factory):
  """A 1-layer, 16-wide byte-level transformer after 2 steps."""
  values = {"train.steps": 2, "model.d_model": 16, "model.num_layers": 1}
  return train_recipe("demo", tiny_overrides(tiny_corpus, **values), tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
  """DLinear on yearly sunspots, 24 steps in, 4 out, after 2 steps."""
  values = {
    "data.data_dir": str(tmp_path_factory.mktemp("series_tfds")),
    "data.series": "sunspots_yearly",
    "model.input_len": 24,
    "model.horizon": 4,
    "train.steps": 2,
    "train.eval_every": 0,
    "train.progress": False,
  }
  overrides = [f"{k}={v}" for k, v in values.items()]
  return train_recipe("forecast", overrides, tmp_path_factory.mktemp("forecaster"))


def test_decode_values(cli, lm, forecaster):
  """Before: temperature nan/inf and alpha nan decoded garbage (exit 0), a forecaster draft an
  AttributeError traceback, a 2**64 seed an OverflowError traceback."""
  base = ("decode", "--workdir", lm, "--prompt", "x", "--max-new-tokens", "2")
  cases = [
    (["--strategy", "sample", "--temperature", "nan"], "temperature must be >= 0 and finite"),
    (["--strategy", "sample", "--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--strategy", "sample", "--temperature", "-1"], "temperature must be >= 0 and finite"),
    (["--strategy", "cascade", "--draft-workdir", lm, "--alpha", "nan"], "alpha"),
    (["--strategy", "lookahead", "--lookahead", "abc"], "--lookahead takes W,N,G"),
    (["--strategy", "lookahead", "--lookahead", "5"], "--lookahead takes W,N,G"),
    (["--strategy", "speculative", "--draft-workdir", forecaster], "a draft must be a language"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 2**63"),
    (["--draft-workdir", ""], "argument --draft-workdir: is empty"),
  ]
  for extra, fragment in cases:
    code, _, err = cli(*base, *extra)
    assert_one_line_error(code, err, fragment)
  code, _, err = cli("decode", "--workdir", forecaster, "--prompt", "x")
  assert_one_line_error(code, err, "decode needs an LM")


def test_attribute_report_in_an_unwritable_place(cli, lm, forecaster, tmp_path):
  """Before: a FileNotFoundError / NotADirectoryError traceback after the attribution ran."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for workdir, input_, out in [
    (lm, "def f(", "/proc/x.html"),
    (lm, "def f(", str(a_file / "report.html")),
    (forecaster, "validation", "/proc/x.png"),
  ]:
    code, _, err = cli(
      "attribute", "--workdir", workdir, "--input", input_, "--method", "saliency",
      "--no-metrics", "--out", out,
    )  # fmt: skip
    assert_one_line_error(code, err, f"cannot write the report to {out}")


@pytest.mark.parametrize("batches", ["0", "-1"])
def test_calibrate_needs_a_batch(cli, lm, batches):
  """Before: 0 silently used decode.calibration_batches; -1 a ValueError traceback."""
  code, _, err = cli("calibrate", "--workdir", lm, "--batches", batches)
  assert_one_line_error(code, err, f"must be >= 1, got {batches}")


def test_csv_values_that_overflow_the_standard_deviation(cli, tmp_path):
  """Before: std = inf, so every input was 0 and the loss NaN from the first step (exit 0)."""
  rng = np.random.default_rng(0)
  rows = [f"2020-{i},{rng.normal() * 1e200:.6e},{rng.normal():.6f}" for i in range(80)]
  csv = tmp_path / "huge.csv"
  csv.write_text("date,big,small\n" + "\n".join(rows) + "\n")
  items = [
    f"data.csv_path={csv}", f"data.data_dir={tmp_path / 'tfds'}", "model.input_len=8",
    "model.horizon=4", "train.steps=2", "train.progress=False",
  ]  # fmt: skip
  code, _, err = cli("train", "--recipe", "forecast", "--workdir", tmp_path / "run", *sets(*items))
  # The CSV is prepared (one progress line) before its values can be checked.
  progress, _, error = err.rpartition("fulcrum: error:")
  assert progress.startswith("preparing series") and progress.count("\n") == 1, err
  assert_one_line_error(code, "fulcrum: error:" + error, "column 'big' holds values too large")


@pytest.mark.parametrize("noise", ["nan", "inf"])
def test_smoothgrad_noise_must_be_finite(cli, lm, noise):
  """Before: every attribution NaN, exit 0."""
  code, _, err = cli(
    "attribute", "--workdir", lm, "--input", "x", "--method", "smoothgrad", "--noise", noise,
    "--no-metrics",
  )  # fmt: skip
  assert_one_line_error(code, err, f"smoothgrad needs samples >= 1 and noise >= 0, got 32, {noise}")
