"""The `fulcrum` command: user errors exit 2 with one line, and the happy paths work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UNOPTIMISED_ENV, run_cli, tiny_overrides

# XLA's optimisation passes off for the tiny models trained and evaluated here (in process too).
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def assert_user_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr)
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr  # One line, no traceback.
  assert lines[0].startswith("fulcrum: error:")
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def sets(items):
  return [arg for item in items for arg in ("--set", item)]


def in_process(cli, args):
  """`fulcrum ARGS` run by the `cli` fixture (no new interpreter), as a CompletedProcess."""
  code, out, err = cli(*args)
  return subprocess.CompletedProcess(args, code, out, err)


def test_recipes_lists_every_recipe():
  from fulcrum import recipes

  result = run_cli(["recipes"])
  assert result.returncode == 0
  for name in recipes.names():
    assert name in result.stdout


@pytest.mark.parametrize(
  "args,fragments",
  [
    (["train", "--recipe", "nope", "--workdir", "/tmp/x"], ["unknown recipe 'nope'", "demo"]),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "model.bogus=1"],
      ["unknown config key 'model.bogus'", "d_model"],
    ),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "bogus.key=1"],
      ["unknown config key 'bogus.key'"],
    ),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "train.steps=ten"],
      ["train.steps", "int"],
    ),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "model.tie_embeddings=maybe"],
      ["model.tie_embeddings", "bool"],
    ),
    (["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "train.steps"], ["key=value"]),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "model.arch=rnn"],
      ["model.arch='rnn'"],
    ),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "optimizer.name=sgd"],
      ["optimizer.name='sgd'", "galore8bit"],
    ),
    (
      ["train", "--recipe", "demo", "--workdir", "/tmp/x", "--set", "model.quant=int4"],
      ["model.quant='int4'", "int8_weight"],
    ),
    (["train", "--recipe", "demo"], ["--workdir"]),
    (["frobnicate"], ["invalid choice"]),
    (["eval", "--workdir", "/nonexistent/run"], ["config.json"]),
    (["decode", "--workdir", "/nonexistent/run", "--prompt", "x"], ["config.json"]),
    (["bench", "nope"], ["unknown benchmark 'nope'", "train"]),
  ],
)
def test_bad_input_exits_2_with_one_line(args, fragments, cli):
  # In this process: each case is `main`'s validation; a real process's exit status and bare
  # stderr are checked by the tests below, through the same `raise SystemExit(main())`.
  assert_user_error(in_process(cli, args), *fragments)


def test_unwritable_workdir(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  if os.access(locked, os.W_OK):  # root ignores permission bits; use a path under a file.
    target = tmp_path / "a_file"
    target.write_text("")
    workdir = target / "run"
  else:
    workdir = locked / "run"
  assert_user_error(
    run_cli(["train", "--recipe", "demo", "--workdir", str(workdir)]), "not writable"
  )


def test_missing_dataset(tmp_path):
  result = run_cli(
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      str(tmp_path / "run"),
      *sets([f"data.text_files={tmp_path}/nothing/*.txt", f"data.data_dir={tmp_path}/tfds"]),
    ]
  )
  assert_user_error(result, "matched no files")
  result = run_cli(
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      str(tmp_path / "run2"),
      *sets(["data.tfds_name=no_such_dataset_xyz", f"data.data_dir={tmp_path}/tfds"]),
    ]
  )
  assert_user_error(result, "no_such_dataset_xyz")


def test_train_eval_decode_round_trip(tiny_corpus, tmp_path, cli):
  """`fulcrum train`, `eval` and `decode` as real processes; the reruns and refusals in between
  run in this one (the same `main`, without starting Python and JAX again)."""
  workdir = str(tmp_path / "run")
  result = run_cli(
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      workdir,
      *sets(tiny_overrides(tiny_corpus, **{"train.steps": 6})),
    ],
    env=UNOPTIMISED_ENV,
  )
  assert result.returncode == 0, result.stderr
  assert "bits_per_byte" in result.stdout and "metrics.jsonl" in result.stdout
  assert "tensorboard" in result.stdout

  again = in_process(
    cli,
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      workdir,
      *sets(tiny_overrides(tiny_corpus, **{"train.steps": 6})),
    ],
  )
  assert again.returncode == 0 and "already trained" in again.stderr

  changed = in_process(
    cli,
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      workdir,
      *sets(tiny_overrides(tiny_corpus, **{"model.d_model": 64})),
    ],
  )
  assert_user_error(changed, "different model", "model.d_model")
  # Another optimizer would not fit the checkpointed state: refused, checkpoints kept.
  other_optimizer = in_process(
    cli,
    [
      "train",
      "--recipe",
      "demo",
      "--workdir",
      workdir,
      *sets(tiny_overrides(tiny_corpus, **{"train.steps": 8, "optimizer.name": "galore"})),
    ],
  )
  assert_user_error(other_optimizer, "optimizer state", "optimizer.name: 'adamw' -> 'galore'")
  assert not list(Path(workdir, "checkpoints").glob("corrupt-*"))

  ev = run_cli(["eval", "--workdir", workdir, "--json"], env=UNOPTIMISED_ENV)
  assert ev.returncode == 0, ev.stderr
  metrics = json.loads(ev.stdout)
  assert metrics["step"] == 6 and metrics["eval/bits_per_byte"] > 0

  dec = run_cli(
    ["decode", "--workdir", workdir, "--prompt", "def f(", "--max-new-tokens", "8", "--json"],
    env=UNOPTIMISED_ENV,
  )
  assert dec.returncode == 0, dec.stderr
  out = json.loads(dec.stdout)
  assert len(out["tokens"]) == 8 and isinstance(out["text"], str)

  assert_user_error(in_process(cli, ["decode", "--workdir", workdir, "--prompt", ""]), "empty")


def test_bench_json_stdout_is_only_the_result(cli, monkeypatch):
  """What a benchmark prints while it runs (its training runs' eval lines) goes to stderr, so
  `fulcrum bench NAME --json` prints parseable JSON."""
  import importlib
  import types

  def run(quick):
    print("step 40: loss 2.9")  # As a training run's eval line does.
    return {"speedup": 1.5, "quick": quick, "markdown": "| table |"}

  real = importlib.import_module
  fake = types.SimpleNamespace(run=run)
  monkeypatch.setattr(
    importlib,
    "import_module",
    lambda name, *a: fake if name == "fulcrum.benchmarks.bench_scan" else real(name, *a),
  )
  code, out, err = cli("bench", "scan", "--quick", "--json")
  assert code == 0
  assert json.loads(out) == {"speedup": 1.5, "quick": True}
  assert "step 40: loss 2.9" in err
  code, out, _ = cli("bench", "scan", "--quick")
  assert code == 0 and out.strip() == "| table |"
