"""The daemon's picking pipeline: three stages in threads, joined by bounded queues.

    prepare (read + preprocess)  ->  pick (encode, cluster, post-process)  ->  write (outputs, atomic)

One thread per stage, so the disk, the CPU and the accelerator overlap: while micrograph
i is encoded, i+1 is read and preprocessed and i-1 is written. Only the pick thread
touches the onnxruntime session. Every queue holds at most ``depth`` micrographs, and
:meth:`Pipeline.submit` refuses work when the first one is full (back-pressure: memory is
bounded whatever the backlog). Results come back, in completion order, through
:meth:`Pipeline.collect` to the caller's thread, which owns the journal.

On :meth:`Pipeline.cancel` the micrograph being encoded is finished and written; those
not yet started come back as ``rolled_back`` so the journal can return them to ``seen``.

Before a micrograph is read, its header's dimensions are checked against the particle
diameter (:func:`check_job`: nothing is allocated for a micrograph that cannot hold
particles); after it is read, its size, mtime, ctime and inode are compared with those
the gate saw, and a micrograph that changed meanwhile comes back as ``changed`` (it is
looked at again, never recorded as picked from a half-written or replaced file).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emmae.config import EmmaeConfig, resolve_diameter_px
from emmae.errors import ConfigError, EmmaeError, MicrographError, MicrographSizeError
from emmae.io.mrc import MrcLayout, check_dimensions, read_layout
from emmae.runtime.encoder import Encoder
from emmae.runtime.picker import Picks, Prepared, StreamSession, finish, prepare
from emmae.runtime.stream.gate import signature

log = logging.getLogger("emmae.stream")
_END = object()


@dataclass(frozen=True)
class Job:
    """A micrograph that passed the completeness gate."""

    path: Path
    name: str
    size: int
    mtime_ns: int
    ready_at: float  # time.time() when the gate let it through
    ctime_ns: int = 0
    ino: int = 0

    @property
    def signature(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.ctime_ns, self.ino


class ChangedError(EmmaeError):
    """The file changed (written to, replaced, truncated) while it was being read."""


def check_job(job: Job, config: EmmaeConfig) -> float:
    """The particle diameter in pixels, once the header says the micrograph can hold such particles.

    Raises:
        ConfigError: no usable diameter (no pixel size for ``diameter_A``).
        MicrographSizeError: too small for the diameter, or absurdly elongated.
        MicrographError: the header cannot be read.
    """
    return check_layout(job.path, read_layout(job.path), config)


def check_layout(path: Path, layout: MrcLayout, config: EmmaeConfig) -> float:
    """:func:`check_job` of a header already read."""
    header_px = None if layout.pixel_size_xy_A is None else float((layout.pixel_size_xy_A[0] * layout.pixel_size_xy_A[1]) ** 0.5)
    diameter_px = resolve_diameter_px(config.preprocess, header_px)
    check_dimensions(path, layout, diameter_px)
    return diameter_px


def unchanged(job: Job) -> bool:
    """The file still has the size, mtime, ctime and inode the gate saw."""
    try:
        return signature(os.stat(job.path)) == job.signature
    except OSError:
        return False


def failure_kind(exc: BaseException) -> str:
    """Whose fault a failure is: ``config`` (the settings), ``micrograph`` (the file) or ``unexpected``."""
    if isinstance(exc, (ConfigError, MicrographSizeError)) and not _elongated(exc):
        return "config"  # another diameter or pixel size may do: tried again when the configuration changes
    if isinstance(exc, MicrographError):
        return "micrograph"
    return "unexpected"


def _elongated(exc: BaseException) -> bool:
    return isinstance(exc, MicrographSizeError) and exc.reason.startswith("absurdly elongated")


@dataclass(frozen=True)
class Done:
    """What became of a job: ``picks`` (outputs on disk), an ``error``, or ``rolled_back``."""

    job: Job
    picks: Picks | None = None
    error: str | None = None
    output_error: bool = False  # the micrograph was fine; writing its outputs failed (e.g. a full disk)
    rolled_back: bool = False
    changed: bool = False  # the file changed while it was read: looked at again, not recorded
    kind: str = "micrograph"  # of an error: see failure_kind
    finished_at: float = 0.0

    @property
    def latency_s(self) -> float:
        """From the gate letting the file through to its outputs on disk."""
        return self.finished_at - self.job.ready_at


def failed(job: Job, exc: BaseException) -> Done:
    """What became of ``job`` when reading or picking it raised ``exc``."""
    if isinstance(exc, ChangedError):
        return Done(job, error=str(exc), changed=True, finished_at=time.time())
    if isinstance(exc, EmmaeError):
        reason = exc.reason if isinstance(exc, MicrographError) else str(exc)
        return Done(job, error=reason, kind=failure_kind(exc), finished_at=time.time())
    return Done(job, error=f"unexpected error: {exc!r}", kind="unexpected", finished_at=time.time())


def unwritten(job: Job, exc: OSError) -> Done:
    """What became of ``job`` when writing its outputs raised ``exc`` (e.g. a full disk: retried later)."""
    return Done(job, error=f"cannot write the outputs of {job.path}: {exc}", output_error=True, finished_at=time.time())


Writer = Callable[[Job, Picks], None]


class Pipeline:
    """Three worker threads and their bounded queues; see the module docstring."""

    def __init__(self, config: EmmaeConfig, encoder: Encoder, write: Writer, depth: int, on_done: Callable[[], None] | None = None,
                 session: StreamSession | None = None) -> None:
        self.config, self.encoder, self.write = config, encoder, write
        self.session = session  # the stream's session; None: each micrograph fits its own
        self._on_done = on_done or (lambda: None)
        self._inbox: queue.Queue = queue.Queue(maxsize=depth)
        self._prepared: queue.Queue = queue.Queue(maxsize=depth)
        self._picked: queue.Queue = queue.Queue(maxsize=depth)
        self._done: queue.Queue[Done] = queue.Queue()  # holds at most the jobs in flight
        self._cancel = threading.Event()
        self.in_flight = 0  # submitted and not yet collected (the caller's thread only)
        stages = [
            ("prepare", self._prepare, self._inbox, self._prepared, True),
            ("pick", self._pick, self._prepared, self._picked, True),
            ("write", self._write, self._picked, None, False),
        ]
        self._threads = [threading.Thread(target=self._run_stage, args=s[1:], name=f"emmae-{s[0]}", daemon=True) for s in stages]
        for thread in self._threads:
            thread.start()

    def has_room(self) -> bool:
        return not self._inbox.full()

    def submit(self, job: Job) -> bool:
        """Hand a job to the first stage; False (and nothing queued) when it is full."""
        try:
            self._inbox.put_nowait(job)
        except queue.Full:
            return False
        self.in_flight += 1
        return True

    def collect(self) -> list[Done]:
        """Every result finished since the last call (does not wait)."""
        results = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(results)
        return results

    def cancel(self) -> None:
        """Roll back every job not yet started; the one being encoded is finished."""
        self._cancel.set()

    def close(self) -> list[Done]:
        """Let the queued jobs through (or roll them back after :meth:`cancel`), stop the threads, return the last results."""
        self._inbox.put(_END)
        for thread in self._threads:
            thread.join()
        return self.collect()

    # --- stages -----------------------------------------------------------------------------

    def _prepare(self, job: Job) -> tuple[Job, Prepared]:
        check_job(job, self.config)  # before anything is allocated for it
        prepared = prepare(job.path, self.config, self.encoder, name=job.name)
        if not unchanged(job):
            raise ChangedError(f"{job.path} changed while it was read")
        return job, prepared

    def _pick(self, item: tuple[Job, Prepared]) -> tuple[Job, Picks]:
        job, prepared = item
        if self.session is not None:
            return job, self.session.pick(prepared)
        return job, finish(prepared, self.config, self.encoder)

    def _write(self, item: tuple[Job, Picks]) -> Done:
        job, picks = item
        try:
            self.write(job, picks)
        except OSError as exc:
            return unwritten(job, exc)
        return Done(job, picks=picks, finished_at=time.time())

    def _run_stage(self, work: Callable, inbox: queue.Queue, outbox: queue.Queue | None, cancellable: bool) -> None:
        while True:
            item = inbox.get()
            if item is _END:
                if outbox is not None:
                    outbox.put(_END)
                return
            job = item if isinstance(item, Job) else item[0]
            if cancellable and self._cancel.is_set():
                self._finish(Done(job, rolled_back=True, finished_at=time.time()))
                continue
            try:
                result = work(item)
            except EmmaeError as exc:  # a bad micrograph (MicrographError), an unusable diameter, a file that changed
                result = failed(job, exc)
            except Exception as exc:  # noqa: BLE001 - recorded, and the daemon goes on with the next micrograph
                log.exception("unexpected error on %s", job.path)
                result = failed(job, exc)
            if isinstance(result, Done):
                self._finish(result)
            else:
                outbox.put(result)  # blocks while the next stage is busy and its queue full: back-pressure

    def _finish(self, done: Done) -> None:
        self._done.put(done)
        self._on_done()
