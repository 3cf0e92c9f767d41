"""Discovery: which files are micrographs, what is new or changed, and their keys.

A candidate is a file matching ``stream.patterns`` that is neither hidden nor one of the
usual temporary names of copy tools (:func:`is_candidate`), in the watched folder (its
sub-folders too with ``stream.recursive``; hidden ones and the output folder are not
entered), or a row of an upstream micrographs STAR. Every micrograph is keyed on its path relative to the watched folder (so two spellings
of the folder, absolute, relative or through a link, are one stream) and its outputs
go where RELION looks for them (:func:`emmae.io.layout.output_stem`). A scan lists the files not yet picked; a
sweep (every ``SWEEP_INTERVAL_S``, or for a file the file-system observer reported)
lists the picked ones too, so a replaced micrograph is noticed. It never opens a file
and never writes anything.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.io.inputs import micrographs_from_star
from emmae.runtime.stream.journal import journal_key, key_path

log = logging.getLogger("emmae.stream")
TEMPORARY = ("*~", "*.tmp", "*.part", "*.partial", "*.filepart", "*downloading*", "*.crdownload")
SWEEP_INTERVAL_S = 60.0  # every picked file is checked for a new version at least this often (sooner on an observer's event)

Candidate = tuple[Path, "str | None", "os.stat_result | None"]  # file, output name (None: from its path), stat (None: not taken)


class Scanner:
    """The watched folder (or upstream STAR) of one stream; see the module docstring."""

    def __init__(self, watch: Path, out: Path, config: EmmaeConfig, watch_star: Path | None = None) -> None:
        self.watch, self.out, self.config, self.watch_star = watch, out, config, watch_star
        self._prefix = str(watch).rstrip("/") + "/"  # scanned paths start with it: their key is what follows
        self._abs_prefix = os.path.abspath(watch).rstrip("/") + "/"
        self._real_root = os.path.realpath(watch)  # the observer reports paths under it
        self._touched: set[str] = set()  # keys the observer reported changed (its thread adds, the daemon's takes)
        self._touched_lock = threading.Lock()
        self._sweep_at = -float("inf")
        self._star_last: list[tuple[Path, str]] = []  # the upstream STAR's rows when it was last readable
        self._star_unready = False  # said that it cannot be read now (once, until it can again)
        self._stacks_said = False  # said that .mrcs stacks are not picked (once)

    def key(self, path: Path | str) -> str:
        """The journal's key of a file: its path relative to the watched folder (absolute if outside it)."""
        text = str(path)
        if text.startswith(self._prefix):
            return journal_key(text[len(self._prefix):])
        text = os.path.abspath(text)
        return journal_key(text[len(self._abs_prefix):] if text.startswith(self._abs_prefix) else text)

    def key_text(self, path: Path | str) -> str:
        """The file's path relative to the watched folder as the file system gives it (may hold undecodable bytes)."""
        text = str(path)
        return text[len(self._prefix):] if text.startswith(self._prefix) else text

    def path_of(self, key: str) -> Path:
        return Path(key) if os.path.isabs(key) else self.watch / key

    def exists(self, key: str) -> bool:
        """The file of ``key`` is there (a name that is not UTF-8 included)."""
        return any(any_stat(self.path_of(text)) is not None for text in {key, key_path(key)})

    def notice_path(self, path: str) -> None:
        """Called by the file-system observer (its thread) with a changed file: looked at even if picked (a new version?)."""
        if path.startswith(self._real_root + "/"):
            with self._touched_lock:
                self._touched.add(journal_key(path[len(self._real_root) + 1 :]))

    def sweep_due(self, now: float) -> bool:
        return now >= self._sweep_at

    def swept(self, cost_s: float) -> None:
        """A sweep took ``cost_s``: the next is due in ``SWEEP_INTERVAL_S`` (later for a huge folder)."""
        self._sweep_at = time.monotonic() + max(SWEEP_INTERVAL_S, 20 * cost_s)

    def take_touched(self) -> set[str]:
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        return touched

    def candidates(self, picked: Container[str], sweep: bool = False, touched: Container[str] = frozenset()) -> list[Candidate]:
        """Files to look at: not in ``picked`` (or, on a sweep or when ``touched`` by an observer's event, picked ones too);
        a folder's files oldest first (``stream.order``)."""
        if self.watch_star is not None:
            return [(path, name, None) for path, name in self._star_rows()
                    if sweep or (key := self.key(path)) not in picked or key in touched]
        known: Container[str] = frozenset() if sweep else _Without(picked, touched)
        stacks: list[str] | None = None if self._stacks_said else []
        files = [(path, None, any_stat(path)) for path in walk(self.watch, self.config.stream.patterns, self.config.stream.recursive,
                                                                 skip=self.out.resolve(), known=known, prefix=self._prefix, stacks=stacks)]
        if stacks:
            self._stacks_said = True
            log.warning("%d .mrcs files in %s (e.g. %s) are not picked: .mrcs are stacks (movies); watch the motion-corrected "
                        "micrographs (.mrc), or follow the upstream job with --watch-star", len(stacks), self.watch, self.key(stacks[0]))
        newest = self.config.stream.order == "newest"
        files.sort(key=lambda f: f[2].st_mtime_ns if f[2] is not None else 0, reverse=newest)  # stable: by name within a time
        return files  # type: ignore[return-value]  # paths as strings: a Path each would cost more than the look itself

    def _star_rows(self) -> list[tuple[Path, str]]:
        """The upstream STAR's rows; while it cannot be read (gone, emptied, caught half-written as RELION rewrites it in
        place, no loop with ``_rlnMicrographName`` yet), the rows it last had: not ready yet, said once."""
        try:
            rows = micrographs_from_star(self.watch_star, self.config.output.project_root)
        except (OSError, ValueError) as exc:
            if not self._star_unready:
                log.warning("%s cannot be read now (%s): keeping its last %d rows until it can", self.watch_star,
                            getattr(exc, "strerror", None) or exc, len(self._star_last))
            self._star_unready = True
            return self._star_last
        if self._star_unready:
            log.info("%s can be read again: %d rows", self.watch_star, len(rows))
        self._star_last, self._star_unready = rows, False
        return rows


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled test for a name: matches a pattern, is not hidden, is not a temporary name."""
    wanted = re.compile("|".join(fnmatch.translate(p) for p in patterns))
    temporary = re.compile("|".join(fnmatch.translate(t) for t in TEMPORARY))
    return lambda name: not name.startswith(".") and wanted.match(name) is not None and temporary.match(name) is None


def is_candidate(name: str, patterns: tuple[str, ...]) -> bool:
    """Matches a pattern and is neither hidden nor a temporary name."""
    return _matcher(tuple(patterns))(name)


def scan(folder: Path, patterns: tuple[str, ...], recursive: bool, skip: Path | None = None, known: Container[str] = frozenset(),
         prefix: str = "") -> Iterator[Path]:
    """Candidate files under ``folder`` (sorted; hidden folders and ``skip`` are not entered; paths in ``known`` left out).

    With ``prefix`` (how every path found starts, e.g. ``folder`` and a slash), ``known``
    holds the paths without it (relative to the folder).
    """
    return map(Path, walk(folder, patterns, recursive, skip, known, prefix))


def walk(folder: Path, patterns: tuple[str, ...], recursive: bool, skip: Path | None = None, known: Container[str] = frozenset(),
         prefix: str = "", stacks: list[str] | None = None) -> Iterator[str]:
    """:func:`scan` as plain strings (cheaper, for a folder of thousands of files); ``stacks``: gets the ``*.mrcs`` files
    (movie stacks) that are not candidates."""
    candidate = _matcher(tuple(patterns))
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or Path(root, d).resolve() != skip))
        for name in sorted(files):
            if candidate(name):
                path = os.path.join(root, name)
                if path[len(prefix):] not in known:
                    yield path
            elif stacks is not None and name[-5:].lower() == ".mrcs" and not name.startswith("."):
                stacks.append(os.path.join(root, name))
        if not recursive:
            break


class _Without:
    """``key in picked and key not in touched``, without building a set (picked can be large)."""

    def __init__(self, picked: Container[str], touched: Container[str]) -> None:
        self.picked, self.touched = picked, touched

    def __contains__(self, key: object) -> bool:
        return key in self.picked and key not in self.touched


def any_stat(path: Path | str) -> os.stat_result | None:
    """The file's stat, or the link's own when it cannot be followed (a loop); None if gone."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        try:
            return os.lstat(path)
        except OSError:
            return None
