"""Architecture rules over the ``emmae`` source, read with :mod:`ast` (nothing is imported):

a. no import cycle among emmae's modules, and ``emmae.runtime`` never pulls in torch,
   the trainer or the exporter when it is imported;
b. no module over ``MAX_LINES`` lines;
c. no block of ``MIN_DUPLICATE_LINES`` or more lines repeated (``tools/duplicate_blocks.py``).

Each checker is also run on a tiny package in ``tmp_path``, with and without the fault,
so the rules are shown able both to fail and to pass.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "emmae"
MAX_LINES = 400
MIN_DUPLICATE_LINES = 6
RUNTIME = "emmae.runtime"
FORBIDDEN_IN_RUNTIME = ("torch", "emmae.trainer", "emmae.export")


# ---------------------------------------------------------------- import graph


@dataclass(frozen=True)
class Import:
    """One import in ``module`` (line ``line``) of ``target``: an own module, or an outside top-level package name."""

    module: str
    target: str
    internal: bool
    line: int
    module_level: bool  # runs when the module is imported: not inside a function, not under ``if TYPE_CHECKING:``


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``*.py`` under the package folder ``root``; ``__init__`` is the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is a module (``emmae.x.attr`` -> ``emmae.x``)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def scan_imports(root: Path, package: str) -> list[Import]:
    """Every import statement of every module, inside functions too (``module_level`` tells them apart)."""
    modules = module_files(root, package)
    found: list[Import] = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"

        def add(name: str, line: int, module_level: bool, *, module: str = module) -> None:
            internal = name.split(".")[0] == package
            target = _resolve(name, modules) if internal else name.split(".")[0]
            if target != module:
                found.append(Import(module, target, internal, line, module_level))

        def visit(node: ast.AST, module_level: bool, *, module: str = module, is_package: bool = is_package) -> None:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno, module_level)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # ``from emmae.x import y`` is an import of the submodule emmae.x.y when there is one
                    submodule = f"{source}.{alias.name}"
                    add(submodule if submodule in modules else source, node.lineno, module_level)
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, False)
                for child in node.orelse:
                    visit(child, module_level)
                return
            inner = module_level and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True)
    return found


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module in the own-module graph (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.module, set())
        if imp.internal:
            graph[imp.module].add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def cycle_path(component: list[str], imports: list[Import]) -> list[Import]:
    """One concrete cycle through the component's first module: the imports that close it (shortest, by BFS)."""
    members = set(component)
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        if imp.internal and imp.module in members and imp.target in members:
            edges.setdefault(imp.module, []).append(imp)
    start = component[0]
    came: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for imp in sorted(edges.get(node, []), key=lambda i: (i.target, i.line)):
            if imp.target == start:
                path = [imp]
                while path[0].module != start:
                    path.insert(0, came[path[0].module])
                return path
            if imp.target not in came:
                came[imp.target] = imp
                queue.append(imp.target)
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def forbidden_imports(imports: list[Import], modules: Iterable[str], scope: str, forbidden: tuple[str, ...]) -> list[list[Import]]:
    """For each of the ``modules`` in ``scope``, a chain of module-level imports that reaches a ``forbidden`` module, if any.

    Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so those packages are
    followed too (shown as ``(package)`` links).
    """
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        if imp.module_level:
            edges.setdefault(imp.module, []).append(imp)

    def banned(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in forbidden)

    chains = []
    for root in sorted(modules):
        if not (root == scope or root.startswith(scope + ".")):
            continue
        came: dict[str, Import | None] = {root: None}
        queue = deque([root])
        for parent in _parents(root):
            came[parent] = Import(root, parent, True, 0, True)  # line 0: the package is run, not imported by a line
            queue.append(parent)
        while queue:
            node = queue.popleft()
            steps = list(edges.get(node, []))
            steps += [Import(imp.target, p, True, 0, True) for imp in edges.get(node, []) if imp.internal for p in _parents(imp.target)]
            hit = next((imp for imp in steps if banned(imp.target)), None)
            if hit is not None:
                chain = [hit]
                while came[chain[0].module] is not None:
                    chain.insert(0, came[chain[0].module])  # type: ignore[arg-type]
                chains.append(chain)
                break
            for imp in steps:
                if imp.target not in came:
                    came[imp.target] = imp
                    queue.append(imp.target)
    return chains


def _describe(chain: list[Import], root: Path, package: str) -> str:
    modules = module_files(root, package)

    def where(imp: Import) -> str:
        if imp.line == 0:
            return "(package)"
        return f"({modules[imp.module].relative_to(root.parent).as_posix()}:{imp.line})"

    return chain[0].module + "".join(f" -> {imp.target} {where(imp)}" for imp in chain)


