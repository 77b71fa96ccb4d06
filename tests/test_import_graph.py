"""The layering of calibjax, checked on its import graph.

Two layers: the run layer (`calibjax.main`, the package `calibjax.runs` with one module per method, and
`calibjax.build`, which prepares data, networks and optimisers and restores finished runs for runs/) and the
libraries (every other module). Libraries never import the run layer, so each can be used, tested and reasoned
about without the command line; calibration in particular stays below training, distillation and knowledge
distillation, which use it. Import cycles are forbidden between modules (they make import order matter and hide
which module depends on which) and between library packages (a package must be usable without its dependants).

The graph is read from the source with `ast`, without importing calibjax: an import would execute JAX and only see
the imports run at module level, whereas imports inside functions, `importlib.import_module("calibjax....")` calls
and "calibjax.module:function" strings (dispatch tables such as main.METHODS) are dependencies as well. Relative
imports are resolved, and `from package import name` is an edge to the submodule `package.name` where one exists,
otherwise to `package` (its __init__). Only edges between calibjax modules are kept; a module naming itself is
not an edge.
"""

import ast
import collections
import dataclasses
from pathlib import Path
import re

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "calibjax"
RUN_LAYER = ("calibjax.main", "calibjax.runs", "calibjax.build")
ABOVE_CALIBRATION = ("calibjax.train", "calibjax.distill", "calibjax.kd") + RUN_LAYER
DISPATCH_STRING = re.compile(r"(calibjax(?:\.\w+)*):\w+")


@dataclasses.dataclass(frozen=True, order=True)
class Edge:
  importer: str
  imported: str
  file: str
  line: int

  def __str__(self):
    return f"{self.importer} -> {self.imported} ({self.file}:{self.line})"


def in_package(module: str, package: str) -> bool:
  """Whether `module` is `package` or lies inside it (calibjax.train.run is in calibjax.train; .trainer is not)."""
  return module == package or module.startswith(package + ".")


def in_any(module: str, packages) -> bool:
  return any(in_package(module, package) for package in packages)


