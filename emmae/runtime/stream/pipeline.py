"""The daemon's picking pipeline: the stages of :func:`emmae.runtime.jobs.pick_job` in threads, joined by bounded queues.

    read (read + preprocess)  ->  pick (encode, cluster, post-process)  ->  write (outputs, atomic)

One thread per stage, so the disk, the CPU and the accelerator overlap: while micrograph
i is encoded, i+1 is read and preprocessed and i-1 is written. Only the pick thread
touches the onnxruntime session. Every queue holds at most ``depth`` micrographs, and
:meth:`Pipeline.submit` refuses work when the first one is full (back-pressure: memory is
bounded whatever the backlog). Results come back, in completion order, through
:meth:`Pipeline.collect` to the caller's thread, which owns the journal.

On :meth:`Pipeline.cancel` the micrograph being encoded is finished and written; those
not yet started come back as ``rolled_back`` so the journal can return them to ``seen``.
A micrograph that changed while it was read comes back as ``changed`` (looked at again,
never recorded as picked from a half-written or replaced file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from emmae.errors import EmmaeError
from emmae.io.atomic import write_bytes_atomic
from emmae.runtime.jobs import Done, Job, Picker, failed, pick_read, read_job, write_job
from emmae.runtime.outputs import OutputFolder

log = logging.getLogger("emmae.stream")
_END = object()


class InHand:
    """The micrograph the pick stage holds, in a small file: one named there at a start was in hand when the daemon died.

    The micrograph is named relative to ``base`` (the watched folder), so a session moved
    or copied between a crash and the next start still counts the crash against it.
    """

    def __init__(self, path: Path, base: Path | None = None) -> None:
        self.path, self.base = path, base

    def hold(self, micrograph: Path) -> None:
        named = os.path.relpath(micrograph, self.base) if self.base is not None else os.fspath(micrograph)
        write_bytes_atomic(self.path, os.fsencode(named))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def holding(self, micrograph: Path) -> Iterator[None]:
        """``micrograph`` is in hand inside (see :func:`emmae.runtime.jobs.pick_read`)."""
        self.hold(micrograph)
        try:
            yield
        finally:
            self.release()

    def left(self) -> Path | None:
        """The micrograph a dead daemon held (the file is then removed), or None."""
        try:
            held = Path(os.fsdecode(self.path.read_bytes()))
        except OSError:
            return None
        self.release()
        return held if held.is_absolute() or self.base is None else Path(os.path.normpath(self.base / held))


class Pipeline:
    """Three worker threads and their bounded queues; see the module docstring."""

    def __init__(self, picker: Picker, outputs: OutputFolder, depth: int, on_done: Callable[[], None] | None = None,
                 in_hand: InHand | None = None) -> None:
        self.picker, self.outputs, self.in_hand = picker, outputs, in_hand
        if in_hand is not None:
            picker.holding = in_hand.holding
        self._on_done = on_done or (lambda: None)
        self._inbox: queue.Queue = queue.Queue(maxsize=depth)
        self._prepared: queue.Queue = queue.Queue(maxsize=depth)
        self._picked: queue.Queue = queue.Queue(maxsize=depth)
        self._done: queue.Queue[Done] = queue.Queue()  # holds at most the jobs in flight
        self._cancel = threading.Event()
        self.in_flight = 0  # submitted and not yet collected (the caller's thread only)
        stages = [
            ("read", self._prepare, self._inbox, self._prepared, True),
            ("pick", self._pick, self._prepared, self._picked, True),
            ("write", self._write, self._picked, None, False),
        ]
        self._threads = [threading.Thread(target=self._run_stage, args=s[1:], name=f"emmae-{s[0]}", daemon=True) for s in stages]
        for thread in self._threads:
            thread.start()

    @property
    def builder(self):
        """The stream's session builder (None when the picker's session is fixed)."""
        return self.picker.builder

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

    def _prepare(self, job: Job) -> tuple[Job, object]:
        return job, read_job(job, self.picker)

    def _pick(self, item: tuple[Job, object]) -> tuple[Job, object, object]:
        job, prepared = item
        return (job, *pick_read(job, prepared, self.picker))  # a crash while it is encoded or picked is counted against it

    def _write(self, item: tuple) -> Done:
        job, picks, sample = item
        return write_job(job, picks, self.picker, self.outputs, sample)

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
