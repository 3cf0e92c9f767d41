"""Architecture rules over the ``emmae`` source, read with :mod:`ast` (nothing is imported):

a. no import cycle among emmae's modules, and ``emmae.runtime`` never pulls in torch,
   the trainer or the exporter when it is imported;
b. no module over ``MAX_LINES`` lines;
c. no block of ``MIN_DUPLICATE_LINES`` or more lines repeated (``tools/duplicate_blocks.py``);
d. imports only go down the layers of ``LAYERS`` (inside functions too; only ``if TYPE_CHECKING:``
   imports are exempt), and every module is placed in a layer. Bottom to top, and beside:

   - ground: the package itself, ``config``, ``errors``, ``backend``, ``memory``, ``metrics`` and
     ``commandline`` (the parser, flags and logging of every command, the trainer's too),
     ``emmae.models`` (the shipped bundles) and ``emmae.runtime``'s own ``__init__`` (it imports nothing);
   - io: ``emmae.io`` (file formats);
   - kernels: ``emmae.runtime.kernels`` (array code);
   - picking: ``emmae.runtime.picking`` (the stages of one pick, on arrays);
   - outputs/jobs: ``runtime/outputs.py`` (the output folder, handed picks already cut: it never picks),
     ``runtime/jobs.py`` (admit, pick and write one micrograph; a batch), ``runtime/inputs.py`` (a
     batch's inputs, named and admitted) and ``runtime/distributed.py``
     (Dask executors around the jobs): they use picking and each other, never a stream or a command;
   - stream/web: ``emmae.runtime.stream`` and ``emmae.runtime.web`` (the web view reads a running stream);
   - commands: ``emmae.runtime.commands`` and ``runtime/options.py`` (the picking commands' own
     flags: only commands parse arguments); the commands may also use ``synth`` (the demo);
   - synth: ``emmae.synth``, synthetic micrographs, on io alone; no runtime layer below the commands uses it;
   - trainer: ``emmae.trainer`` (torch), beside the runtime, on picking and below; never the
     exporter, never the runtime's outputs, streams or command options;
   - export: ``emmae.export`` (torch, onnx), on the trainer;
   - adapt: ``emmae.adapt`` (``emmae-adapt``), on the exporter and the trainer: it trains, then
     exports, so it sits above both (the runtime's ``--adapt`` runs it as another process).

   The runtime never imports the trainer, the exporter or adapt, at any depth: no runtime layer
   has them below it;
e. no module imports another module's ``_private`` names;
f. ``emmae.synth`` is one public surface: outside it (and in tests, bench, tools) only the package
   is imported, never its modules.

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


@dataclass(frozen=True)
class Layer:
    """A layer: its ``members`` (``x.*``: module or package x and everything below it; ``x``: that module alone) and the
    layers right ``below`` it; it may import its own modules and those of every layer below, at any depth."""

    name: str
    members: tuple[str, ...]
    below: tuple[str, ...] = ()


LAYERS = (  # bottom first; see the module docstring
    Layer("ground", ("emmae", "emmae.config", "emmae.errors", "emmae.backend", "emmae.memory", "emmae.metrics", "emmae.commandline",
                     "emmae.models", "emmae.runtime")),
    Layer("io", ("emmae.io.*",), ("ground",)),
    Layer("kernels", ("emmae.runtime.kernels.*",), ("io",)),
    Layer("picking", ("emmae.runtime.picking.*",), ("kernels",)),
    Layer("outputs/jobs", ("emmae.runtime.outputs", "emmae.runtime.jobs", "emmae.runtime.inputs", "emmae.runtime.distributed"), ("picking",)),
    Layer("stream/web", ("emmae.runtime.stream.*", "emmae.runtime.web.*"), ("outputs/jobs",)),
    Layer("commands", ("emmae.runtime.commands.*", "emmae.runtime.options"), ("stream/web", "synth")),
    Layer("synth", ("emmae.synth.*",), ("io",)),
    Layer("trainer", ("emmae.trainer.*",), ("picking",)),
    Layer("export", ("emmae.export.*",), ("trainer",)),
    Layer("adapt", ("emmae.adapt",), ("export",)),
)
# Upward imports still there, each with what removes it: one listed but no longer found fails the test (the list only shrinks).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}  # (module, target): why, for an upward import kept for a while (none)
SURFACES = ("emmae.synth",)  # packages imported only as a whole from outside


# ---------------------------------------------------------------- import graph


@dataclass(frozen=True)
class Import:
    """One import in ``module`` (line ``line``) of ``target``: an own module, or an outside top-level package name."""

    module: str
    target: str
    internal: bool
    line: int
    module_level: bool  # runs when the module is imported: not inside a function, not under ``if TYPE_CHECKING:``
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never runs


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

        def add(name: str, line: int, module_level: bool, type_only: bool, *, module: str = module) -> None:
            internal = name.split(".")[0] == package
            target = _resolve(name, modules) if internal else name.split(".")[0]
            if target != module:
                found.append(Import(module, target, internal, line, module_level, type_only))

        def visit(node: ast.AST, module_level: bool, type_only: bool = False, *, module: str = module, is_package: bool = is_package) -> None:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno, module_level, type_only)
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
                    add(submodule if submodule in modules else source, node.lineno, module_level, type_only)
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, False, True)
                for child in node.orelse:
                    visit(child, module_level, type_only)
                return
            inner = module_level and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner, type_only)

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


# ---------------------------------------------------------------- layers, private names, surfaces


def _member(module: str, entry: str) -> bool:
    if entry.endswith(".*"):
        return module == entry[:-2] or module.startswith(entry[:-1])
    return module == entry


def layer_of(module: str, layers: tuple[Layer, ...]) -> str | None:
    """The layer whose most specific entry holds ``module`` (``a.b.*`` before ``a.*``), None when none does."""
    found = [(len(entry), layer.name) for layer in layers for entry in layer.members if _member(module, entry)]
    return max(found)[1] if found else None


def reachable(layers: tuple[Layer, ...]) -> dict[str, set[str]]:
    """Layer -> the layers its modules may import: itself and every layer below it, at any depth."""
    below = {layer.name: set(layer.below) for layer in layers}
    unknown = {name for names in below.values() for name in names} - set(below)
    assert not unknown, f"layers named below others but not defined: {sorted(unknown)}"
    out = {}
    for name in below:
        seen, todo = {name}, [name]
        while todo:
            for lower in below[todo.pop()] - seen:
                seen.add(lower)
                todo.append(lower)
        out[name] = seen
    return out


def unplaced(modules: Iterable[str], layers: tuple[Layer, ...]) -> list[str]:
    """The modules no layer holds (a new module must be placed)."""
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(imports: list[Import], layers: tuple[Layer, ...]) -> list[Import]:
    """Own-module imports (inside functions too; not under ``if TYPE_CHECKING:``) of a module from a layer not below its own."""
    allowed = reachable(layers)
    out = []
    for imp in imports:
        if not imp.internal or imp.type_only:
            continue
        source, target = layer_of(imp.module, layers), layer_of(imp.target, layers)
        if source is not None and target is not None and target not in allowed[source]:
            out.append(imp)
    return sorted(set(out), key=lambda i: (i.module, i.line, i.target))  # one per line and target (``from x import a, b``)


def _describe_upward(imp: Import, root: Path, package: str, layers: tuple[Layer, ...]) -> str:
    path = module_files(root, package)[imp.module].relative_to(root.parent).as_posix()
    return f"{path}:{imp.line}: {imp.module} ({layer_of(imp.module, layers)}) imports {imp.target} ({layer_of(imp.target, layers)})"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path, package: str) -> list[str]:
    """``path:line: module imports _name from other`` for every import of another own module's ``_private`` name."""
    modules = module_files(root, package)
    out = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                source = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != package or source == module:
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    out.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno}: {module} imports {alias.name} from {source}")
    return out


