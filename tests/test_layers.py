"""Imports flow one way: API -> algorithms -> engine -> library -> ops/kernels, with no cycle.

Layers, top to bottom (a module may import from its own layer or any layer below it):

0. API           ``fastmeta.train``, ``fastmeta.integrations``, ``fastmeta.step``, ``fastmeta.__main__``
1. algorithms    ``fastmeta.algorithms``
2. engine        ``fastmeta.engine``
3. library       ``fastmeta.hessian``, ``fastmeta.functional``, ``fastmeta.batching``, ``fastmeta.losses``
4. ops/kernels   ``fastmeta.ops``, ``fastmeta.kernels``, ``fastmeta._extension``, ``fastmeta._kd_ops``,
                 ``fastmeta._validation`` and the dependency-free utilities ``fastmeta.amp``,
                 ``fastmeta.checkpoint``, ``fastmeta.data``, ``fastmeta.backends``

Two checks:

* static (every file, every ``import`` statement, module level AND inside functions: a
  lazy import only hides an upward edge): no import goes to a higher layer, and the
  module graph has no cycle;
* at run time, in a fresh interpreter per unit: importing it loads no module of a higher
  layer (and ``import fastmeta`` loads nothing but the kernels package it mounts).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS = [
    ("API", ("fastmeta.train", "fastmeta.integrations", "fastmeta.step", "fastmeta.__main__")),
    ("algorithms", ("fastmeta.algorithms",)),
    ("engine", ("fastmeta.engine",)),
    ("library", ("fastmeta.hessian", "fastmeta.functional", "fastmeta.batching", "fastmeta.losses")),
    ("ops/kernels", ("fastmeta.ops", "fastmeta.kernels", "fastmeta._extension", "fastmeta._kd_ops",
                     "fastmeta._validation", "fastmeta.amp", "fastmeta.checkpoint", "fastmeta.data",
                     "fastmeta.backends")),
]

# Known upward edges that another change removes (each case xfails, non-strict, until then).
# fastmeta.ops.precondition's lazy `from fastmeta.engine import optimizer` is gone (fastmeta/ops/
# package: it reads the optimizer with fastmeta.ops.torch_optim), so there is none left.
KNOWN_UPWARD: dict = {}


def layer_of(module: str):
    """``(index, name)`` of ``module``'s layer (0 = top), or None for unlayered modules (the ``fastmeta`` root)."""
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index, name
    return None


def _source_modules() -> dict:
    """``{module name: path}`` for every Python file of the package (``kernels/`` mounted as ``fastmeta.kernels``)."""
    modules = {}
    for base, package in ((ROOT / "fastmeta", "fastmeta"), (ROOT / "kernels", "fastmeta.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


MODULES = _source_modules()


def _imports(module: str, path: Path):
    """``(imported fastmeta module, line, inside a function)`` for every import statement of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "fastmeta" or alias.name.startswith("fastmeta."):
                        found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source == "fastmeta" or source.startswith("fastmeta."):
                    for alias in child.names:
                        target = f"{source}.{alias.name}"
                        found.append((target if target in MODULES else source, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return [(target, line, lazy) for target, line, lazy in found if target != "fastmeta"]


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _static_cases():
    cases = []
    for module in sorted(MODULES):
        if layer_of(module) is None:
            continue  # the lazy fastmeta root (see test_import_fastmeta_is_cheap)
        marks = []
        for prefix, reason in KNOWN_UPWARD.items():
            if module == prefix or module.startswith(prefix + "."):
                marks.append(pytest.mark.xfail(reason=f"known upward import, being removed: {reason}", strict=False))
        cases.append(pytest.param(module, marks=marks, id=module))
    return cases


@pytest.mark.parametrize("module", _static_cases())
def test_no_upward_import(module):
    """No import statement of ``module`` (lazy ones included) reaches a higher layer."""
    own = layer_of(module)
    bad = []
    for target, line, lazy in GRAPH[module]:
        other = layer_of(target)
        if other is not None and other[0] < own[0]:
            where = "inside a function" if lazy else "at module level"
            bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} {where}: "
                       f"layer {own[1]!r} must not import from the higher layer {other[1]!r}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    """The module graph (every import statement, lazy ones included) is acyclic."""
    edges = {module: sorted({t for t, _, _ in targets if t in MODULES and t != module})
             for module, targets in GRAPH.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


RUNTIME_UNITS = [
    "fastmeta._validation", "fastmeta._kd_ops", "fastmeta.ops", "fastmeta.kernels",
    "fastmeta.losses", "fastmeta.batching", "fastmeta.functional", "fastmeta.hessian",
    "fastmeta.engine", "fastmeta.algorithms", "fastmeta.step", "fastmeta.integrations", "fastmeta.train",
]

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "fastmeta" or m.startswith("fastmeta."))))
"""


def _loaded_after_import(module: str) -> list:
    out = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", RUNTIME_UNITS)
def test_import_loads_no_higher_layer(module):
    """A fresh ``import module`` loads no module of a higher layer."""
    own = layer_of(module)
    loaded = _loaded_after_import(module)
    higher = [m for m in loaded if layer_of(m) is not None and layer_of(m)[0] < own[0]]
    assert not higher, f"import {module} (layer {own[1]!r}) loaded higher-layer modules {higher}"


def test_import_fastmeta_is_cheap():
    """``import fastmeta`` loads nothing but the kernels package it mounts (public names load lazily)."""
    loaded = _loaded_after_import("fastmeta")
    assert [m for m in loaded if m != "fastmeta" and not m.startswith("fastmeta.kernels")] == []


def test_step_output_lives_in_the_algorithms_layer():
    from fastmeta import StepOutput
    from fastmeta.algorithms.output import StepOutput as defined
    from fastmeta.step import StepOutput as reexported

    assert StepOutput is defined is reexported
