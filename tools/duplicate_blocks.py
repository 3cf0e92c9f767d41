"""Find blocks of repeated source lines in a Python tree (copy-paste that should be shared code).

    python tools/duplicate_blocks.py [--min-lines 6] [ROOT]

ROOT defaults to the ``emmae`` package next to this folder. Each line is normalised by
stripping its whitespace; blank lines, comment-only lines and import statements (all the
lines of each one, found with :mod:`ast`) are skipped. Every window of ``min_lines``
consecutive remaining lines is hashed, exactly, and windows that occur twice (in two
files, or twice in one file without overlapping) are merged into maximal duplicated
blocks. Windows with a line containing ``add_argument``, ``add_common_arguments(`` or
``.parse_args(`` are exempt: argparse set-up
repeats by nature. Prints one finding per line, ``path:first-last == path:first-last``,
and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

EXEMPT = ("add_argument", "add_common_arguments(", ".parse_args(")  #: a window with a line containing one of these is never reported


@dataclass(frozen=True, order=True)
class Duplicate:
    """Two places holding the same ``lines`` normalised lines; paths relative to the root, line numbers 1-based."""

    path_a: str
    first_a: int
    last_a: int
    path_b: str
    first_b: int
    last_b: int
    lines: int

    def __str__(self) -> str:
        return f"{self.path_a}:{self.first_a}-{self.last_a} == {self.path_b}:{self.first_b}-{self.last_b} ({self.lines} lines)"


def _import_lines(text: str) -> set[int]:
    """1-based numbers of every line belonging to an import statement (a file that does not parse: none)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return out


def normalised_lines(text: str) -> list[tuple[str, int]]:
    """``(stripped line, 1-based line number)`` for the lines that count (see the module docstring)."""
    imports = _import_lines(text)
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and number not in imports:
            out.append((stripped, number))
    return out


def find_duplicates(root: Path, min_lines: int = 6) -> list[Duplicate]:
    """Maximal duplicated blocks of at least ``min_lines`` normalised lines among ``root``'s ``*.py`` files, sorted."""
    if min_lines < 1:
        raise ValueError(f"min_lines must be >= 1, got {min_lines}")
    root = Path(root)
    files = {p.relative_to(root).as_posix(): normalised_lines(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py"))}
    seen: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)  # window -> (file, index of its first line)
    for name, lines in files.items():
        texts = [text for text, _ in lines]
        for i in range(len(texts) - min_lines + 1):
            window = tuple(texts[i : i + min_lines])
            if not any(word in line for line in window for word in EXEMPT):
                seen[window].append((name, i))
    pairs = set()  # (file a, index a, file b, index b), a before b; windows in one file must not overlap
    for places in seen.values():
        for k, (fa, ia) in enumerate(places):
            pairs.update((fa, ia, fb, ib) for fb, ib in places[k + 1 :] if fa != fb or ib - ia >= min_lines)
    out = []
    for fa, ia, fb, ib in pairs:
        if (fa, ia - 1, fb, ib - 1) in pairs:
            continue  # not the start of a maximal block
        n = 1
        while (fa, ia + n, fb, ib + n) in pairs:
            n += 1
        length = min_lines + n - 1
        a, b = files[fa], files[fb]
        out.append(Duplicate(fa, a[ia][1], a[ia + length - 1][1], fb, b[ib][1], b[ib + length - 1][1], length))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent / "emmae")
    parser.add_argument("--min-lines", type=int, default=6, help="shortest block reported, in normalised lines (default 6)")
    args = parser.parse_args(argv)
    found = find_duplicates(args.root, args.min_lines)
    for dup in found:
        print(dup)
    print(f"{len(found)} duplicated block(s) of >= {args.min_lines} lines in {args.root}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
