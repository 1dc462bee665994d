"""The package's shape: no import cycles, small modules, layers that use only the interface.

The import graph is read statically (``ast``) from every module under ``src/marglik``: each
``import`` / ``from ... import`` outside ``if TYPE_CHECKING:`` blocks, at module level or inside
functions (a lazy import is still a dependency). Importing ``marglik.a.b`` also runs the
``__init__`` of ``marglik.a``, so that package counts as a dependency too, unless the importing
module lives inside it (its package is then already being imported).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "marglik"
MAX_LINES = 450  # "no file over ~400 lines"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def runtime_imports(path: Path) -> set[str]:
    """Absolute marglik modules imported by ``path`` at run time."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if is_package(path) else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            for alias in node.names:  # "from marglik.x import y" may import the submodule y
                found.add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m == "marglik" or m.startswith("marglik.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for target in runtime_imports(path):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages above it
                mod = ".".join(parts[:i])
                if mod in files and not (name == mod or name.startswith(mod + ".")):
                    deps.add(mod)
        edges[name] = deps - {name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = dfs(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_there_is_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("marglik.layers", "marglik.likelihoods"),
        ("marglik.layers", "marglik.curvature"),
        ("marglik.layers", "marglik.training"),
        ("marglik.likelihoods", "marglik.curvature"),
        ("marglik.curvature", "marglik.posterior"),
        ("marglik.structures", "marglik.posterior"),
        ("marglik.predictive", "marglik.posterior"),
        ("marglik.evidence", "marglik.posterior"),
        ("marglik.posterior", "marglik.training"),
        ("marglik.training", "marglik.applications"),
        ("marglik.applications", "marglik.cli"),
        ("marglik.variational", "marglik.applications"),
        ("marglik.variational", "marglik.training"),
        ("marglik.variational", "marglik.cli"),
    ],
)
def test_lower_layers_do_not_import_higher_ones(lower, upper):
    """The pipeline: layers (models' building blocks, torch and marglik.nets only) → likelihoods
    → curvature → structures → posterior → predictive / evidence
    → training → applications → CLI. Posteriors may call the predictive and the evidence
    optimiser (they are written against the interface and never import a posterior)."""
    edges = graph()
    offenders = sorted(
        f"{name} -> {dep}"
        for name, deps in edges.items()
        if name == lower or name.startswith(lower + ".")
        for dep in deps
        if dep == upper or dep.startswith(upper + ".")
    )
    assert not offenders


def test_layers_import_only_torch_and_nets():
    """The layers package sits at the bottom: nothing of marglik but itself and marglik.nets."""
    edges = graph()
    offenders = sorted(
        f"{name} -> {dep}"
        for name, deps in edges.items()
        if name == "marglik.layers" or name.startswith("marglik.layers.")
        for dep in deps
        if not (dep == "marglik.nets" or dep.startswith("marglik.layers"))
    )
    assert not offenders


def test_modules_stay_small():
    long = {module_name(p): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_predictive_evidence_and_training_use_no_private_posterior_members():
    """Written against the interface: no ``la._x`` / ``posterior._x`` from outside a posterior."""
    offenders = []
    for folder in ("predictive", "evidence", "training"):
        for path in (SRC / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__")
                        and isinstance(node.value, ast.Name)
                        and node.value.id in ("la", "posterior", "post")):
                    offenders.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders
