"""notebooks/install_cell.py, the notebooks' first code cell: what it installs, and a real run in
a fresh virtual environment whose preinstalled packages (this environment's, JAX included) stand
in for a Colab runtime's. Offline: pip gets --no-index and builds the wheel without isolation."""

from __future__ import annotations

import importlib.metadata
import json
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

INSTALL_CELL = REPO / "notebooks" / "install_cell.py"
URL = "git+https://github.com/someone/fulcrum@main"


@pytest.fixture(scope="module")
def cell():
  """The cell's functions, without running it."""
  return runpy.run_path(str(INSTALL_CELL), run_name="install_cell")


def test_a_new_enough_jax_is_pinned_with_its_accelerator_builds(cell):
  dists = {
    "jax": "0.8.1",
    "jaxlib": "0.8.1",
    "libtpu": "0.0.21",
    "jax-cuda12-plugin": "0.8.1",
    "jax-cuda12-pjrt": "0.8.1",
    "jaxtyping": "0.3.2",
    "numpy": "2.0.2",
  }
  requirements, constraints = cell["plan"](URL, dists, "tpu")
  assert requirements == [f"fulcrum @ {URL}"]
  assert constraints == [
    "jax==0.8.1",
    "jax-cuda12-pjrt==0.8.1",
    "jax-cuda12-plugin==0.8.1",
    "jaxlib==0.8.1",
    "libtpu==0.0.21",
  ]


@pytest.mark.parametrize(
  "dists, device, jax",
  [
    ({"jax": "0.6.2", "jaxlib": "0.6.2", "libtpu": "0.0.17"}, "tpu", "jax[tpu]>=0.7"),
    ({"jax": "0.5.3", "jax-cuda12-plugin": "0.5.3"}, "gpu", "jax[cuda12]>=0.7"),
    ({}, "cpu", "jax>=0.7"),
  ],
)
def test_an_old_or_missing_jax_is_installed_for_the_device(cell, dists, device, jax):
  requirements, constraints = cell["plan"](URL, dists, device)
  assert requirements == [f"fulcrum @ {URL}", jax] and constraints == []


def test_versions_compare_as_numbers(cell):
  version = cell["version_tuple"]
  assert version("0.10.0") > version("0.7") > version("0.6.2")
  assert version("0.7.0.dev20250601") >= version("0.7") > version("0.6.99rc1")


def test_a_local_source_is_an_absolute_path(cell, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  requirements, _ = cell["plan"]("fulcrum", {"jax": "0.7.0"}, "cpu")
  assert requirements == [str(tmp_path / "fulcrum")]


def test_a_tpu_is_told_without_importing_jax(cell, monkeypatch):
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  assert cell["accelerator"]({}) == "tpu"
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
  assert cell["accelerator"]({"libtpu": "0.0.21"}) == "tpu"


def test_when_the_runtimes_jax_does_not_fit_a_newer_one_for_the_device_is_installed(
  cell, monkeypatch
):
  calls = []
  scope = cell["install"].__globals__  # The functions' own module namespace.
  monkeypatch.setitem(scope, "accelerator", lambda dists: "tpu")
  monkeypatch.setitem(scope, "pip_install", lambda *call: calls.append(call) or len(calls) > 1)
  scope["install"](URL)
  (first, pins), (second, no_pins) = calls
  jax = importlib.metadata.version("jax")
  assert first == [f"fulcrum @ {URL}"] and f"jax=={jax}" in pins
  assert second == [f"fulcrum @ {URL}", "jax[tpu]>=0.7"] and no_pins == []


def test_a_failed_install_is_an_error(cell, monkeypatch):
  scope = cell["install"].__globals__
  monkeypatch.setitem(scope, "pip_install", lambda *call: False)
  with pytest.raises(RuntimeError, match="pip could not install Fulcrum"):
    scope["install"](URL)


def test_replacing_an_imported_package_asks_for_a_restart(cell, monkeypatch, capsys):
  scope = cell["install"].__globals__
  versions = iter([{"pytest": "0.1", "jax": "0.7.0"}, {"pytest": "9.9", "jax": "0.7.0"}])
  monkeypatch.setitem(scope, "installed_dists", lambda: next(versions))
  monkeypatch.setitem(scope, "pip_install", lambda *call: True)
  scope["install"](URL)  # pytest is imported here; jax's version stayed.
  assert (
    "pip replaced pytest, already imported: Runtime → Restart session." in capsys.readouterr().out
  )


def fake_colab(tmp_path: Path) -> tuple[Path, Path, Path]:
  """A fresh venv that sees this environment's packages except Fulcrum (through a folder of
  links named by a .pth file), like a runtime with JAX preinstalled. Returns (its python, its
  site-packages, the folder of links)."""
  preinstalled = tmp_path / "preinstalled"
  preinstalled.mkdir()
  paths = sysconfig.get_paths()
  for site in dict.fromkeys([paths["purelib"], paths["platlib"]]):
    for entry in Path(site).iterdir():
      link = preinstalled / entry.name
      if not entry.name.startswith(("fulcrum", "__editable__")) and not link.exists():
        link.symlink_to(entry)
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)
  python = tmp_path / "venv" / "bin" / "python"
  query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  site = Path(subprocess.check_output([python, "-c", query], text=True).strip())
  (site / "preinstalled.pth").write_text(f"{preinstalled}\n")
  return python, site, preinstalled


def checkout_copy(tmp_path: Path) -> Path:
  """What a wheel is built from, copied: building in the checkout would reuse its build/."""
  source = tmp_path / "checkout"
  shutil.copytree(
    REPO / "fulcrum", source / "fulcrum", ignore=shutil.ignore_patterns("__pycache__")
  )
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  return source


def test_the_cell_installs_fulcrum_as_a_package_and_keeps_the_runtimes_jax(tmp_path):
  python, site, preinstalled = fake_colab(tmp_path)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
  env.update(
    FULCRUM_SOURCE=str(checkout_copy(tmp_path)),
    FULCRUM_PIP_ARGS="--no-index --no-build-isolation",
    PIP_CONFIG_FILE=os.devnull,
  )
  run = subprocess.run(
    [python, INSTALL_CELL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stderr[-3000:]
  jax_version = importlib.metadata.version("jax")
  lines = run.stdout.splitlines()
  assert f"fulcrum 0.1.0: {site / 'fulcrum' / '__init__.py'}" in lines, run.stdout
  assert f"jax {jax_version}: {preinstalled / 'jax' / '__init__.py'}" in lines, run.stdout
  assert any(line.startswith("jax.devices(): [CpuDevice(id=0)") for line in lines), run.stdout
  # Not reinstalled: no JAX in the venv's own site-packages; Fulcrum a regular, non-editable one.
  assert not [p.name for p in site.iterdir() if p.name.startswith(("jax", "libtpu"))]
  assert not list(site.glob("__editable__*"))
  (dist_info,) = site.glob("fulcrum-*.dist-info")
  assert not json.loads((dist_info / "direct_url.json").read_text())["dir_info"].get("editable")
  # A later cell (another process here) imports the installed package and its data.
  probe = (
    "import json, fulcrum, importlib.resources as r; from fulcrum import recipes;"
    "print(json.dumps([fulcrum.__file__, 'demo' in recipes.names(),"
    " r.files('fulcrum.platform.data').joinpath('series/co2_weekly.csv').is_file()]))"
  )
  out = subprocess.check_output([python, "-c", probe], cwd=tmp_path, env=env, text=True)
  assert json.loads(out) == [str(site / "fulcrum" / "__init__.py"), True, True]
