"""The package's layers: no module imports one above it, at module level or inside a function, and no import circle.

Every ``import`` statement in ``src/epsdpo`` is read from the source (deferred ones included, not only what Python
executes at import time), so a circle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: the layers from the bottom up; a module may import from its own layer or one below (longest prefix decides)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "utilities",
        (
            "epsdpo.errors",
            "epsdpo.config",
            "epsdpo.files",
            "epsdpo.runlock",
            "epsdpo.machine",
            "epsdpo.distributed",
            "epsdpo.assets",
        ),
    ),
    ("data and rewards", ("epsdpo.data", "epsdpo.rewards")),  # imports nothing of the algorithm
    ("the algorithm", ("epsdpo.losses", "epsdpo.stats", "epsdpo.control", "epsdpo.logps", "epsdpo")),
    ("models and sampling", ("epsdpo.models", "epsdpo.sampling", "epsdpo.eval_config")),
    ("training", ("epsdpo.training",)),
    ("run directories", ("epsdpo.rundir",)),
    ("stages", ("epsdpo.stages",)),
    ("recipes", ("epsdpo.recipes",)),
    ("integrations", ("epsdpo.integrations",)),
    ("command line", ("epsdpo.cli",)),
)

#: modules whose function-level imports of epsdpo modules are deliberate: the verbs keep torch and transformers out
#: of `epsdpo --help`; the vocabulary kernels import the Triton kernel only when Triton (optional) is installed
DEFERRED_ALLOWED = ("epsdpo.cli", "epsdpo.logps.vocab")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    deferred: bool


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under ``root/epsdpo`` and every import of an epsdpo module in it, resolved to modules:
    ``from epsdpo.x import y`` imports ``epsdpo.x.y`` when that is a module, else ``epsdpo.x``."""
    files = sorted((root / "epsdpo").rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    found: list[Import] = []
    for f in files:
        name = module_name(f, root)
        tree = ast.parse(f.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
            for target in targets:
                if target == "epsdpo" or target.startswith("epsdpo."):
                    found.append(Import(name, target, node.lineno, id(node) not in top_level))
    return modules, found


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == "epsdpo"  # the package's own __init__, not everything below it
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best:
                    best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS in tests/test_layers.py")
    return rank


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module, or a module importing itself)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.imported in graph:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(root: Path) -> list[str]:
    modules, imports = all_imports(root)
    found = []
    for imp in imports:
        if layer_of(imp.imported) > layer_of(imp.importer):
            where = "inside a function" if imp.deferred else "at module level"
            found.append(
                f"{imp.importer} (line {imp.line}, {where}) imports {imp.imported}: "
                f"layer '{LAYERS[layer_of(imp.imported)][0]}' is above '{LAYERS[layer_of(imp.importer)][0]}'"
            )
        elif imp.deferred and not any(imp.importer == p or imp.importer.startswith(p + ".") for p in DEFERRED_ALLOWED):
            found.append(f"{imp.importer} (line {imp.line}) imports {imp.imported} inside a function")
    found += [f"import circle: {' → '.join(c)}" for c in cycles(modules, imports)]
    return found


def test_no_upward_import_no_circle_no_deferred_internal_import():
    assert problems(SRC) == []


def test_every_module_is_in_a_layer():
    modules, _ = all_imports(SRC)
    for module in modules:
        layer_of(module)  # raises for a module no layer names


def test_a_planted_upward_import_is_found(tmp_path):
    shutil.copytree(SRC / "epsdpo", tmp_path / "epsdpo")
    losses = tmp_path / "epsdpo" / "losses.py"
    losses.write_text(
        losses.read_text(encoding="utf-8") + "\n\ndef _planted():\n    from epsdpo.recipes.train import train\n",
        encoding="utf-8",
    )
    found = problems(tmp_path)
    assert any("epsdpo.losses" in p and "imports epsdpo.recipes.train" in p for p in found), found


def test_a_planted_circle_is_found(tmp_path):
    shutil.copytree(SRC / "epsdpo", tmp_path / "epsdpo")
    stages = tmp_path / "epsdpo" / "stages"
    (stages / "generate.py").write_text(
        (stages / "generate.py").read_text(encoding="utf-8") + "\nfrom epsdpo.stages import plots  # noqa\n",
        encoding="utf-8",
    )
    (stages / "plots.py").write_text(
        (stages / "plots.py").read_text(encoding="utf-8") + "\nfrom epsdpo.stages import generate  # noqa\n",
        encoding="utf-8",
    )
    assert "import circle: epsdpo.stages.generate → epsdpo.stages.plots" in problems(tmp_path)
