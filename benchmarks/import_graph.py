"""The package's import graph: cycles, wrong-way arrows and the largest functions (stdlib only).

    python benchmarks/import_graph.py [PACKAGE_DIR]     # default: llmrec_dist next to this folder

Every ``import`` counts, including those inside functions (a deferred import is still an arrow). A module
sits on the floor of the longest entry in FLOORS that prefixes its name; an arrow is wrong-way when a
module imports one from a higher floor. Arrows within a floor are allowed, cycles are not. The floors are
documented in docs/architecture.md; tests/test_architecture.py keeps the current tree at zero of both.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

# Lowest floor first. A module may import its own floor and those below it, never one above.
# Names are module paths under the package; the longest matching prefix wins. The names in LEGACY are
# where modules lived before issue 22's moves, so the script also reads an older tree.
FLOORS: list[tuple[str, list[str]]] = [
    ("foundation", ["config", "storage", "console", "batching", "metrics", "tracking", "ray_setup",
                    "profiling", "fairness", "privacy", "data.errors", ""]),  # "": the package itself (__version__)
    ("dataset format", ["data.dataset_format"]),
    ("prepare", ["data"]),
    ("model", ["item_encoder", "model", "text_tower", "evaluation", "pairs", "pointwise", "cross_encoder", "rerank", "sharding",
               "diversity", "explain"]),
    ("saved model", ["saved_model"]),
    ("per-worker training", ["worker"]),
    ("registry", ["registry"]),
    ("driver", ["train", "offline_eval", "sweep", "quickstart", "faults", "serving", "fairness_report"]),
    ("entry points", ["cli", "bench"]),
]
LEGACY = {"data.layout": "dataset format", "model_io": "saved model", "train.recipe": "per-worker training",
          "train.checkpoint": "per-worker training", "train.optim": "per-worker training",
          "train.profiling": "per-worker training"}
for _module, _floor in LEGACY.items():
    next(prefixes for name, prefixes in FLOORS if name == _floor).append(_module)


def module_names(package: Path) -> dict[str, Path]:
    """Dotted names (without the package prefix) of every module under ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, package: str, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([package, *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # "from pkg.sub import mod" imports the module pkg.sub.mod when there is one.
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            targets = [t for t in targets if t.removeprefix(package + ".") in known] or [module]
            if any(t != module for t in targets):
                targets = [t for t in targets if t != module]
        for target in targets:
            if target == package or not target.startswith(package + "."):
                continue
            short = target.removeprefix(package + ".")
            while short and short not in known:
                short = short.rpartition(".")[0]
            if short and short != name:
                found.add(short)
    return found


def floor_of(name: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise SystemExit(f"module {name!r} is on no floor: add it to FLOORS in {__file__}")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(result)


def wrong_way(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor_of(a) < floor_of(b))


def largest_functions(names: dict[str, Path], top: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for name, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual, up = [node.name], parents.get(node)
                while up is not None:
                    if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        qual.insert(0, up.name)
                    up = parents.get(up)
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}:{'.'.join(qual)}"))
    return sorted(sizes, key=lambda s: (-s[0], s[1]))[:top]


def graph_of(package: Path) -> tuple[dict[str, set[str]], dict[str, Path]]:
    names = module_names(package)
    graph = {name: imports_of(name, path, package.name, set(names)) for name, path in names.items()}
    return graph, names


def main(argv: list[str]) -> int:
    package = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "llmrec_dist"
    graph, names = graph_of(package)
    print(f"{package}: {len(names)} modules, {sum(map(len, graph.values()))} arrows")
    found = cycles(graph)
    print(f"\n(a) import cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    arrows = wrong_way(graph)
    print(f"\n(b) wrong-way arrows: {len(arrows)}")
    for a, b in arrows:
        print(f"  {a} [{FLOORS[floor_of(a)][0]}] -> {b} [{FLOORS[floor_of(b)][0]}]")
    print("\n(c) largest functions (lines):")
    for size, where in largest_functions(names):
        print(f"  {size:4d}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
