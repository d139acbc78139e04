"""Reads a package's source as a graph: who imports whom, and who reaches for private names.

Used by tests/test_house.py on `fulcrum`, and by its own tests on small packages written to a
temporary folder (so a checker that stopped finding anything would fail).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path


@dataclasses.dataclass
class Module:
  name: str  # Dotted, e.g. fulcrum.platform.workdir.
  path: Path
  is_package: bool  # An __init__.py.
  tree: ast.Module

  @property
  def folder(self) -> str:
    """The package folder this module's code lives in (a package's own name for __init__)."""
    return self.name if self.is_package else self.name.rpartition(".")[0]


def load_modules(root: Path, package: str) -> dict[str, Module]:
  """Every module of the package folder `root` (named `package`), parsed."""
  modules = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    dotted = ".".join((package, *(parts[:-1] if is_package else parts)))
    modules[dotted] = Module(dotted, path, is_package, ast.parse(path.read_text(), str(path)))
  return modules


def _absolute(module: Module, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.name if module.is_package else module.name.rpartition(".")[0]
  for _ in range(node.level - 1):
    base = base.rpartition(".")[0]
  return f"{base}.{node.module}" if node.module else base


def _existing(modules: dict[str, Module], dotted: str) -> str | None:
  """`dotted` if it is a module, else its longest prefix that is one."""
  while dotted and dotted not in modules:
    dotted = dotted.rpartition(".")[0]
  return dotted or None


def imports(modules: dict[str, Module], module: Module):
  """(target module, imported name or None, bound alias, line) for every import in `module`,
  at any depth (function-level imports included)."""
  for node in ast.walk(module.tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _existing(modules, alias.name)
        if target:
          yield target, None, alias.asname or alias.name.split(".")[0], node.lineno
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, node)
      for alias in node.names:
        bound = alias.asname or alias.name
        if f"{source}.{alias.name}" in modules:  # `from package import module`.
          yield f"{source}.{alias.name}", None, bound, node.lineno
        elif (target := _existing(modules, source)) is not None:
          yield target, alias.name, bound, node.lineno


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
  """module → the modules it imports (edges to itself dropped)."""
  graph = {name: set() for name in modules}
  for name, module in modules.items():
    for target, _, _, _ in imports(modules, module):
      if target != name:
        graph[name].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner_folder(modules: dict[str, Module], dotted: str) -> str | None:
  """The folder that owns the first private component of a module path, or None."""
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if _private(part):
      return ".".join(parts[:i])
  return None


def _inside(module: Module, folder: str) -> bool:
  return module.name == folder or module.name.startswith(folder + ".")


def private_uses(modules: dict[str, Module]) -> list[str]:
  """Where a module imports or reads another module's private name (`_x`: a function, class or
  constant is private to its module), or imports a private module (`pkg._bases`) from outside
  the package folder that holds it."""
  found = []
  for module in modules.values():
    aliases = {}  # Bound name → the fulcrum module it names.
    for target, name, bound, line in imports(modules, module):
      where = f"{module.path.name}:{line}"
      folder = _owner_folder(modules, target)
      if folder is not None and not _inside(module, folder):
        found.append(f"{module.name} imports private module {target} ({where})")
      if name is not None and _private(name):
        found.append(f"{module.name} imports {target}.{name} ({where})")
      if name is None:
        aliases[bound] = target
    for node in ast.walk(module.tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and _private(node.attr)
        and aliases[node.value.id] != module.name
      ):
        target = aliases[node.value.id]
        found.append(f"{module.name} reads {target}.{node.attr} ({module.path.name}:{node.lineno})")
  return found


def string_literals(module: Module):
  """(values, line) of every tuple/list/set literal made only of string constants."""
  for node in ast.walk(module.tree):
    if (
      isinstance(node, (ast.Tuple, ast.List, ast.Set))
      and node.elts
      and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
    ):
      yield tuple(e.value for e in node.elts), node.lineno