def surface_breaches(files: Iterable[Path], surface: str, submodules: Iterable[str]) -> list[str]:
    """``path:line: name`` for every import of a module inside the package ``surface`` (given as ``submodules``) in ``files``."""
    inner = set(submodules)
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names = []  # the modules it imports: a name after ``from surface import`` only when it is a module
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module, *(n for alias in node.names if (n := f"{node.module}.{alias.name}") in inner)]
            out += [f"{path.as_posix()}:{node.lineno}: {name}" for name in names if name in inner or name.startswith(surface + ".")]
    return sorted(set(out))


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


def test_every_module_is_placed_in_a_layer() -> None:
    missing = unplaced(module_files(PACKAGE_DIR, "emmae"), LAYERS)
    assert not missing, "modules in no layer (add them to LAYERS in tests/test_architecture.py):\n  " + "\n  ".join(missing)


def test_imports_only_go_down_the_layers() -> None:
    found = upward_imports(scan_imports(PACKAGE_DIR, "emmae"), LAYERS)
    unexpected = [imp for imp in found if (imp.module, imp.target) not in KNOWN_UPWARD]
    report = [_describe_upward(imp, PACKAGE_DIR, "emmae", LAYERS) for imp in unexpected]
    assert not unexpected, "imports that go up the layers:\n  " + "\n  ".join(report)
    gone = sorted(set(KNOWN_UPWARD) - {(imp.module, imp.target) for imp in found})
    assert not gone, f"upward imports listed in KNOWN_UPWARD but gone (remove them from the list): {gone}"


def test_no_module_imports_private_names_of_another() -> None:
    found = private_imports(PACKAGE_DIR, "emmae")
    assert not found, "imports of another module's private names:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("surface", SURFACES)
def test_packages_with_one_surface_are_imported_whole(surface: str) -> None:
    modules = module_files(PACKAGE_DIR, "emmae")
    inside = [m for m in modules if m.startswith(surface + ".")]
    files = [path for module, path in modules.items() if not (module == surface or module.startswith(surface + "."))]
    files += [p for folder in ("tests", "bench", "tools") for p in sorted((REPO / folder).rglob("*.py"))]
    found = surface_breaches(files, surface, inside)
    assert not found, f"imports of {surface}'s modules (import {surface} itself):\n  " + "\n  ".join(found)


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


