"""The journal's owner: what became of every micrograph of a stream, recorded once, in one thread.

A :class:`Recorder` is the only writer of the stream's SQLite journal (every ``mark_*``,
``unpick_*``, ``set_*`` and ``forget*`` call is made here: ``tests/test_journal_writers.py``
holds every other module to it) and keeps the in-memory view the daemon consults without
a query (what is picked, what failed, what waits out a retry). It records micrographs
seen and handed on, finished jobs, failures, replaced files (whose old outputs go), what
is due to be picked again and the adaptation's state, and has the output folder rewrite
the index files and ``failed.txt`` from the journal; :func:`recount_particles` is the
one write of a re-threshold. It never reads micrographs and never decides what to pick.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import OutputError
from emmae.runtime.jobs import Done, remember_saved
from emmae.runtime.outputs import Failure, OutputFolder
from emmae.runtime.stream.journal import FILENAME, Entry, Journal, changed_since_picked, journal_key
from emmae.runtime.stream.names import shown, unsafe_name
from emmae.runtime.stream.status import Progress

log = logging.getLogger("emmae.stream")
OUTPUT_RETRY_S = 30.0  # a micrograph whose outputs could not be written (full disk) is retried after this
ROWS_READ_PER_INDEX = 500  # saved picks read back per index rewrite (micrographs an earlier run picked)
FAILED_SHOWN = 50  # failed micrographs listed in the final summary (all are in failed.txt)
RETRY_TEXT = {"config": "; tried again when the configuration changes", "output": f"; tried again in {OUTPUT_RETRY_S:g} s",
              "unexpected": "; tried again when it or the configuration changes"}


class Recorder:
    """The journal, its in-memory view and the index files; see the module docstring."""

    def __init__(self, journal: Journal, outputs: OutputFolder, progress: Progress, config_hash: str) -> None:
        self.journal, self.outputs, self.progress, self.config_hash = journal, outputs, progress, config_hash
        self.picked: dict[str, Entry] = {e.path: e for e in journal.picked()}  # skipped by key: no stat, no query
        self.repick: set[str] = {key for key, e in self.picked.items() if e.repick}  # picked, listed, and due to be picked again
        self.failed_keys: set[str] = {e.path for e in journal.failed()}
        self.progress.count, self.progress.particles = len(self.picked), sum(e.particles or 0 for e in self.picked.values())
        self.progress.failed = len(self.failed_keys)  # the status line's counts are the journal's
        self.retry_after: dict[str, float] = {}  # keys whose outputs could not be written
        self.adopted: list[tuple[str, int, int, int, int]] = []  # picked entries whose file is recorded anew (older journal, moved)
        self.on_picked: Callable[[Path, int], None] | None = None  # (micrograph, particles), e.g. for benches
        self.on_failed: Callable[[str, int | None, int | None, str], None] | None = None  # (key, size, mtime_ns, kind)
        self.index_stale = True
        self.project: Path | None = None  # the folder the index's coordinate files are written relative to
        self._relocate()

    def _relocate(self) -> None:
        """Coordinate files an older journal recorded as absolute paths are recorded relative to the output folder (found
        by their tail when the folder has moved since), so the index finds them wherever the session is."""
        moved = {}
        for key, entry in self.picked.items():
            if entry.outputs and os.path.isabs(entry.outputs):
                stem = self.outputs.stem_of(entry.outputs)
                if stem is not None:
                    moved[key] = self.outputs.recorded(stem)
        if moved:
            self.journal.set_outputs(moved)
            self.picked.update({key: replace(self.picked[key], outputs=outputs) for key, outputs in moved.items()})

    def seen(self, key: str, name: str) -> None:
        """A micrograph found (not yet complete): listed in the journal unless it already is."""
        self.journal.mark_seen(key, name)

    def handed_on(self, key: str, name: str, size: int | None, mtime_ns: int | None) -> None:
        """Handed to the pipeline as the file of this size and mtime (what a crash while it is in hand is counted against)."""
        self.journal.mark_processing(key, name, size, mtime_ns)

    def record(self, done: Done, key: str, model: str | None, figures: Callable[[], str] | None = None) -> int:
        """Record a finished job; returns 1 when it was picked."""
        job = done.job
        if done.rolled_back:
            if key not in self.repick:  # one due to be picked again stays picked (and listed) meanwhile
                self.journal.mark_unstarted(key, job.name)
            return 0
        self.retry_after.pop(key, None)  # this attempt is over: only a new output failure waits again
        if done.changed:
            log.warning("%s changed while it was picked: looking at it again once it is stable", shown(key))
            self.journal.mark_unstarted(key, job.name)
            return 0
        if done.error is not None:
            if key in self.picked and not done.output_error:  # picked before, failed now: no longer counted or listed
                self._unlist(key)
            if done.output_error:  # not the micrograph's fault: retried later, and at the next start
                self.retry_after[key] = time.monotonic() + OUTPUT_RETRY_S
                self.failed(key, job.name, done.error, None, None, "output")
            else:
                self.failed(key, job.name, done.error, job.size, job.mtime_ns, done.kind)
            return 0
        if not os.path.lexists(job.path):  # deleted (or moved away) while it was picked: nothing to list it for
            return self._discard(key, job.stem)
        result = done.picks
        timings = {**result.timings_s, "latency": done.latency_s}
        outputs = self.outputs.recorded(job.stem)
        session = (result.session or {}).get("id")
        self.journal.mark_picked(key, job.name, len(result), outputs, timings, job.size, job.mtime_ns, job.ino, model, session,
                                 job.fingerprint, job.ctime_ns)
        before = self.picked.get(key)
        self.picked[key] = Entry(key, job.name, "picked", job.size, job.mtime_ns, len(result), outputs, None, None, self.config_hash, job.ino,
                                 model, 0, 0, job.fingerprint, job.ctime_ns)
        self.repick.discard(key)
        if key in self.failed_keys:
            self.failed_keys.discard(key)
            self.progress.failed = len(self.failed_keys)
        if before is None:
            self.progress.picked(len(result), done.latency_s)
        else:
            self.progress.repicked(before.particles or 0, len(result), done.latency_s)
        self.index_stale = True
        if self.on_picked is not None:
            self.on_picked(job.path, len(result))
        log.info("picked %s: %d particles, on disk %.2f s after it was complete%s", shown(key), len(result), done.latency_s,
                 f" | {figures()}" if figures else "")
        return 1

    def _discard(self, key: str, stem: str) -> int:
        removed = self.outputs.remove_micrograph(stem)
        if key in self.picked:
            self._unlist(key)
        self.journal.forget(key)
        log.warning("%s was deleted (or moved away) while it was picked: its picks are not kept (%d files removed)", shown(key), removed)
        return 0

    def failed(self, key: str, name: str, reason: str, size: int | None, mtime_ns: int | None, kind: str = "micrograph") -> None:
        self.journal.mark_failed(key, journal_key(name), journal_key(reason), size, mtime_ns, kind)
        self.failed_keys.add(key)
        self.progress.failed = len(self.failed_keys)
        if self.on_failed is not None:
            self.on_failed(key, size, mtime_ns, kind)
        log.error("failed %s: %s%s", shown(key), reason, RETRY_TEXT.get(kind, "; tried again if it changes"))

    def forget_gone(self, exists: Callable[[str], bool]) -> list[str]:
        """Failed micrographs whose file no longer exists are forgotten (neither listed in failed.txt nor counted); returns them."""
        gone = sorted(key for key in self.failed_keys if not exists(key))
        if gone:
            self.journal.forget_failed(gone)
            self.failed_keys.difference_update(gone)
            self.progress.failed = len(self.failed_keys)
            log.info("forgot %d failed micrographs that no longer exist (e.g. %s)", len(gone), shown(gone[0]))
        return gone

    def still_current(self, key: str, name: str, stat: os.stat_result, path: Path) -> bool:
        """A picked file is still the version that was picked (moved or copied counts as the same); one that changed
        since (replaced, rewritten, truncated) loses its outputs and is picked again (False)."""
        entry = self.picked[key]
        if entry.size is None or not changed_since_picked(entry, stat, path):
            if (entry.size, entry.ino, entry.ctime_ns) != (stat.st_size, stat.st_ino, stat.st_ctime_ns):  # an older journal's, or moved
                self.adopted.append((key, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns))
                self.picked[key] = replace(entry, size=stat.st_size, mtime_ns=stat.st_mtime_ns, ino=stat.st_ino, ctime_ns=stat.st_ctime_ns)
            return True
        removed = self._remove_outputs(entry)
        log.warning("%s changed since it was picked (replaced or rewritten): picking it again%s", shown(key),
                    f"; its {removed} old output files are removed" if removed else "")
        self.journal.mark_unstarted(key, name)
        self._unlist(key)
        return False

    def _unlist(self, key: str) -> None:
        entry = self.picked.pop(key)
        self.repick.discard(key)
        self.progress.count -= 1
        self.progress.particles -= entry.particles or 0
        self.index_stale = True

    def _remove_outputs(self, entry: Entry) -> int:
        stem = self.outputs.stem_of(entry.outputs)
        return 0 if stem is None else self.outputs.remove_micrograph(stem)

    def adopt(self) -> None:
        """Record the stat of files an older journal picked without one (after a scan)."""
        self.journal.adopt(self.adopted)
        self.adopted.clear()

    def pick_again(self, keys: list[str]) -> None:
        """``keys``, marked in the journal to be picked again, stay picked and listed until they are (the next scan queues them)."""
        self.repick.update(key for key in keys if key in self.picked)

    def repick_other_sessions(self, session: str, model: str | None) -> list[str]:
        """What ``model`` picked with another (provisional) session than ``session`` is to be picked again; returns the keys."""
        again = self.journal.unpick_other_sessions(session, model)
        self.pick_again(again)
        return again

    def repick_other_models(self, model: str) -> list[str]:
        """What another model than ``model`` picked is to be picked again; returns the keys."""
        again = self.journal.unpick_other_models(model)
        self.pick_again(again)
        return again

    def set_adaptation(self, state: str, micrographs: list[str], bundle: str | None = None, model: str | None = None,
                       attempts: int = 0, reason: str | None = None) -> None:
        """The adaptation's state (see :class:`~emmae.runtime.stream.journal.Adaptation`)."""
        self.journal.set_adaptation(state, micrographs, bundle, model, attempts, reason)

    def count_crash(self, key: str, limit: int, stat: os.stat_result | None = None) -> bool:
        """The micrograph in hand when the daemon last died: one more attempt counted (a clean pick resets the count);
        after ``limit``, failed with its reason as the version that was handed on (else the file as it is now, ``stat``),
        so it is not picked again until it changes. Returns True when it was failed."""
        attempts = self.journal.count_attempt(key)
        if attempts < limit:
            log.warning("%s was being picked when the daemon stopped without warning (%d of %d attempts)", shown(key), attempts, limit)
            return False
        entry = self.journal.get(key)
        size, mtime_ns = (entry.size, entry.mtime_ns) if entry is not None and entry.size is not None else (None, None)
        if size is None and stat is not None:
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        if key in self.picked:
            self._unlist(key)
        self.failed(key, entry.name if entry else key, f"the daemon died while picking it, {attempts} times (a crash in a native library, "
                    "or out of memory?); check the file, then touch it to try again", size, mtime_ns, "micrograph")
        return True

    def wants(self, key: str, stat: os.stat_result, path: Path) -> bool:
        """The file still needs picking: not picked as this version (or due to be picked again), not failed unchanged."""
        if key in self.picked:
            return key in self.repick or changed_since_picked(self.picked[key], stat, path)
        return self.journal.wants(key, stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def write_index(self, config: EmmaeConfig) -> None:
        """The index files of every micrograph picked so far whose outputs are on disk (O(picked): the caller limits how often).

        ``autopick.star`` always lists them all. The picks of micrographs an earlier run picked are read back from their
        saved files at most ``ROWS_READ_PER_INDEX`` per rewrite (a long session's restart is not held up): until all are,
        ``particles.star`` and ``micrographs.star`` lack the rest and the index stays due.
        """
        rows, budget = [], ROWS_READ_PER_INDEX
        for entry in self.journal.picked():
            stem = self.outputs.stem_of(entry.outputs)
            if unsafe_name("", entry.name) or stem is None or not self.outputs.path(stem).exists():
                continue
            if not self.outputs.remembers(stem):
                if budget > 0:
                    remember_saved(self.outputs, stem, config)
                budget -= 1
            rows.append(replace(self.outputs.row(stem), name=entry.name))
        self.outputs.write_index(rows, config, self.project)
        self.index_stale = budget < 0

    def report_failed(self) -> None:
        """The final summary of failures: each failed micrograph with its reason, also written to ``failed.txt``."""
        failed = self.journal.failed()
        try:
            path = self.outputs.write_failed([Failure(shown(e.path), e.kind or "micrograph", shown(e.reason or "")) for e in failed])
        except OutputError as exc:
            log.error("cannot write the list of failed micrographs: %s", exc)
            path = None
        if not failed:
            return
        log.warning("%d micrographs failed%s:", len(failed), f" (listed in {path})" if path else "")
        for entry in failed[:FAILED_SHOWN]:
            log.warning("  %s: %s", shown(entry.path), shown(entry.reason or ""))
        if len(failed) > FAILED_SHOWN:
            log.warning("  ... and %d more", len(failed) - FAILED_SHOWN)


def recount_particles(outputs: OutputFolder, counts: dict[str, int]) -> None:
    """A stream's journal (when the folder has one) records the particles of each micrograph as re-picked (stem -> count),
    e.g. by ``emmae-pick --rethreshold``."""
    if not (outputs.root / FILENAME).is_file():
        return
    journal = Journal(outputs.root)
    try:
        journal.set_particles({e.path: counts[stem] for e in journal.picked() if (stem := outputs.stem_of(e.outputs)) in counts})
    finally:
        journal.close()
