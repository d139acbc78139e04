"""Keeps every notebook's Colab parts in step with their one owner each.

  python scripts/sync_notebooks.py          # rewrites the notebooks
  python scripts/sync_notebooks.py --check  # lists what differs, exit 1 (tests/test_notebooks.py)

- the repository URL: pyproject.toml `[project.urls] Repository`; the install cell's default
  FULCRUM_SOURCE and each notebook's "Open in Colab" badge are derived from it;
- the minimum JAX version: pyproject.toml's `jax>=` dependency, the install cell's JAX_MIN;
- the install cell: notebooks/install_cell.py, each notebook's first code cell;
- the Colab runtime (TPU v5e-1, Python 3 kernel): RUNTIME below, each notebook's metadata.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
import uuid
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
INSTALL_CELL = NOTEBOOKS / "install_cell.py"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
RUNTIME = {
  "accelerator": "TPU",
  "colab": {"provenance": [], "gpuType": "V5E1"},
  "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
  "language_info": {"name": "python"},
}


def project() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def repository_url() -> str:
  return project()["urls"]["Repository"].removesuffix("/").removesuffix(".git")


def jax_minimum() -> str:
  for dep in project()["dependencies"]:
    if match := re.fullmatch(r"jax\s*>=\s*([\d.]+)", dep):
      return match.group(1)
  raise ValueError("pyproject.toml has no `jax>=` dependency")


def badge_cell_source(name: str) -> str:
  owner_repo = repository_url().removeprefix("https://github.com/")
  link = f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}"
  return f"[![Open In Colab]({BADGE})]({link})"


def install_cell_constants() -> dict[str, object]:
  """The install cell's module-level FULCRUM_SOURCE default and JAX_MIN, read without running it."""
  found = {}
  for node in ast.parse(INSTALL_CELL.read_text()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
      value = node.value
      if isinstance(value, ast.Call) and len(value.args) == 2:  # os.environ.get(NAME, default)
        value = value.args[1]
      if isinstance(value, ast.Constant):
        found[node.targets[0].id] = value.value
  return found


def problems() -> list[str]:
  """What differs from the owners; empty when everything is in step."""
  found = []
  constants = install_cell_constants()
  if constants.get("FULCRUM_SOURCE") != f"git+{repository_url()}":
    found.append(f"install_cell.py: FULCRUM_SOURCE default is not git+{repository_url()}")
  if constants.get("JAX_MIN") != jax_minimum():
    found.append(f"install_cell.py: JAX_MIN is not pyproject's jax>={jax_minimum()}")
  cell = INSTALL_CELL.read_text().rstrip("\n")
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    if not nb.cells or nb.cells[0].source != badge_cell_source(path.name):
      found.append(f"{path.name}: the first cell is not its Open in Colab badge")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or code[0].source != cell:
      found.append(f"{path.name}: the first code cell is not notebooks/install_cell.py")
    if any(nb.metadata.get(k) != v for k, v in RUNTIME.items()):
      found.append(f"{path.name}: the metadata is not the Colab TPU runtime")
  return found


def sync(path: Path) -> None:
  nb = nbformat.read(path, as_version=4)
  badge = badge_cell_source(path.name)
  if not nb.cells or "colab-badge" not in nb.cells[0].source:
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(badge, id=uuid.uuid4().hex[:8]))
  nb.cells[0].source = badge
  code = [c for c in nb.cells if c.cell_type == "code"]
  code[0].source = INSTALL_CELL.read_text().rstrip("\n")
  nb.metadata.update(RUNTIME)
  nbformat.write(nb, path)


def main(argv: list[str]) -> int:
  if "--check" not in argv:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
      sync(path)
  found = problems()
  print("\n".join(found) or "notebooks in step")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
