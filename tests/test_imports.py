"""factorlab's modules import each other in the layer order the README's Layout section writes down, so
the import graph is a DAG with no exemption: function-level imports, ``TYPE_CHECKING`` blocks and
explicit imports of the package root all count. Checked on the source (ast): fast, and the failure
names the edge."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "factorlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def resolve(node: ast.AST, current: str, is_package: bool) -> list[str]:
    """The factorlab modules an import statement runs: the module, the package __init__s on the way
    (except packages the importer lives in: they started importing before it), and the root package
    when the statement names it (``import factorlab``, ``from factorlab import x`` for an attribute).
    The root's own __init__, which Python runs before any submodule, is not an edge."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = current.split(".") if is_package else current.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        targets = [f"{module}.{a.name}" if is_module(f"{module}.{a.name}") else module for a in node.names]
    out = []
    for target in targets:
        if target == PACKAGE and current != PACKAGE:
            out.append(PACKAGE)
            continue
        if not target.startswith(PACKAGE + "."):
            continue
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            module = ".".join(parts[:i])
            if is_module(module) and not (current + ".").startswith(module + ".") and module != current:
                out.append(module)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name = module_name(path)
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):  # every import, wherever it stands
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= {t for t in resolve(node, name, path.name == "__init__.py") if t != name}
    return graph


def layers() -> dict[str, int]:
    """The README's layer table: top-level name (``core``, ``layers``, ``factorlab`` for the root) ->
    layer number."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- layers -->") : text.index("<!-- end layers -->")]
    table = {}
    for number, names in re.findall(r"^(\d+): (.+)$", block, re.M):
        for name in names.split():
            table[name] = int(number)
    return table


def layer_of(module: str, table: dict[str, int]) -> int:
    parts = module.split(".")
    key = PACKAGE if len(parts) == 1 else parts[1]
    assert key in table, f"{module} is in no layer of the README's Layout section; add {key!r} there"
    return table[key]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_import_follows_the_layer_order():
    table = layers()
    graph = import_graph()
    wrong = [
        f"{module} (layer {layer_of(module, table)}) imports {target} (layer {layer_of(target, table)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target, table) > layer_of(module, table)
    ]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_type_checking_and_root_imports(tmp_path):
    """The three kinds of import the old checker skipped are edges now."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from factorlab.recipes.inject import InjectConfig\n"
        "def f():\n    import factorlab\n    from factorlab.cli import app\n"
    )
    edges = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for t in resolve(node, "factorlab.core.adapted", False)}  # fmt: skip
    assert {"factorlab.recipes.inject", "factorlab", "factorlab.cli"} <= edges


def test_every_module_imports_first():
    """Each module imported first, into a fresh set of factorlab modules (torch and transformers stay
    loaded, for speed): no module works only because another was imported before it."""
    import subprocess
    import sys

    modules = [m for m in sorted(import_graph()) if not m.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for key in [k for k in sys.modules if k == 'factorlab' or k.startswith('factorlab.')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