TINY_LAYERS = (
    Layer("ground", ("pkg", "pkg.base")),
    Layer("low", ("pkg.low.*",), ("ground",)),
    Layer("high", ("pkg.high.*",), ("low",)),
    Layer("side", ("pkg.side.*",), ("ground",)),
    Layer("top", ("pkg.top",), ("high", "side")),
)


def test_layer_rule_finds_upward_imports_in_functions_too_and_unplaced_modules(tmp_path: Path) -> None:
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "base.py": "import os\n",
            "low/__init__.py": "",
            "low/a.py": "from pkg import base\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import b\n",
            "low/c.py": "def f():\n    from pkg.high.b import g\n",
            "high/__init__.py": "",
            "high/b.py": "from pkg.low import a\nfrom pkg import base\ndef g():\n    from pkg.side.s import h, i\n",
            "side/__init__.py": "",
            "side/s.py": "import pkg.low.a\nh = i = 1\n",
            "top.py": "from pkg.high import b\nfrom pkg.side import s\nfrom pkg.low.c import f\n",
            "stray.py": "",
        },
    )
    assert reachable(TINY_LAYERS)["top"] == {"top", "high", "low", "ground", "side"}  # below at any depth
    assert unplaced(module_files(pkg, "pkg"), TINY_LAYERS) == ["pkg.stray"]
    assert layer_of("pkg.low", TINY_LAYERS) == "low" and layer_of("pkg.lowly", TINY_LAYERS) is None
    found = upward_imports(scan_imports(pkg, "pkg"), TINY_LAYERS)
    assert [_describe_upward(i, pkg, "pkg", TINY_LAYERS) for i in found] == [
        "pkg/high/b.py:4: pkg.high.b (high) imports pkg.side.s (side)",  # inside a function; side is beside, not below
        "pkg/low/c.py:2: pkg.low.c (low) imports pkg.high.b (high)",
        "pkg/side/s.py:1: pkg.side.s (side) imports pkg.low.a (low)",
    ]  # low/a.py's TYPE_CHECKING import is exempt
    (pkg / "high" / "b.py").write_text("from pkg.low import a\n")
    (pkg / "low" / "c.py").write_text("def f():\n    from pkg import base\n")
    (pkg / "side" / "s.py").write_text("import pkg.base\n")
    (pkg / "stray.py").unlink()
    assert upward_imports(scan_imports(pkg, "pkg"), TINY_LAYERS) == []
    assert unplaced(module_files(pkg, "pkg"), TINY_LAYERS) == []


def test_private_and_surface_rules(tmp_path: Path) -> None:
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "__version__ = '1'\n",
            "a.py": "from pkg import __version__\nfrom pkg.b import _hidden, shown\n_own = 1\n",
            "b.py": "from .a import _own\n_hidden = shown = 1\n",
            "c.py": "from pkg.a import _own as own\n",
            "surf/__init__.py": "from pkg.surf.inner import thing\nfrom ._impl import _helper\n",
            "surf/inner.py": "from pkg.surf._impl import _helper\nthing = 1\n",
            "surf/_impl.py": "def _helper():\n    pass\n",
            "user.py": "from pkg.surf import thing\nfrom pkg.surf.inner import thing as again\nimport pkg.surf._impl\nfrom pkg.surf import inner\n",
        },
    )
    assert private_imports(pkg, "pkg") == [
        "pkg/a.py:2: pkg.a imports _hidden from pkg.b",
        "pkg/b.py:1: pkg.b imports _own from pkg.a",
        "pkg/c.py:1: pkg.c imports _own from pkg.a",
        "pkg/surf/__init__.py:2: pkg.surf imports _helper from pkg.surf._impl",
        "pkg/surf/inner.py:1: pkg.surf.inner imports _helper from pkg.surf._impl",
    ]  # dunder names such as __version__ are no private names
    inside = ["pkg.surf._impl", "pkg.surf.inner"]
    assert surface_breaches([pkg / "user.py"], "pkg.surf", inside) == [
        f"{(pkg / 'user.py').as_posix()}:2: pkg.surf.inner",
        f"{(pkg / 'user.py').as_posix()}:3: pkg.surf._impl",
        f"{(pkg / 'user.py').as_posix()}:4: pkg.surf.inner",
    ]
    for name in ("a.py", "b.py", "c.py"):
        (pkg / name).write_text("from pkg import __version__\n")
    (pkg / "surf" / "__init__.py").write_text("from pkg.surf.inner import thing\n")
    (pkg / "surf" / "inner.py").write_text("from pkg.surf._impl import helper\nthing = 1\n")
    (pkg / "user.py").write_text("from pkg.surf import thing\nimport pkg.surf\n")
    assert private_imports(pkg, "pkg") == []
    assert surface_breaches([pkg / "user.py"], "pkg.surf", inside) == []


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
