"""The house rules of DESIGN.md, checked on the source: no import cycles (function-level imports
included), no private names across packages, short files with distinct names, modules never
importing platform, and every option list with exactly one owner."""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path

import pytest

from tests import house

ROOT = Path(__file__).resolve().parents[1] / "fulcrum"
MAX_LINES = 500


@pytest.fixture(scope="module")
def modules():
  return house.load_modules(ROOT, "fulcrum")


def _write_package(tmp_path: Path, files: dict[str, str]) -> dict[str, house.Module]:
  for name, text in files.items():
    path = tmp_path / "pkg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return house.load_modules(tmp_path / "pkg", "pkg")


# --- The checkers find what they look for ------------------------------------------------------


def test_cycle_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
  mods = _write_package(
    tmp_path,
    {
      "__init__.py": "",
      "a.py": "from pkg import b\n",
      "b.py": "def f():\n  from pkg.sub import c\n",
      "sub/__init__.py": "",
      "sub/c.py": "def g():\n  import pkg.a\n",
      "d.py": "from pkg import a\n",  # Imports into the cycle, is not part of it.
    },
  )
  assert house.cycles(house.import_graph(mods)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_cycle_checker_resolves_relative_imports_and_package_inits(tmp_path):
  mods = _write_package(
    tmp_path,
    {
      "__init__.py": "from pkg.x import f\n",
      "x.py": "def f():\n  from . import y\n",
      "y.py": "from pkg import f\n",  # A name from the package __init__, which imports x.
    },
  )
  assert house.cycles(house.import_graph(mods)) == [["pkg", "pkg.x", "pkg.y"]]


def test_private_checker_finds_imports_and_attribute_reads(tmp_path):
  mods = _write_package(
    tmp_path,
    {
      "__init__.py": "",
      "one/__init__.py": "",
      "one/a.py": "def _helper(): pass\n",
      "one/b.py": "from pkg.one.a import _helper\nfrom pkg.one import _impl\n",
      "one/_impl.py": "",  # A private module: for its own folder (b) only.
      "two/__init__.py": "",
      "two/c.py": "from pkg.one.a import _helper\n",
      "two/d.py": "from pkg.one import a\nx = a._helper\ny = a.__name__\n",
      "two/e.py": "from pkg.one import _impl\n",
    },
  )
  found = house.private_uses(mods)
  assert len(found) == 4, found
  assert any("pkg.one.b imports pkg.one.a._helper" in f for f in found)  # Private to its module.
  assert any("pkg.two.c imports pkg.one.a._helper" in f for f in found)
  assert any("pkg.two.d reads pkg.one.a._helper" in f for f in found)
  assert any("pkg.two.e imports private module pkg.one._impl" in f for f in found)


# --- The rules hold for fulcrum -----------------------------------------------------------------


def test_no_import_cycles(modules):
  found = house.cycles(house.import_graph(modules))
  assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_names_across_packages(modules):
  found = house.private_uses(modules)
  assert not found, "\n".join(found)


def test_modules_never_import_platform(modules):
  bad = [
    f"{name} imports {target}"
    for name, module in modules.items()
    if name.startswith("fulcrum.modules")
    for target, _, _, _ in house.imports(modules, module)
    if target.startswith("fulcrum.platform")
  ]
  assert not bad, bad


def test_recipes_import_only_bases_and_recipes(modules):
  bad = [
    f"{name} imports {target}"
    for name, module in modules.items()
    if name.startswith("fulcrum.recipes.") and name != "fulcrum.recipes._bases"
    for target, _, _, _ in house.imports(modules, module)
    if not target.startswith("fulcrum.recipes")
  ]
  assert not bad, bad


def test_files_are_short_and_distinctly_named(modules):
  lines = {m.path.relative_to(ROOT): len(m.path.read_text().splitlines()) for m in modules.values()}
  long = {str(path): n for path, n in lines.items() if n > MAX_LINES}
  assert not long, long
  names = collections.Counter(m.path.name for m in modules.values() if not m.is_package)
  assert not [n for n, k in names.items() if k > 1], names.most_common(5)


# --- Every option list has one owner ----------------------------------------------------------


def _owners():
  """(config key or None, owner module, owner attribute, values) of every option list."""
  from fulcrum import modules
  from fulcrum.modules import blocks, forecasting, quant, scan
  from fulcrum.modules.attention import AttentionImpl
  from fulcrum.platform import attribution
  from fulcrum.platform.decode import kv_calibration, speculative, strategies
  from fulcrum.platform.optim import factory, galore
  from fulcrum.platform.training import tasks

  return [
    ("model.arch", "fulcrum.modules.models", "ARCHS", modules.ARCHS),
    (None, "fulcrum.modules.blocks", "BLOCKS", tuple(blocks.BLOCKS)),
    (None, "fulcrum.modules.forecasting", "LINEAR_ARCHS", forecasting.LINEAR_ARCHS),
    ("model.attention_impl", "fulcrum.modules.attention", "AttentionImpl",
     tuple(AttentionImpl)),
    ("model.scan_impl", "fulcrum.modules.scan", "ScanImpl", tuple(scan.ScanImpl)),
    ("model.quant", "fulcrum.modules.quant", "MODES", quant.MODES),
    ("optimizer.name", "fulcrum.platform.optim.factory", "OPTIMIZERS", factory.OPTIMIZERS),
    ("optimizer.galore.side", "fulcrum.platform.optim.galore", "SIDES", galore.SIDES),
    ("decode.strategy", "fulcrum.platform.decode.strategies", "STRATEGIES",
     strategies.STRATEGIES),
    ("decode.kv_cache", "fulcrum.platform.decode.strategies", "KV_CACHES", strategies.KV_CACHES),
    ("decode.cascade_rule", "fulcrum.platform.decode.speculative", "RULES", speculative.RULES),
    ("decode.kv_bits", "fulcrum.platform.decode.kv_calibration", "BITS", kv_calibration.BITS),
    (None, "fulcrum.platform.decode.kv_calibration", "METHODS", kv_calibration.METHODS),
    (None, "fulcrum.platform.attribution", "METHODS", attribution.METHODS),
    ("task", "fulcrum.platform.training.tasks", "registry", tuple(tasks.registry())),
  ]  # fmt: skip


def test_option_lists_are_spelled_once(modules):
  """No literal tuple/list/set of strings re-spells an owner's options outside the owner."""
  for _, owner, attr, values in _owners():
    names = {str(v) for v in values}
    if len(names) < 2:
      continue
    spelled = [
      f"{name}:{line}"
      for name, module in modules.items()
      for literal, line in house.string_literals(module)
      if names <= set(literal)
    ]
    assert len(spelled) <= 1, f"{owner}.{attr} {sorted(names)} is spelled at {spelled}"


def _recipe_of_task(task: str):
  from fulcrum import recipes

  return next(c for c in map(recipes.get, recipes.names()) if c.task == task)


def test_config_validation_accepts_exactly_the_owners_options(monkeypatch):
  import jax

  from fulcrum.platform import config as config_lib
  from fulcrum.platform import sections
  from fulcrum.platform.errors import UserError

  keyed = [(key, values) for key, _, _, values in _owners() if key is not None]
  assert len(keyed) == 11
  for key, values in keyed:
    for value in values:
      # A task needs its own data keys: start from a recipe of that task.
      c = _recipe_of_task(value) if key == "task" else sections.base_config()
      config_lib.apply_overrides(c, [f"{key}={value}"])
      if key == "model.arch" and value == "griffin":
        config_lib.apply_overrides(c, ["model.num_layers=3"])
      with monkeypatch.context() as m:
        if key == "model.attention_impl" and value == "cudnn":  # Valid on a GPU, in bfloat16.
          m.setattr(jax, "default_backend", lambda: "gpu")
          config_lib.apply_overrides(c, ["model.dtype=bfloat16"])
        sections.validate(c)  # Every owner's option is valid (where it can run).
    c = sections.base_config()
    bad = 7 if isinstance(values[0], int) else "not-an-option"
    config_lib.apply_overrides(c, [f"{key}={bad}"])
    with pytest.raises(UserError) as e:
      sections.validate(c)
    listed = str(e.value).rpartition("one of ")[2]
    assert listed.split(", ") == [str(v) for v in values], (key, str(e.value))


def _choices(parser, command: str, option: str):
  sub = next(a for a in parser._actions if a.dest == "command")
  action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
  return tuple(action.choices)


def test_cli_choices_are_the_owners_tuples():
  from fulcrum import cli
  from fulcrum.platform import attribution
  from fulcrum.platform.decode import kv_calibration, speculative, strategies

  parser = cli.build_parser()
  assert _choices(parser, "decode", "--strategy") == strategies.STRATEGIES
  assert _choices(parser, "decode", "--rule") == speculative.RULES
  assert _choices(parser, "decode", "--kv-cache") == strategies.KV_CACHES
  assert _choices(parser, "calibrate", "--method") == kv_calibration.METHODS
  assert _choices(parser, "calibrate", "--bits") == kv_calibration.BITS
  assert _choices(parser, "attribute", "--method") == attribution.METHODS


# --- model.* is ModelConfig --------------------------------------------------------------------


def test_model_section_is_model_config():
  from fulcrum.modules import ModelConfig
  from fulcrum.platform import sections

  section = sections.base_config().model
  fields = {f.name: f.default for f in ModelConfig.config_fields()}
  assert dict(section) == fields
  assert ModelConfig.from_mapping(section) == ModelConfig()


def test_every_recipe_model_section_builds_a_model_config():
  from fulcrum import recipes
  from fulcrum.modules import ModelConfig, models

  for name in recipes.names():
    config = ModelConfig.from_mapping(recipes.get(name).model)  # Unknown keys would raise.
    models.validate(config)


def test_model_config_rejects_unknown_keys():
  from fulcrum.modules import ModelConfig, build

  with pytest.raises(ValueError, match="unknown model key.*d_modle"):
    ModelConfig.from_mapping({"arch": "mamba", "d_modle": 64})
  with pytest.raises(ValueError, match="d_modle"):
    build({"d_modle": 64})


def test_importing_fulcrum_starts_no_jax_backend():
  """Importing any module of the package must not start a JAX backend (a module-level
  `jnp.asarray` does): a multi-host run joins with `jax.distributed.initialize` after its imports,
  which refuses once a backend exists. The agents package once broke every multi-host run so."""
  import subprocess
  import sys

  code = textwrap.dedent(
    """
    import importlib, pkgutil
    import fulcrum
    from jax._src import xla_bridge
    for info in pkgutil.walk_packages(fulcrum.__path__, "fulcrum."):
      if info.name.endswith("__main__"):
        continue
      importlib.import_module(info.name)
      assert not xla_bridge.backends_are_initialized(), f"importing {info.name} started JAX"
    print("ok")
    """
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
