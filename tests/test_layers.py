"""The package's layers point one way (docs/architecture.md#layers): read every module's imports (ast,
function-local ones included) and fail on an import that points up a layer or on a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megavod"

# Lowest first. A module belongs to the first entry that is its name or a prefix of it (by package).
LAYERS: list[tuple[str, ...]] = [
    ("megavod.errors", "megavod.atomic", "megavod.registry", "megavod.config_checks", "megavod.config", "megavod.structures",
     "megavod.checkpoint_files"),
    ("megavod.data",),
    ("megavod.models",),
    ("megavod.inference", "megavod.evaluation", "megavod.postprocess", "megavod.checkpoints", "megavod.export"),
    ("megavod.methods",),
    ("megavod.train",),
    ("megavod.api",),
    ("megavod.apps", "megavod.__main__", "megavod"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name != "megavod" and module.startswith(name + ".")):
                return index
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py")


def unit_of(module: str) -> str:
    """The folder (sub-package) a module belongs to, or the module itself at the package root."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


class Imports(ast.NodeVisitor):
    """The megavod modules a file imports, and the imports made inside functions."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.imports: list[tuple[str, int]] = []
        self.local: list[tuple[str, int]] = []
        self._depth = 0

    def _record(self, target: str, line: int) -> None:
        if self._depth:
            self.local.append((target, line))
        if target == "megavod" or target.startswith("megavod."):
            self.imports.append((target, line))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._record(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module if self.is_package else self.module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:  # `from megavod.x import y` may import the submodule megavod.x.y
            candidate = f"{base}.{alias.name}"
            self._record(candidate if _is_module(candidate) else base, node.lineno)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _scan() -> dict[str, Imports]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        visitor = Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        visitor.path = path
        out[module] = visitor
    return out


MODULES = _scan()


def _resolve(target: str) -> str:
    """The module an import names (``megavod.models.mega`` or a package's ``__init__``)."""
    while target and target not in MODULES:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_points_up_a_layer():
    wrong = []
    for module, visitor in MODULES.items():
        for target, line in visitor.imports:
            target = _resolve(target)
            if target and layer_of(target) > layer_of(module):
                wrong.append(f"{visitor.path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


@pytest.mark.parametrize("level", ["module", "folder"])
def test_no_import_cycles(level):
    key = (lambda m: m) if level == "module" else unit_of
    graph: dict[str, set[str]] = {}
    for module, visitor in MODULES.items():
        for target, _ in visitor.imports:
            target = _resolve(target)
            if target and key(target) != key(module):
                graph.setdefault(key(module), set()).add(key(target))
    assert _cycles(graph) == []


def test_function_local_imports_only_for_heavy_dependencies_and_commented():
    """megavod modules are imported at the top; a function-local import of a heavy dependency says why
    in a comment right above it."""
    wrong = []
    for module, visitor in MODULES.items():
        lines = visitor.path.read_text(encoding="utf-8").splitlines()
        for target, line in visitor.local:
            where = f"{visitor.path.relative_to(PACKAGE.parent)}:{line}"
            if target == "megavod" or target.startswith("megavod."):
                wrong.append(f"{where}: imports {target} inside a function")
                continue
            above = [text.strip() for text in lines[max(0, line - 5): line - 1]]
            if not any(text.startswith("#") for text in above):
                wrong.append(f"{where}: imports {target} inside a function without a comment saying why")
    assert not wrong, "\n".join(wrong)


def test_models_never_import_inference():
    """Models hold weights only: the stream (inference) owns the state and passes it in."""
    for module, visitor in MODULES.items():
        if module.startswith("megavod.models"):
            assert not [t for t, _ in visitor.imports if t.startswith("megavod.inference")], module


def test_export_computes_no_detector_maths():
    """``megavod/export`` holds graph boundaries, the exporter and the runtime: what the graphs compute is
    the models' own code, traced (docs/architecture.md#export-and-onnx-runtime). So no export module imports
    what a detector's maths is written with (torch.nn.functional, torchvision.ops, math), and none reaches
    a private name of another object (a model's, torch's or torchvision's internals)."""
    maths = ("torch.nn.functional", "torchvision.ops", "math")
    wrong = []
    for path in sorted((PACKAGE / "export").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            wrong += [f"{path.name}:{node.lineno}: imports {n}" for n in names
                      if any(n == m or n.startswith(m + ".") for m in maths)]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                wrong.append(f"{path.name}:{node.lineno}: reaches the private name {node.attr}")
    assert not wrong, "\n".join(wrong)
