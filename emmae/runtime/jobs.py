"""One way to pick a micrograph: admit it once, then :func:`pick_job` (read -> encode -> pick -> write).

A :class:`Job` is a micrograph admitted once (:func:`admit`): its header parsed and
checked against the file's size and against the particle diameter, the result carried
by the job, so nothing downstream parses or sizes the file again. :func:`pick_job` is the
whole walk of one job; its three stages (:func:`read_job`, :func:`pick_read`,
:func:`write_job`) are what the daemon's threaded pipeline runs on its threads, and
:func:`pick_job` is what a Dask task runs. Every failure becomes a :class:`Done` with
its reason and whose fault it was; nothing here raises for a bad micrograph.

:func:`run_batch` drives ``emmae-pick`` over an executor (:class:`LocalExecutor` here, the
Dask one in :mod:`emmae.runtime.distributed`): the session is fitted on samples spread
over the batch, every job is picked, and the output folder's index files list them in
input order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from emmae.config import EmmaeConfig, resolve_diameter_px
from emmae.errors import ConfigError, EmmaeError, MicrographError, MicrographSizeError
from emmae.io.mrc import MrcLayout, check_dimensions, sized_layout
from emmae.io.picks import Picks
from emmae.runtime.outputs import INDEX_FILE, Failure, IndexRow, OutputFolder
from emmae.runtime.picking.builder import SessionBuilder
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import Encoded, Prepared, encode, needs_session, pick, prepare, repick, session_sample, session_sample_indices
from emmae.runtime.picking.session import Session, SessionSample, fit_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A micrograph to pick, admitted once: where it is, the names it is written under, and what admission found."""

    path: Path
    name: str  # written as _rlnMicrographName
    stem: str  # its outputs' place in the output folder
    layout: MrcLayout | None = None  # the header, parsed and checked against the file's size
    diameter_px: float | None = None  # the particle diameter in its pixels
    size: int = 0  # the file as admitted (a stream compares it after reading: a file that changed is looked at again)
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    ready_at: float = field(default_factory=time.time)  # time.time() when it was admitted
    fingerprint: str | None = None  # of its content (emmae.io.inputs.content_fingerprint), when a stream needs to know it again

    @property
    def signature(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.ctime_ns, self.ino


def signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is written, replaced or truncated: size, mtime, ctime, inode."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


class ChangedError(EmmaeError):
    """The file changed (written to, replaced, truncated) while it was being read."""


def check_layout(path: Path, layout: MrcLayout, config: EmmaeConfig) -> float:
    """The particle diameter in pixels, once the header says the micrograph can hold such particles.

    Raises:
        ConfigError: no usable diameter (no pixel size for ``diameter_A``).
        MicrographSizeError: too small for the diameter, or absurdly elongated.
    """
    header_px = None if layout.pixel_size_xy_A is None else math.sqrt(layout.pixel_size_xy_A[0] * layout.pixel_size_xy_A[1])  # as read
    diameter_px = resolve_diameter_px(config.preprocess, header_px)
    check_dimensions(path, layout, diameter_px)
    return diameter_px


def admit(path: Path, name: str, stem: str, config: EmmaeConfig, layout: MrcLayout | None = None, stat: os.stat_result | None = None,
          diameter_px: float | None = None) -> Job:
    """A :class:`Job` for ``path``: its header parsed and sized once (unless ``layout`` is the caller's, e.g. the gate's),
    its dimensions checked against the particle diameter before anything is allocated for it (unless the caller checked
    that ``layout`` already: ``diameter_px``, its result).

    Raises:
        MicrographError: not a complete, single-section MRC, or too small or elongated for the particles.
        ConfigError: no usable particle diameter.
        FileNotFoundError: no such file.
    """
    if layout is None or diameter_px is None:
        layout = layout if layout is not None else sized_layout(path)
        diameter_px = check_layout(path, layout, config)
    stat = stat if stat is not None else os.stat(path)
    return Job(Path(path), name, stem, layout, diameter_px, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def unchanged(job: Job) -> bool:
    """The file still has the size, mtime, ctime and inode it was admitted with."""
    try:
        return signature(os.stat(job.path)) == job.signature
    except OSError:
        return False


def failure_kind(exc: BaseException) -> str:
    """Whose fault a failure is: ``config`` (the settings), ``micrograph`` (the file) or ``unexpected``."""
    if isinstance(exc, (ConfigError, MicrographSizeError)) and not _never_fits(exc):
        return "config"  # another diameter or pixel size may do: tried again when the configuration changes
    if isinstance(exc, (MicrographError, FileNotFoundError)):
        return "micrograph"
    return "unexpected"


def _never_fits(exc: BaseException) -> bool:
    """Too elongated or too large whatever the diameter: the micrograph's fault, not the configuration's."""
    return isinstance(exc, MicrographSizeError) and exc.reason.startswith(("absurdly elongated", "too large"))


def reason_of(exc: BaseException) -> str:
    """One line saying why ``exc`` stopped a micrograph."""
    if isinstance(exc, MicrographError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, EmmaeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"unexpected error: {exc!r}"


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
    sample: SessionSample | None = None  # the micrograph's session sample, when the picker was asked to keep it

    @property
    def latency_s(self) -> float:
        """From admission to the outputs on disk."""
        return self.finished_at - self.job.ready_at


def failed(job: Job, exc: BaseException) -> Done:
    """What became of ``job`` when reading or picking it raised ``exc``."""
    if isinstance(exc, ChangedError):
        return Done(job, error=str(exc), changed=True, finished_at=time.time())
    return Done(job, error=reason_of(exc), kind=failure_kind(exc), finished_at=time.time())


def unwritten(job: Job, exc: OSError) -> Done:
    """What became of ``job`` when writing its outputs raised ``exc`` (e.g. a full disk: retried later)."""
    return Done(job, error=f"cannot write the outputs of {job.path}: {exc}", output_error=True, finished_at=time.time())


@dataclass
class Picker:
    """What picks a job: the configuration, the opened encoder, and the session (fixed, or grown by a builder)."""

    config: EmmaeConfig
    encoder: Encoder
    session: Session | None = None
    builder: SessionBuilder | None = None  # a stream's: the session grows from the first micrographs
    keep_samples: bool = False  # hand each micrograph's session sample back (a cluster's client grows the session)
    encoded: dict[Path, Encoded] = field(default_factory=dict)  # session samples encoded ahead, kept for their pick
    holding: Callable[[Path], contextlib.AbstractContextManager[None]] | None = None  # a stream's in-hand marker (see pick_read)

    def session_for(self, encoded: Encoded) -> tuple[Session | None, SessionSample | None]:
        """The session to pick ``encoded`` with, and its sample when one was taken.

        Raises:
            ValueError: the configuration needs a session and the picker has neither one nor a builder.
        """
        if not needs_session(self.config):
            return None, None
        if self.session is not None and not self.keep_samples:
            return self.session, None
        sample = session_sample(encoded, self.config, self.encoder)
        if self.session is not None:
            return self.session, sample
        if self.builder is None:
            raise ValueError("this configuration picks with a session: give the picker one, or a builder")
        return self.builder.add(sample, name=encoded.prepared.label), sample


def read_job(job: Job, picker: Picker) -> Prepared:
    """Read and preprocess a job (the header and the particle diameter as admitted). Raises MicrographError, ConfigError,
    ChangedError."""
    prepared = prepare(job.path, picker.config, picker.encoder, name=job.name, layout=job.layout, diameter_px=job.diameter_px)
    if job.size and not unchanged(job):
        raise ChangedError(f"{job.path} changed while it was read")
    return prepared


def pick_read(job: Job, prepared: Prepared, picker: Picker) -> tuple[Picks, SessionSample | None]:
    """Encode (unless encoded ahead for the session) and pick a read job; with its session sample when one was taken.

    Encoding and picking run inside ``picker.holding(path)`` (a crash there counts against the micrograph); fitting
    the session does not (it works on every sample so far, not on this micrograph alone).
    """
    held = picker.holding or _not_held
    with held(job.path):
        encoded = picker.encoded.pop(job.path, None) or encode(prepared, picker.encoder)
    session, sample = picker.session_for(encoded)
    with held(job.path):
        return pick(encoded, picker.config, picker.encoder, session), sample


def _not_held(_path: Path) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def write_job(job: Job, picks: Picks, picker: Picker, outputs: OutputFolder, sample: SessionSample | None = None) -> Done:
    """Write a picked job's files into ``outputs``."""
    try:
        outputs.write_micrograph(job.stem, picks, picker.config, job.path, job.layout)
    except MicrographError as exc:  # the micrograph vanished before its preview was drawn
        outputs.remove_micrograph(job.stem)
        return failed(job, exc)
    except OSError as exc:
        return unwritten(job, exc)
    return Done(job, picks=picks, finished_at=time.time(), sample=sample)


def remember_saved(outputs: OutputFolder, stem: str, config: EmmaeConfig) -> None:
    """Have ``outputs`` remember the index row of ``stem``'s saved picks (an earlier run's), cut under ``config`` without
    encoding; a row without picks (listed in ``autopick.star`` only) when they cannot be read."""
    try:
        picks = repick(outputs.load(stem), config)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: its saved picks cannot be read (%s); listed in %s only", stem, exc, INDEX_FILE)
        picks = None
    outputs.remember(stem, picks, config)


def pick_job(job: Job, picker: Picker, outputs: OutputFolder) -> Done:
    """The whole walk of one job: read, encode, pick, write. Never raises for the micrograph's sake."""
    try:
        prepared = read_job(job, picker)
        picks, sample = pick_read(job, prepared, picker)
    except Exception as exc:  # noqa: BLE001 - a bad micrograph is recorded; the run goes on
        if not isinstance(exc, (EmmaeError, OSError)):
            log.exception("unexpected error on %s", job.path)
        return failed(job, exc)
    return write_job(job, picks, picker, outputs, sample)


# --- the batch driver --------------------------------------------------------------------------------


class Executor(Protocol):
    """Where a batch's jobs run: this process, or a cluster's workers."""

    def samples(self, jobs: list[Job]) -> list[tuple[Job, SessionSample | BaseException]]:
        """Each job's session sample (its encoding kept where it was made, for its pick), or why not."""

    def pick(self, jobs: list[Job], session: Session | None, outputs: OutputFolder) -> Iterator[Done]:
        """Pick and write every job, yielding each as it is done."""


class LocalExecutor:
    """Jobs picked one after the other in this process, with one opened encoder."""

    def __init__(self, config: EmmaeConfig, encoder: Encoder) -> None:
        self.picker = Picker(config, encoder)

    @property
    def patch_px(self) -> int:
        return self.picker.encoder.bundle.info.patch_px

    def samples(self, jobs: list[Job]) -> list[tuple[Job, SessionSample | BaseException]]:
        found: list[tuple[Job, SessionSample | BaseException]] = []
        for i, job in enumerate(jobs, 1):
            try:
                encoded = encode(read_job(job, self.picker), self.picker.encoder)
            except (EmmaeError, OSError) as exc:
                found.append((job, exc))
                continue
            self.picker.encoded[job.path] = encoded  # encoded once: picked from this
            found.append((job, session_sample(encoded, self.picker.config, self.picker.encoder)))
            log.info("session sample %d of %d read and encoded: %s", i, len(jobs), job.path.name)
        return found

    def pick(self, jobs: list[Job], session: Session | None, outputs: OutputFolder) -> Iterator[Done]:
        self.picker.session = session
        for job in jobs:
            yield pick_job(job, self.picker, outputs)


@dataclass
class BatchResult:
    """What a batch did: the jobs picked (input order), the failures, and whether the output folder stopped it."""

    picked: list[Done] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped early (outputs could not be written)


def fit_batch_session(jobs: list[Job], executor: Executor, config: EmmaeConfig, outputs: OutputFolder, patch_px: int) -> Session | None:
    """The batch's session, fitted on ``cluster.session_micrographs`` jobs spread over it and written to the output folder.

    None when the configuration needs none or no sample could be read. Raises OutputError.
    """
    if not needs_session(config):
        return None
    chosen = [jobs[i] for i in session_sample_indices(len(jobs), config.cluster.session_micrographs)]
    if chosen:
        log.info("fitting the session on %d micrographs", len(chosen))
    samples, used = [], []
    for job, sample in executor.samples(chosen):
        if isinstance(sample, BaseException):
            log.warning("session sample %s left out: %s", job.path, reason_of(sample))
            continue
        samples.append(sample)
        used.append(str(job.path))
    if not samples:
        return None
    session = fit_session(samples, config, patch_px)
    outputs.write_session(session, used)
    return session


def run_batch(jobs: list[Job], executor: Executor, config: EmmaeConfig, outputs: OutputFolder, patch_px: int,
              rejected: Iterable[Failure] = (), progress: Callable[[Iterator[Done]], Iterable[Done]] | None = None) -> BatchResult:
    """Fit the session, pick every job, then write the index files (input order) and ``failed.txt``
    (``rejected``: micrographs refused at admission, listed first).

    A job whose outputs cannot be written (a full disk) stops the run; what was picked is indexed.
    ``progress``: wraps the stream of finished jobs (a progress bar), given the iterator.

    Raises:
        OutputError: the session file or the index files cannot be written.
    """
    session = fit_batch_session(jobs, executor, config, outputs, patch_px)
    result = BatchResult(failures=list(rejected))
    finished = executor.pick(jobs, session, outputs)
    for count, done in enumerate(progress(finished) if progress else finished, 1):
        if done.output_error:
            outputs.remove_micrograph(done.job.stem)
            result.stopped = done.error
            log.error("%s: stopping; %d micrographs were picked and are indexed", done.error, len(result.picked))
            break
        if done.error is not None:
            result.failures.append(Failure(str(done.job.path), done.kind, done.error))
            log.error("skipped %s: %s", done.job.path, done.error)
            continue
        result.picked.append(done)
        picks = done.picks
        outputs.remember(done.job.stem, picks, config)  # its index row, also when a cluster's worker wrote its files
        log.info("[%d/%d] %s: %d particles in %.2f s (pixel %s, diameter %.1f px)", count, len(jobs), done.job.path.name, len(picks),
                 sum(picks.timings_s.values()), "unknown" if picks.pixel_size_A is None else f"{picks.pixel_size_A:.4g} A", picks.diameter_px)
    order = {str(job.path): i for i, job in enumerate(jobs)}
    result.picked.sort(key=lambda done: order[str(done.job.path)])
    result.failures.sort(key=lambda failure: order.get(failure.micrograph, -1))
    outputs.write_index([outputs.row(done.job.stem) for done in result.picked], config)
    outputs.write_failed(result.failures)
    return result


__all__ = ["BatchResult", "ChangedError", "Done", "IndexRow", "Job", "LocalExecutor", "Picker", "admit", "pick_job", "remember_saved", "run_batch"]
