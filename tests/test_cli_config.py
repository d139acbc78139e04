"""`fulcrum config`, `--version`, recipes from a file path and the packaged benchmarks."""

from __future__ import annotations

import json
import textwrap

import pytest

import fulcrum
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def test_version(cli):
  with pytest.raises(SystemExit) as e:
    cli("--version")
  assert e.value.code == 0


def test_version_prints_the_package_version(capsys):
  from fulcrum import cli as cli_lib

  with pytest.raises(SystemExit):
    cli_lib.main(["--version"])
  assert capsys.readouterr().out.strip() == f"fulcrum {fulcrum.__version__}"


def test_config_prints_the_resolved_config(cli):
  code, out, err = cli("config", "demo", "--set", "model.arch=mamba", "--set", "train.steps=7")
  assert code == 0, err
  config = json.loads(out)
  assert config["model"]["arch"] == "mamba"
  assert config["train"]["steps"] == 7
  assert config["model"]["d_model"] == 192  # The demo recipe's own value.
  assert set(config) == {
    "task", "train", "model", "optimizer", "data", "decode", "mesh", "log", "spin", "agent",
    "improve", "ppo",
  }  # fmt: skip


@pytest.mark.parametrize(
  "args,message",
  [
    (("config", "nope"), "unknown recipe 'nope'"),
    (("config", "demo", "--set", "model.nope=1"), "unknown config key 'model.nope'"),
    (("config", "demo", "--set", "model.arch=lstm"), "model.arch='lstm' is unknown"),
    (("config", "./missing_recipe.py"), "does not exist"),
  ],
)
def test_config_bad_input_is_one_line_and_exit_2(cli, args, message):
  code, out, err = cli(*args)
  assert code == 2 and out == ""
  assert message in err and len(err.strip().splitlines()) == 1, err


def _recipe_file(tmp_path, body: str):
  path = tmp_path / "my_recipe.py"
  path.write_text(textwrap.dedent(body))
  return path


def test_recipe_from_a_path_trains(cli, tiny_corpus, tmp_path):
  path = _recipe_file(
    tmp_path,
    '''
    """A user's recipe outside the package: the demo family, smaller."""
    from fulcrum.recipes._bases import byte_lm_config


    def get_config():
      c = byte_lm_config(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, learning_rate=3e-3)
      c.train.steps = 2
      c.train.log_every = 1
      c.train.checkpoint_every = 2
      return c
    ''',
  )
  code, out, err = cli("config", str(path))
  assert code == 0, err
  assert json.loads(out)["train"]["steps"] == 2
  sets = [a for kv in tiny_overrides(tiny_corpus) for a in ("--set", kv)]
  workdir = tmp_path / "run"
  code, out, err = cli("train", "--recipe", str(path), "--workdir", workdir, *sets)
  assert code == 0, err
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) == 2
  assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32


def test_recipe_file_without_get_config_is_a_user_error(cli, tmp_path):
  path = _recipe_file(tmp_path, "x = 1\n")
  code, _, err = cli("config", str(path))
  assert code == 2 and "defines no get_config()" in err


def test_benchmarks_ship_with_the_package():
  from fulcrum import benchmarks

  names = benchmarks.names()
  assert {"scan", "train", "scaling", "decode_latency", "optim", "decode", "attribution"} <= set(
    names
  )


def test_bench_unknown_name_lists_the_benchmarks(cli):
  code, _, err = cli("bench", "nope")
  assert (
    code == 2 and "unknown benchmark 'nope'; available: agents, attribution, craftax, decode" in err
  )


def test_bench_out_chooses_the_results_folder(cli, tmp_path, monkeypatch):
  from fulcrum.benchmarks import bench_scaling

  # Known cost model instead of timing (test_benchmarks checks the analysis itself).
  monkeypatch.setattr(bench_scaling, "_step_time", lambda model, length, repeats: 1e-3 * length)
  code, out, err = cli("bench", "scaling", "--json", "--out", tmp_path / "results")
  assert code == 0, err
  result = json.loads(out)
  assert result["slopes"]["mamba"] == pytest.approx(1.0)
  written = json.loads((tmp_path / "results" / "scaling.json").read_text())
  assert written["slopes"] == result["slopes"]
  assert (tmp_path / "results" / "scaling.md").exists()
  assert (tmp_path / "results" / "scaling.png").exists()
