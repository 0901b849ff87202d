"""An import-linter contract type: no private name imported across packages.

``udd_jax.a.b`` may use ``udd_jax.a._helper``; ``udd_jax.c`` may not (``_helper`` is
``udd_jax.a``'s to change). Modules named in ``allowed`` (the shared base modules, e.g.
``udd_jax._validation``) may be imported from anywhere. Configured in pyproject.toml,
run by ``lint-imports`` in ``.ci/run`` (with ``.ci`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

from importlinter import Contract, ContractCheck, fields, output


def _package(module: str, root: str) -> str:
  """The first-level package (or module) of ``module`` below ``root``: udd_jax.a.b -> udd_jax.a."""
  parts = module.split(".")
  return ".".join(parts[: len(root.split(".")) + 1])


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


class NoPrivateImportsContract(Contract):
  """Fails on ``from udd_jax.a import _x`` or ``import udd_jax.a._m`` from outside ``udd_jax.a``."""

  root = fields.StringField()
  allowed = fields.ListField(subfield=fields.StringField(), required=False)

  def _source(self, module: str) -> pathlib.Path | None:
    """The module's file, found from the root package's directory without importing anything."""
    root = importlib.util.find_spec(str(self.root))  # a top-level spec: nothing is executed
    base = pathlib.Path(root.submodule_search_locations[0]).joinpath(*module.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
      if path.is_file():
        return path
    return None

  def _imports(self, module: str):
    path = self._source(module)
    if path is None:
      return
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the importer
          parts = module.split(".") if is_package else module.split(".")[:-1]
          parts = parts[: len(parts) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        for alias in node.names:
          yield node.lineno, base, alias.name
      elif isinstance(node, ast.Import):
        for alias in node.names:
          yield node.lineno, alias.name, None

  def check(self, graph, verbose: bool) -> ContractCheck:
    root, allowed = str(self.root), {str(a) for a in (self.allowed or [])}
    violations = []
    for module in sorted(graph.modules):
      if module != root and not module.startswith(root + "."):
        continue
      for line, base, name in self._imports(module):
        if base != root and not base.startswith(root + "."):
          continue
        target = f"{base}.{name}" if name is not None else base
        private = [p for p in target.split(".") if _private(p)]
        if not private or target in allowed or base in allowed:
          continue
        # The private part's owner: the module path up to (not including) the first private part.
        owner = target.split("." + private[0])[0]
        if not (module == owner or module.startswith(owner + ".")):
          violations.append(f"{module}:{line} imports {target}, private to {owner}")
    return ContractCheck(kept=not violations, metadata={"violations": violations})

  def render_broken_contract(self, check: ContractCheck) -> None:
    for violation in check.metadata["violations"]:
      output.print_error(violation)
      output.new_line()
