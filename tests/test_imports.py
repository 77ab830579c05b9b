"""factorlab's modules import each other as a DAG: no cycle, not even one hidden by a function-level
import. Checked on the source (ast), so the test is fast and names the cycle it finds."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "factorlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def resolve(node: ast.AST, current: str, is_package: bool) -> list[str]:
    """The factorlab modules an import statement runs: the module and the package __init__s on the
    way, except the root package's (it only re-exports) and packages the importer lives in (they
    started importing before it)."""
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
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            module = ".".join(parts[:i])
            # a package the importing module lives in has started importing before it: no edge
            if is_module(module) and not (current + ".").startswith(module + ".") and module != current:
                out.append(module)
    return out


def type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name = module_name(path)
        edges = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if type_checking_block(node):
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):  # top-level and function-level imports alike
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                edges |= {t for t in resolve(node, name, path.name == "__init__.py") if t != name}
    return graph


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


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


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
