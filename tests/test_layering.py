"""The package's imports run one way, with no circles (read from the source: every import statement, function-level
ones included, since a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "visionpeft"

# Lowest layer first; a module may import its own layer and the ones before it, never a later one.
LAYERS = [
    ("methods", ["visionpeft.methods"]),  # adapter maths: torch only
    ("core", ["visionpeft.version", "visionpeft.settings", "visionpeft.paths", "visionpeft.frozen_norm",
              "visionpeft.integrations", "visionpeft.keep_modes", "visionpeft.modules", "visionpeft.families",
              "visionpeft.inject", "visionpeft.data_init",
              "visionpeft.budget",
              "visionpeft.io", "visionpeft.fonts", "visionpeft.datasets", "visionpeft.class_offset",
              "visionpeft.vitdet", "visionpeft.models", "visionpeft.yolo_model", "visionpeft"]),
    ("edge", ["visionpeft.edge"]),  # the device side: numpy and onnx, nothing of visionpeft's
    ("train", ["visionpeft.train"]),
    ("export", ["visionpeft.export"]),
    ("bench", ["visionpeft.bench"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``visionpeft`` module or package that ``path`` imports (relative imports resolved)."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "visionpeft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "visionpeft":
                target = node.module
            else:
                continue
            out |= {f"{target}.{a.name}" if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                    or (ROOT.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists() else target
                    for a in node.names}
    out.discard(name)
    return out


GRAPH = {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: add it"
    return best[0]


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH:
                continue
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            visit(m)


def test_imports_run_one_way():
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
             for m, deps in GRAPH.items() for d in deps if d in GRAPH and layer_of(d) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["visionpeft.methods", "visionpeft.edge.apply", "visionpeft.integrations"])
def test_leaves_import_nothing_else_of_visionpeft(module):
    """Adapter maths and the device applier import nothing of the rest; the Ultralytics boundary imports nothing of
    visionpeft, so every layer may use it."""
    def inside(name: str) -> bool:
        return name == module or name.startswith(module + ".")

    for m, deps in GRAPH.items():
        if inside(m):
            assert all(inside(d) for d in deps), f"{m} imports {sorted(d for d in deps if not inside(d))}"


def test_methods_do_not_import_ultralytics():
    for path in (ROOT / "methods").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(x.split(".")[0] in {"ultralytics", "timm"} for x in names), path
