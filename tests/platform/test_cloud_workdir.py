"""A `gs://` workdir end to end, against a local GCS emulator (the `gcs_bucket` fixture; no
network): `fulcrum train`, its resume, `eval`, `calibrate`, `decode` with the calibrated KV cache
and `attribute` read and write every workdir file in the bucket (config, metrics, TensorBoard,
checkpoints, KV-cache specs, attribution reports), and no local `./gs:` folder appears.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from etils import epath

from tests.conftest import REPO, UNOPTIMISED_ENV, random_params, run_cli, tiny_overrides

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")


def _train_args(workdir: str, corpus, steps: int) -> list[str]:
  values = {"train.steps": steps, "train.checkpoint_every": 2, "train.log_every": 1}
  overrides = tiny_overrides(corpus, **values, **{"train.eval_every": 0})
  return [
    "train",
    "--recipe",
    "demo",
    "--workdir",
    workdir,
    *[a for o in overrides for a in ("--set", o)],
  ]


def _steps(run: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _metric_steps(run: epath.Path) -> tuple[list[int], list[int]]:
  """The steps of metrics.jsonl's training rows and of its eval rows."""
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "loss" in r], [r["step"] for r in rows if "loss" not in r]


def _no_local_gs(*folders) -> None:
  for folder in folders:
    assert not (folder / "gs:").exists(), f"a local {folder / 'gs:'} folder was created"


def test_gs_workdir_end_to_end(gcs_bucket, tiny_corpus, tmp_path, monkeypatch, cli):
  monkeypatch.chdir(tmp_path)  # The in-process commands below run here too.
  workdir = f"{gcs_bucket}/{tmp_path.name}/run"
  run = epath.Path(workdir)

  # A fresh process, as a user runs it: the emulator's environment is inherited.
  first = run_cli(_train_args(workdir, tiny_corpus, 4), env=UNOPTIMISED_ENV, cwd=tmp_path)
  assert first.returncode == 0, first.stderr
  assert "Traceback" not in first.stderr, first.stderr
  assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
  assert _steps(run)[-1] == 4
  assert _metric_steps(run) == ([1, 2, 3, 4], [4])  # Evaluated at the last step.
  _no_local_gs(tmp_path, REPO)

  # Resume to step 6: the rows of the first run are kept (an object store cannot append).
  code, out, err = cli(*_train_args(workdir, tiny_corpus, 6))
  assert code == 0, err
  assert _steps(run)[-1] == 6
  assert _metric_steps(run) == ([1, 2, 3, 4, 5, 6], [4, 6])
  assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert workdir in out  # The printed metrics / checkpoints paths keep the gs:// URL.

  code, out, err = cli("eval", "--workdir", workdir, "--json")
  assert code == 0, err
  assert json.loads(out)["step"] == 6

  code, out, err = cli("calibrate", "--workdir", workdir, "--method", "int-token", "--batches", 1)
  assert code == 0, err
  specs = run / "kvquant" / "step_6" / "int-token_3bit.npz"
  assert specs.exists()
  assert f"saved: {specs}" in out

  args = ("--prompt", "def ", "--max-new-tokens", 4, "--kv-cache", "int-token", "--json")
  code, out, err = cli("decode", "--workdir", workdir, *args)
  assert code == 0, err
  assert json.loads(out)["kv_cache"] == "int-token"

  args = ("--input", "def f(x):", "--method", "saliency", "--no-metrics", "--json")
  code, out, err = cli("attribute", "--workdir", workdir, *args)
  assert code == 0, err
  report = run / "attribution" / "saliency.html"
  assert json.loads(out)["out"] == str(report)
  assert "<html" in report.read_text()
  elsewhere = f"{gcs_bucket}/{tmp_path.name}/reports/saliency.html"
  code, out, err = cli("attribute", "--workdir", workdir, *args, "--out", elsewhere)
  assert code == 0, err
  assert "<html" in epath.Path(elsewhere).read_text()

  _no_local_gs(tmp_path, REPO)


def test_kv_cache_specs_and_reports_round_trip_through_gs(gcs_bucket, tmp_path, monkeypatch):
  """The files `calibrate` and `attribute` write, as a library: KV-cache specs saved to and
  loaded from the bucket unchanged, an HTML report and a PNG written there."""
  from fulcrum.modules import build
  from fulcrum.platform.attribution import report
  from fulcrum.platform.decode import kv_calibration

  monkeypatch.chdir(tmp_path)
  root = epath.Path(f"{gcs_bucket}/{tmp_path.name}")
  model = build(dict(vocab_size=32, arch="transformer", d_model=16, num_layers=1, num_heads=2))
  params = random_params(model, seed=0)
  tokens = np.random.default_rng(0).integers(0, 32, (2, 12)).astype(np.int32)
  specs = kv_calibration.calibrate(model, params, [tokens], bits=4, method="int-token")
  path = kv_calibration.spec_path(root, 3, "int-token", 4)
  assert str(path) == f"{root}/kvquant/step_3/int-token_4bit.npz"
  kv_calibration.save(path, specs, {"method": "int-token", "bits": 4, "step": 3})
  loaded, info = kv_calibration.load(path, model)
  assert info == {"method": "int-token", "bits": 4, "step": 3}
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(specs), strict=True):
    np.testing.assert_array_equal(a, b)
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # No temporary file left.

  page = report.html_heatmap(["a", "b"], np.array([0.5, -0.5]), title="T", subtitle="S")
  assert report.write_html(root / "attribution" / "a.html", page).read_text() == page
  series = np.linspace(0, 1, 20).reshape(10, 2)
  png = report.series_png(root / "attribution" / "s.png", series, series).read_bytes()
  assert png.startswith(b"\x89PNG")
  _no_local_gs(tmp_path, REPO)


def test_a_gs_workdir_has_one_writer(gcs_bucket, tmp_path):
  from fulcrum.platform import workdir as workdir_lib
  from fulcrum.platform.errors import UserError

  run = workdir_lib.resolve(f"{gcs_bucket}/{tmp_path.name}/locked")
  with workdir_lib.Lock(run):
    assert json.loads((run / "train.lock").read_text())["host"]
    with pytest.raises(UserError, match="in use by another `fulcrum train`"), workdir_lib.Lock(run):
      pass
  assert not (run / "train.lock").exists()  # Released at exit: the next run takes it.
  with workdir_lib.Lock(run):
    pass
