"""Is a file complete and sane? Each version of a file is judged once, and the verdict travels with its job.

:meth:`Admission.consider` takes one candidate of a scan: a name that can be written
safely, a file the journal still wants (not picked as this version, not failed
unchanged), a regular file, complete and stable (the :class:`~emmae.runtime.stream.gate.Gate`,
which parses its header and checks it against the file's size), and dimensions that can
hold the particles (:func:`emmae.runtime.jobs.admit`, with the gate's header). The job it
returns carries that header, so the file is not parsed or sized again downstream. A file
that failed unchanged is skipped without a query or a read.
"""

from __future__ import annotations

import os
import stat as stat_module
from dataclasses import replace
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import UnsafeNameError
from emmae.io.inputs import content_fingerprint
from emmae.io.layout import micrograph_name, output_stem, project_folder
from emmae.io.mrc import MrcLayout
from emmae.runtime.jobs import Job, admit, check_layout
from emmae.runtime.stream.gate import Gate, stat_regular
from emmae.runtime.stream.names import unsafe_name
from emmae.runtime.stream.recorder import Recorder
from emmae.runtime.stream.scanner import Scanner, any_stat


class Admission:
    """The completeness gate and the checks before a job; see the module docstring."""

    def __init__(self, config: EmmaeConfig, scanner: Scanner, recorder: Recorder) -> None:
        self.config, self.scanner, self.recorder = config, scanner, recorder
        self._watch = os.path.realpath(scanner.watch)  # one spelling of the folder, whichever the user gave
        # names are written relative to it (and the index's coordinate files)
        self.project_root = Path(os.path.realpath(project_folder(config.output, scanner.watch)))
        self.gate = Gate(config.stream.settle_s, config.stream.stale_after_s, vet=self._vet)
        self._vetted: dict[str, tuple[MrcLayout, float]] = {}  # path -> the header the gate vetted and its diameter in pixels
        # key -> ('seen' | 'failed', (size, mtime_ns), name) as last looked at
        self._known: dict[str, tuple[str, tuple[int, int], str | None]] = {}

    def _vet(self, path: Path, layout: MrcLayout) -> None:
        """The gate's check of a header against the particles (the only one: :func:`admit` is handed its result)."""
        self._vetted[str(path)] = (layout, check_layout(path, layout, self.config))

    def name(self, path: Path, name: str | None) -> str:
        """The name a micrograph is written under (:func:`emmae.io.layout.micrograph_name`, the rule of both commands):
        its path below the project root (``output.project_root``, else the watched folder's parent), through the folder's
        resolved spelling; a STAR's row keeps its own."""
        if name is not None:
            return name
        return micrograph_name(os.path.join(self._watch, self.scanner.key_text(path)), self.config.output, self.project_root)

    def consider(self, path: Path, name: str | None, key: str, stat: os.stat_result | None) -> Job | None:
        """A job for the file once it is complete and sane, else None (still settling, gone, picked, failed unchanged).

        Raises:
            MicrographError: the file will not do (unsafe name, not a regular file, not an MRC, too small, ...).
            ConfigError: no usable particle diameter for it.
            FileNotFoundError: it vanished meanwhile.
        """
        stat = stat if stat is not None else any_stat(path)
        if stat is None:
            self.forget(path, key)
            return None
        journal = self.recorder.journal
        picked = key in self.recorder.picked and key not in self.recorder.repick  # one due to be picked again goes through
        known = self._known.get(key)
        if known is not None and known[1] == (stat.st_size, stat.st_mtime_ns) and not picked:
            if known[0] == "failed":
                return None  # failed, unchanged: no query, no read
            name = known[2]  # named when it was first seen
        else:  # new this session, or changed: the name, the journal, the file's kind
            name = self.name(path, name)
            if picked and self.recorder.still_current(key, name, stat, Path(path)):
                return None  # picked, and still the version that was picked
            unsafe = unsafe_name(self.scanner.key_text(path), name)
            if unsafe:
                raise UnsafeNameError(path, unsafe)
            if not picked and not journal.wants(key, stat.st_size, stat.st_mtime_ns, stat.st_ino):
                self._known[key] = ("failed", (stat.st_size, stat.st_mtime_ns), None)
                return None
            if not stat_module.S_ISREG(stat.st_mode):
                stat_regular(path)  # a symlink loop, a FIFO or a device: failed, never opened
            self.recorder.seen(key, name)
            self._known[key] = ("seen", (stat.st_size, stat.st_mtime_ns), name)
        if self.gate.check(path, stat=stat) != "ready":
            return None
        layout = self.gate.take_layout(path)
        stat = stat_regular(path)
        if stat is None:
            return None
        self._known.pop(key, None)
        vetted = self._vetted.pop(str(path), None)
        diameter_px = vetted[1] if vetted is not None and vetted[0] is layout else None
        job = admit(Path(path), name, output_stem(name, path, self.scanner.watch), self.config, layout=layout, stat=stat,
                    diameter_px=diameter_px)
        return replace(job, fingerprint=content_fingerprint(path))

    def note_failed(self, key: str, size: int | None, mtime_ns: int | None, kind: str) -> None:
        """A failed file is not looked at again until it changes (an output failure is retried anyway)."""
        if size is not None and mtime_ns is not None and kind != "output":
            self._known[key] = ("failed", (size, mtime_ns), None)

    def forget(self, path: Path, key: str) -> None:
        self.gate.forget(path)
        self._known.pop(key, None)

    def clear(self) -> None:
        """Look at everything again (what a scan recorded was rolled back)."""
        self._known.clear()

    def next_due(self) -> float:
        """When a settling file will have been stable long enough to be looked at again (see ``Gate.next_due``)."""
        return self.gate.next_due()

    @property
    def pending(self) -> int:
        """Files still settling or incomplete."""
        return self.gate.pending