# ---------------------------------------------------------------- size and duplicates


def oversized(root: Path, limit: int) -> list[tuple[str, int]]:
    """``(path relative to root's parent, line count)`` of every ``*.py`` under ``root`` with more than ``limit`` lines."""
    counts = [(p.relative_to(root.parent).as_posix(), len(p.read_text(encoding="utf-8").splitlines())) for p in sorted(root.rglob("*.py"))]
    return [(name, n) for name, n in counts if n > limit]


def _duplicate_blocks() -> ModuleType:
    name = "duplicate_blocks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "duplicate_blocks.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclass looks its module up
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- the rules on emmae


def test_no_import_cycles() -> None:
    imports = scan_imports(PACKAGE_DIR, "emmae")
    cycles = find_cycles(imports)
    report = [
        f"{len(c)} modules: {', '.join(c)}\n    e.g. {_describe(cycle_path(c, imports), PACKAGE_DIR, 'emmae')}" for c in cycles
    ]
    assert not cycles, "import cycles among emmae modules:\n  " + "\n  ".join(report)


def test_runtime_never_imports_torch_trainer_or_export_at_module_level() -> None:
    chains = forbidden_imports(scan_imports(PACKAGE_DIR, "emmae"), module_files(PACKAGE_DIR, "emmae"), RUNTIME, FORBIDDEN_IN_RUNTIME)
    report = [_describe(chain, PACKAGE_DIR, "emmae") for chain in chains]
    assert not chains, f"importing {RUNTIME} modules pulls in {', '.join(FORBIDDEN_IN_RUNTIME)}:\n  " + "\n  ".join(report)


def test_no_module_over_the_line_limit() -> None:
    offenders = oversized(PACKAGE_DIR, MAX_LINES)
    assert not offenders, f"modules over {MAX_LINES} lines:\n  " + "\n  ".join(f"{name}: {n}" for name, n in offenders)


def test_no_duplicated_blocks() -> None:
    found = _duplicate_blocks().find_duplicates(PACKAGE_DIR, MIN_DUPLICATE_LINES)
    assert not found, f"blocks of >= {MIN_DUPLICATE_LINES} lines repeated in emmae/ (paths under emmae/):\n  " + "\n  ".join(map(str, found))


# ---------------------------------------------------------------- the checkers on tiny packages


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_import_scan_resolves_submodules_attributes_and_relative_imports(tmp_path: Path) -> None:
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "from .a import thing\n",
            "a.py": "import os\nfrom pkg import b\nfrom pkg.b import helper\nthing = 1\n",
            "b.py": "def helper():\n    from . import a\n    import numpy.linalg\n",
            "sub/__init__.py": "from . import d\n",
            "sub/d.py": "from ..a import thing\nfrom .. import sub\nimport pkg.sub.d\n",
        },
    )
    got = {(i.module, i.target, i.internal, i.module_level) for i in scan_imports(pkg, "pkg")}
    assert got == {
        ("pkg", "pkg.a", True, True),
        ("pkg.a", "os", False, True),
        ("pkg.a", "pkg.b", True, True),  # submodule, and attribute of pkg.b: both the module pkg.b
        ("pkg.b", "pkg.a", True, False),  # inside a function
        ("pkg.b", "numpy", False, False),
        ("pkg.sub", "pkg.sub.d", True, True),
        ("pkg.sub.d", "pkg.a", True, True),
        ("pkg.sub.d", "pkg.sub", True, True),
    }  # ``import pkg.sub.d`` in pkg.sub.d itself is no edge


def test_cycle_finder_finds_a_cycle_through_a_function_level_import_and_passes_without(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "from pkg.c import f\n",
        "c.py": "def f():\n    from . import a\n",
        "d.py": "import pkg.a\n",
    }
    pkg = _package(tmp_path, files)
    imports = scan_imports(pkg, "pkg")
    assert find_cycles(imports) == [["pkg.a", "pkg.b", "pkg.c"]]
    path = cycle_path(["pkg.a", "pkg.b", "pkg.c"], imports)
    assert [(i.module, i.target, i.line) for i in path] == [("pkg.a", "pkg.b", 1), ("pkg.b", "pkg.c", 1), ("pkg.c", "pkg.a", 2)]
    (pkg / "c.py").write_text("def f():\n    import pkg.d as d\n    return d\n")  # c -> d -> a -> b -> c
    assert find_cycles(scan_imports(pkg, "pkg")) == [["pkg.a", "pkg.b", "pkg.c", "pkg.d"]]
    (pkg / "c.py").write_text("def f():\n    return 1\n")
    assert find_cycles(scan_imports(pkg, "pkg")) == []


