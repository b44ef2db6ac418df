"""bigft's modules import one another without cycles.

Every import counts: at module level, inside functions (imported lazily, still a
dependency) and under TYPE_CHECKING (a cycle for the reader and the type checker).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bigft"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that `module` (in `path`) imports, anywhere in the file.

    `from a.b import c` imports the module a.b.c when there is one, else the names
    of a.b; relative imports are resolved against `module`'s package.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    yield target
                elif base in known:
                    yield base


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)
    known = set(modules)
    return {
        name: {dep for dep in imported(name, path, known) if dep != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete loop through `component`, from its first module back to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for dep in sorted(graph[node] & members):
            if dep == start:
                return [*paths[node], start]
            if dep not in paths:
                paths[dep] = [*paths[node], dep]
                queue.append(dep)
    return component


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [" -> ".join(cycle_path(graph, c)) for c in cycles(graph)]
    assert not found, "import cycles among bigft's modules:\n" + "\n".join(found)


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Lazy, TYPE_CHECKING, relative and `from package import module` imports all count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\nVALUE = 1\n"
    )
    (pkg / "top.py").write_text("def f():\n    from .sub import leaf\n    import pkg.other\n")
    (pkg / "other.py").write_text("from pkg.sub import VALUE\n")
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.sub.leaf", "pkg.other"},
        "pkg.other": {"pkg.sub"},
    }
    assert cycles(graph) == [["pkg.other", "pkg.sub", "pkg.sub.leaf", "pkg.top"]]
    path = cycle_path(graph, cycles(graph)[0])
    assert path[0] == path[-1] == "pkg.other" and len(path) == 5


# The layers, lowest first, as README's module map shows them: a module may import its own
# layer and the ones below it. plan.hardware (the GPU catalogue) is data the schema checks.
LAYERS = (
    ("bigft", "bigft._compat", "bigft.errors", "bigft.plan.hardware", "bigft.config"),
    (
        "bigft.config_yaml",
        "bigft.config_io",
        "bigft.tracking",
        "bigft.losses",
        "bigft.contrastive",
        "bigft.preference_losses",
        "bigft.chunked_loss",
    ),
    ("bigft.engine", "bigft.model", "bigft.data", "bigft.optim", "bigft.rundir", "bigft.faults"),
    (
        "bigft.plan",
        "bigft.tiny",
        "bigft.tiny_clip",
        "bigft.digits",
        "bigft.loop",
        "bigft.eval",
        "bigft.slurm",
        "bigft.report",
    ),
    ("bigft.commands", "bigft.demo", "bigft.__main__"),
)


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module` or its package."""
    best = (-1, -1)
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best[1]:
                best = (i, len(name))
    assert best[0] >= 0, f"{module} is in no layer of LAYERS: add it"
    return best[0]


def test_no_module_imports_a_layer_above_it() -> None:
    """Commands sit on the library and the library never imports them; the loop, eval,
    slurm and report sit on the engines, the model and the data, never the other way."""
    graph = import_graph()
    upward = [
        f"{module} -> {dep}"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer(dep) > layer(module)
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_modules_stay_readable_in_one_sitting() -> None:
    """Files of at most 400 lines; config.py is the schema with its field docs."""
    long = {
        name: n
        for name, path in module_names().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400
        and name != "bigft.config"
    }
    assert not long, f"modules over 400 lines: {long}"
