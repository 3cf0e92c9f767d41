"""The stream's journal has one writer: only ``emmae.runtime.stream.recorder`` (and the journal itself) calls a write
method of :class:`~emmae.runtime.stream.journal.Journal`.

The source is read with :mod:`ast` (nothing is imported). A call counts as a call on a
journal when its receiver is a name or an attribute whose last part mentions ``journal``
(``journal``, ``self.journal``, ``self.recorder.journal``) or a name bound to
``Journal(...)`` in the same module. Every public method of ``Journal`` is classified as a
read or a write, so a new method cannot slip past the rule unclassified. The checker is
also run on a small fake source, with and without the fault.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "emmae"
JOURNAL_FILE = PACKAGE_DIR / "runtime" / "stream" / "journal.py"
WRITERS = {"emmae/runtime/stream/recorder.py", "emmae/runtime/stream/journal.py"}
WRITES = frozenset({
    "mark_seen", "mark_unstarted", "mark_processing", "mark_picked", "mark_failed", "adopt", "forget", "forget_failed",
    "set_particles", "set_outputs", "unpick_other_models", "unpick_other_sessions", "count_attempt", "set_adaptation",
})
READS = frozenset({"close", "get", "wants", "batch", "picked", "failed", "picked_at", "key_of", "adaptation", "counts"})


def journal_methods(source: str) -> set[str]:
    """The public methods of the class ``Journal`` in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "Journal":
            return {f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    raise AssertionError("no class Journal")


def _last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def journal_writes(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, method) of every call of a journal write method in ``source``."""
    tree = ast.parse(source, filename=filename)
    opened = set()  # names bound to Journal(...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _last_name(node.value.func) == "Journal":
            opened.update(_last_name(t) for t in node.targets if _last_name(t) is not None)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITES):
            continue
        receiver = node.func.value
        name = _last_name(receiver)
        on_journal = isinstance(receiver, ast.Call) and _last_name(receiver.func) == "Journal"
        if on_journal or (name is not None and ("journal" in name.lower() or (isinstance(receiver, ast.Name) and name in opened))):
            found.append((node.lineno, node.func.attr))
    return found


def foreign_writes(root: Path) -> list[str]:
    """``file:line method`` of every journal write outside the recorder and the journal, under the package folder ``root``."""
    report = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).as_posix()
        if relative in WRITERS:
            continue
        report += [f"{relative}:{line} {method}" for line, method in journal_writes(path.read_text(encoding="utf-8"), str(path))]
    return report


def test_every_journal_method_is_a_read_or_a_write() -> None:
    methods = journal_methods(JOURNAL_FILE.read_text(encoding="utf-8"))
    assert not WRITES & READS
    assert methods == WRITES | READS, f"classify as a read or a write: {sorted(methods - WRITES - READS)}; gone: {sorted((WRITES | READS) - methods)}"


def test_only_the_recorder_writes_the_journal() -> None:
    report = foreign_writes(PACKAGE_DIR)
    assert not report, "the journal is written through emmae.runtime.stream.recorder only:\n  " + "\n  ".join(report)


def test_the_rule_can_fail_and_pass_on_a_small_package(tmp_path: Path) -> None:
    package = tmp_path / "emmae"
    (package / "runtime" / "stream").mkdir(parents=True)
    (package / "runtime" / "stream" / "recorder.py").write_text("def seen(self, key):\n    self.journal.mark_seen(key, key)\n")
    daemon = package / "runtime" / "stream" / "daemon.py"
    daemon.write_text(
        "from emmae.runtime.stream.journal import Journal\n"
        "def feed(self, key):\n"
        "    self.recorder.seen(key)\n"  # through the recorder: fine
        "    self.admission.forget(key)\n"  # another object's method of a write's name: fine
        "    self.journal.counts()\n"  # a read: fine
        "def switch(self):\n"
        "    return self.recorder.journal.unpick_other_models('m')\n"
    )
    (package / "runtime" / "rethreshold.py").write_text(
        "from emmae.runtime.stream.journal import Journal\n"
        "def recount(folder, counts):\n"
        "    opened = Journal(folder)\n"
        "    opened.set_particles(counts)\n"
        "    Journal(folder).forget('a')\n"
    )
    assert foreign_writes(package) == ["emmae/runtime/rethreshold.py:4 set_particles", "emmae/runtime/rethreshold.py:5 forget",
                                       "emmae/runtime/stream/daemon.py:7 unpick_other_models"]
    daemon.write_text("def switch(self):\n    return self.recorder.repick_other_models('m')\n")
    (package / "runtime" / "rethreshold.py").write_text("from emmae.runtime.stream.recorder import recount_particles\n")
    assert foreign_writes(package) == []