def module_files(package_root: Path) -> dict[str, Path]:
  """Dotted module name -> source file, for every .py file under `package_root` (a package is its __init__)."""
  modules = {}
  for path in sorted(package_root.rglob("*.py")):
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def imported_names(tree: ast.AST, importer: str, is_package: bool, modules) -> list[tuple[str, int]]:
  """(imported module, line) for every import in `tree`, static or dynamic, at any depth of the code."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = from_import_base(node, importer, is_package)
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.append((submodule if submodule in modules else base, node.lineno))
    elif isinstance(node, ast.Call) and is_import_module(node.func) and node.args:
      name = node.args[0]
      if isinstance(name, ast.Constant) and isinstance(name.value, str):
        found.append((name.value, node.lineno))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      dispatch = DISPATCH_STRING.fullmatch(node.value)
      if dispatch:
        found.append((dispatch.group(1), node.lineno))
  return found


def from_import_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
  """The absolute module of `from <module> import ...`, relative forms (`from ..x import y`) resolved."""
  if node.level == 0:
    return node.module
  package = importer.split(".") if is_package else importer.split(".")[:-1]
  base = package[:len(package) - (node.level - 1)]
  return ".".join(base + [node.module] if node.module else base)


def is_import_module(function: ast.expr) -> bool:
  """`importlib.import_module` or a bare `import_module` (from importlib import import_module)."""
  if isinstance(function, ast.Attribute):
    return function.attr == "import_module"
  return isinstance(function, ast.Name) and function.id == "import_module"


def import_edges(package_root: Path) -> list[Edge]:
  """Every import of a calibjax module by a calibjax module under `package_root`, sorted."""
  modules = module_files(package_root)
  edges = set()
  for importer, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    file = path.relative_to(package_root.parent).as_posix()
    for imported, line in imported_names(tree, importer, path.name == "__init__.py", modules):
      if in_package(imported, "calibjax") and imported != importer:
        edges.add(Edge(importer, imported, file, line))
  return sorted(edges)


def graph_of(edges, node_of=lambda module: module) -> dict[str, dict[str, list[Edge]]]:
  """node -> successor -> the module edges behind that arc; `node_of` maps a module to its node."""
  graph = collections.defaultdict(lambda: collections.defaultdict(list))
  for edge in edges:
    source, target = node_of(edge.importer), node_of(edge.imported)
    if source != target:
      graph[source][target].append(edge)
  return graph


def strongly_connected_components(graph) -> list[list[str]]:
  """Tarjan's algorithm; the nodes of each component sorted, components in the order they close."""
  index, lowlink, on_stack, stack, components = {}, {}, set(), [], []

  def visit(node):
    index[node] = lowlink[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in sorted(graph.get(node, ())):
      if successor not in index:
        visit(successor)
        lowlink[node] = min(lowlink[node], lowlink[successor])
      elif successor in on_stack:
        lowlink[node] = min(lowlink[node], index[successor])
    if lowlink[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def shortest_cycle(graph, component: list[str]) -> list[str]:
  """A shortest cycle through the first node of a strongly connected component of two or more nodes."""
  start, members = component[0], set(component)
  predecessor, queue = {start: None}, collections.deque([start])
  while queue:
    node = queue.popleft()
    for successor in sorted(graph[node]):
      if successor == start:
        path = [node]
        while predecessor[path[-1]] is not None:
          path.append(predecessor[path[-1]])
        return path[::-1] + [start]
      if successor in members and successor not in predecessor:
        predecessor[successor] = node
        queue.append(successor)
  raise AssertionError(f"no cycle through {start}: {component} is not strongly connected")


def cycle_report(graph) -> list[str]:
  """For each group of nodes caught in cycles: one cycle through them, then every import between its members."""
  report = []
  for component in strongly_connected_components(graph):
    if len(component) > 1:
      report.append(f"cycle: {' -> '.join(shortest_cycle(graph, component))}; imports among {', '.join(component)}:")
      report += [f"  {edge}" for source in component for target in component
                 for edge in graph[source].get(target, ())]
  return report


def library_package(module: str) -> str:
  """calibjax.distill.gm -> distill; a top-level module stays itself (calibjax.errors -> errors)."""
  return module.split(".")[1] if "." in module else module


@pytest.fixture(scope="module")
def edges():
  return import_edges(PACKAGE_ROOT)


def test_no_library_module_imports_the_run_layer(edges):
  offending = [edge for edge in edges if not in_any(edge.importer, RUN_LAYER) and in_any(edge.imported, RUN_LAYER)]
  assert not offending, "library modules import the run layer:\n" + "\n".join(map(str, offending))


def test_calibration_imports_no_training_distillation_or_run_layer(edges):
  offending = [edge for edge in edges
               if in_package(edge.importer, "calibjax.calibration") and in_any(edge.imported, ABOVE_CALIBRATION)]
  assert not offending, "calibration imports modules above it:\n" + "\n".join(map(str, offending))


def test_module_import_graph_has_no_cycle(edges):
  report = cycle_report(graph_of(edges))
  assert not report, "import cycles between modules:\n" + "\n".join(report)


def test_library_package_graph_has_no_cycle(edges):
  library_edges = [edge for edge in edges if not in_any(edge.importer, RUN_LAYER)
                   and not in_any(edge.imported, RUN_LAYER)]
  report = cycle_report(graph_of(library_edges, node_of=library_package))
  assert not report, "import cycles between library packages:\n" + "\n".join(report)


def test_parser_finds_known_edges_of_the_package(edges):
  assert len({(edge.importer, edge.imported) for edge in edges}) > 50
  assert any(edge.importer == "calibjax.main" and edge.imported == "calibjax.errors" for edge in edges)


def test_parser_resolves_every_import_form(tmp_path):
  sources = {
      "__init__.py": "",
      "errors.py": "",
      "main.py": 'import os\n\nMETHODS = {"load": "calibjax.a.c:load"}\n',
      "a/__init__.py": "from . import b\n",
      "a/b.py": "from ..errors import Error\nfrom calibjax.a import c, NAME\n",
      "a/c.py": ("import importlib\n\n\ndef load():\n  import calibjax.errors\n"
                 "  return importlib.import_module('calibjax.a.b')\n"),
  }
  for name, source in sources.items():
    (tmp_path / "calibjax" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "calibjax" / name).write_text(source)
  assert [str(edge) for edge in import_edges(tmp_path / "calibjax")] == [
      "calibjax.a -> calibjax.a.b (calibjax/a/__init__.py:1)",  # relative, to a submodule
      "calibjax.a.b -> calibjax.a (calibjax/a/b.py:2)",  # a name defined in the package's __init__
      "calibjax.a.b -> calibjax.a.c (calibjax/a/b.py:2)",  # a submodule imported from its package
      "calibjax.a.b -> calibjax.errors (calibjax/a/b.py:1)",  # relative, two levels
      "calibjax.a.c -> calibjax.a.b (calibjax/a/c.py:6)",  # importlib.import_module
      "calibjax.a.c -> calibjax.errors (calibjax/a/c.py:5)",  # inside a function
      "calibjax.main -> calibjax.a.c (calibjax/main.py:3)",  # dispatch string
  ]