def test_runtime_rule_follows_module_level_chains_and_packages_only(tmp_path: Path) -> None:
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "helper.py": "import torch\n",
            "trainer/__init__.py": "",
            "trainer/model.py": "",
            "runtime/__init__.py": "",
            "runtime/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\ndef f():\n    import pkg.helper\n",
            "runtime/eager.py": "try:\n    from pkg import helper\nexcept ImportError:\n    helper = None\n",
            "runtime/trains.py": "from pkg.trainer.model import x\n",
        },
    )
    chains = forbidden_imports(scan_imports(pkg, "pkg"), module_files(pkg, "pkg"), "pkg.runtime", ("torch", "pkg.trainer"))
    assert [_describe(c, pkg, "pkg") for c in chains] == [
        "pkg.runtime.eager -> pkg.helper (pkg/runtime/eager.py:2) -> torch (pkg/helper.py:1)",
        "pkg.runtime.trains -> pkg.trainer.model (pkg/runtime/trains.py:1)",
    ]
    (pkg / "__init__.py").write_text("from . import helper\n")  # every runtime module now runs pkg/__init__ first
    chains = forbidden_imports(scan_imports(pkg, "pkg"), module_files(pkg, "pkg"), "pkg.runtime", ("torch",))
    assert [c[0].module for c in chains] == ["pkg.runtime", "pkg.runtime.eager", "pkg.runtime.lazy", "pkg.runtime.trains"]
    assert _describe(chains[0], pkg, "pkg") == "pkg.runtime -> pkg (package) -> pkg.helper (pkg/__init__.py:1) -> torch (pkg/helper.py:1)"
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "eager.py").write_text("def f():\n    from pkg import helper\n")
    (pkg / "runtime" / "trains.py").write_text("")
    assert forbidden_imports(scan_imports(pkg, "pkg"), module_files(pkg, "pkg"), "pkg.runtime", ("torch", "pkg.trainer")) == []


def test_size_rule_counts_lines(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {"__init__.py": "", "ok.py": "x = 1\n" * MAX_LINES, "big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert oversized(pkg, MAX_LINES) == [("pkg/big.py", MAX_LINES + 1)]
    (pkg / "big.py").write_text("x = 1\n" * MAX_LINES)
    assert oversized(pkg, MAX_LINES) == []


BLOCK = """\
def scale(values, factor):
    out = []
    for value in values:
        if value is None:
            continue
        out.append(value * factor)
    return out
"""


def test_duplicate_finder_reports_both_places_and_ignores_layout_imports_and_argparse(tmp_path: Path) -> None:
    find = _duplicate_blocks().find_duplicates
    spaced = BLOCK.replace("    out = []\n", "    # a comment\n\n        out = []\n")  # other indent, blank and comment lines
    pkg = _package(tmp_path, {"a.py": "import os\n\n" + BLOCK, "b.py": "x = 1\n" + spaced + "\n\n" + BLOCK})
    assert [str(d) for d in find(pkg, 6)] == [
        "a.py:3-9 == b.py:2-10 (7 lines)",
        "a.py:3-9 == b.py:13-19 (7 lines)",
        "b.py:2-10 == b.py:13-19 (7 lines)",  # within one file too
    ]
    assert find(pkg, 8) == []  # only 7 lines repeat
    (pkg / "b.py").write_text(BLOCK.replace("continue", "break"))
    assert find(pkg, 6) == []  # 3 + 3 equal lines around a difference are no 6-line block
    imports = "import os\nimport sys\nfrom pathlib import (\n    Path,\n    PurePath,\n)\nimport json\n"
    args = "".join(f"    parser.add_argument('--opt{i}', type=int)\n" for i in range(3))
    args = "    parser = argparse.ArgumentParser()\n" + args + "    group = parser.add_argument_group('x')\n    return parser\n"
    (pkg / "a.py").write_text(imports + "\ndef build():\n" + args)
    (pkg / "b.py").write_text(imports + "\ndef build():\n" + args)
    assert find(pkg, 6) == []
    plain = "import os\n\ndef build():\n" + args.replace("add_argument", "add")  # the same calls under another name
    (pkg / "a.py").write_text(plain)
    (pkg / "b.py").write_text(plain)
    assert [str(d) for d in find(pkg, 6)] == ["a.py:3-9 == b.py:3-9 (7 lines)"]


def test_duplicate_finder_script_prints_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkg = _package(tmp_path, {"a.py": BLOCK, "b.py": BLOCK})
    assert _duplicate_blocks().main([str(pkg), "--min-lines", "6"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "a.py:1-7 == b.py:1-7 (7 lines)"
    assert _duplicate_blocks().main([str(pkg), "--min-lines", "8"]) == 0
