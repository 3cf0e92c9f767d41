"""Picking on a Dask cluster (``--scheduler`` / ``--workers``): the worker plugin and the executors, nothing else.

Each worker opens the encoder once, when it joins (:class:`EncoderPlugin`, a Dask
worker plugin), and keeps it for its lifetime; tasks find it there. A task runs
:func:`emmae.runtime.jobs.pick_job` on a worker, which reads the micrograph and writes
its outputs itself (atomically, into the output folder on a shared file system) and
sends back what became of it; the client alone writes the index files, the session
file and the journal.

``emmae-pick``: :class:`DaskExecutor` is :func:`emmae.runtime.jobs.run_batch`'s
executor: the session samples are encoded on workers (and kept there for their pick),
the session is fitted on the client, then every job is picked by the cluster.
``emmae-stream``: :class:`ClusterPipeline` replaces the daemon's threads, with at most
``queue_depth`` micrographs in flight per worker. A worker that dies takes its running
task with it; the scheduler runs the task again on another worker, and the client
records the one result it gets.

Needs the ``dask`` extra (``dask.distributed``): importing this module without it
raises ImportError, which the commands turn into :data:`INSTALL`'s advice.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import replace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker, wait

from emmae.config import EmmaeConfig
from emmae.errors import ConfigError
from emmae.io.atomic import remove_stale_temporaries
from emmae.runtime.jobs import Done, Job, Picker, failed, pick_job, read_job
from emmae.backend import limit_cpu_threads
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.builder import SessionBuilder
from emmae.runtime.picking.bundle import open_bundle
from emmae.runtime.picking.encoder import Encoder, bundle_path
from emmae.runtime.picking.picker import encode, session_sample
from emmae.runtime.picking.session import Session, SessionSample

log = logging.getLogger("emmae.distributed")
PLUGIN_NAME = "emmae-encoder"
WORKERS_TTL_S = 5.0  # the stream asks the scheduler how many workers it has at most this often
INSTALL = "pip install 'cryo-emmae[dask]' (dask.distributed; add dask-jobqueue for SLURM/PBS, dask-cuda for one worker per GPU)"


def connect(scheduler: str | None, workers: int | None, threads: int | None = None) -> Any:
    """A ``distributed.Client`` of the cluster at ``scheduler``, or of a new local cluster of ``workers`` processes.

    ``threads``: CPU threads per local worker's encoder (default: the cores shared out).

    Raises:
        ConfigError: neither (or both) of scheduler and workers are given.
    """
    if (scheduler is None) == (workers is None):
        raise ConfigError("give either --scheduler ADDRESS or --workers N")
    if scheduler is not None:
        return Client(scheduler)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"EMMAE_ENCODER_THREADS": str(threads or max(1, (os.cpu_count() or 1) // workers))})
    return Client(cluster)


def close(client: Any) -> None:
    """Close the client and, for a local cluster, the cluster it started. Dask's own complaints while its connections
    close (e.g. ``CommClosedError``) are not the user's business: its loggers are quietened first."""
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


class EncoderPlugin(WorkerPlugin):
    """Opens the configured encoder once per worker, when the worker starts (or joins later)."""

    name = PLUGIN_NAME

    def __init__(self, config_json: str) -> None:
        self.config_json = config_json
        self.picker: Picker | None = None  # its encoded session samples are kept until their pick

    def setup(self, worker: Any) -> None:
        threads = int(os.environ.get("EMMAE_ENCODER_THREADS", "0")) or None
        limit_cpu_threads(threads)
        config = EmmaeConfig.model_validate_json(self.config_json)
        self.picker = Picker(config, Encoder.configured(config, threads))

    def teardown(self, worker: Any) -> None:
        self.picker = None


def register(client: Any, config: EmmaeConfig) -> None:
    """Give every worker (and every worker that joins later) its encoder."""
    client.register_plugin(EncoderPlugin(config.model_dump_json()), name=PLUGIN_NAME)


def _picker() -> Picker:
    return get_worker().plugins[PLUGIN_NAME].picker


def sample_task(job: Job) -> SessionSample:
    """On a worker: a job's session sample (its encoding is kept there for its pick)."""
    picker = _picker()
    encoded = encode(read_job(job, picker), picker.encoder)
    picker.encoded[job.path] = encoded
    return session_sample(encoded, picker.config, picker.encoder)


def batch_task(job: Job, out: str, session_json: str | None) -> Done:
    """On a worker: :func:`pick_job` with the batch's session (the outputs written by the worker)."""
    picker = replace(_picker(), session=Session.from_json(session_json) if session_json else None)  # the encodings are shared
    return pick_job(job, picker, OutputFolder(Path(out)))


class DaskExecutor:
    """:func:`emmae.runtime.jobs.run_batch`'s executor on a cluster: jobs picked by its workers, in any order."""

    def __init__(self, client: Any, config: EmmaeConfig) -> None:
        self.client, self.config = client, config
        self.patch_px = ClusterPipeline.patch_px_of(config)
        self._placed: dict[Path, str] = {}  # session sample -> the worker that holds its encoding
        register(client, config)

    def samples(self, jobs: list[Job]) -> list[tuple[Job, SessionSample | BaseException]]:
        futures = [self.client.submit(sample_task, job, pure=False) for job in jobs]
        found: list[tuple[Job, SessionSample | BaseException]] = []
        for job, future in zip(jobs, futures):
            try:
                found.append((job, future.result()))
            except Exception as exc:  # noqa: BLE001 - a sample that cannot be read is left out, with its reason
                found.append((job, exc))
                continue
            self._placed[job.path] = next(iter(self.client.who_has(future).get(future.key, ())), None)
        return found

    def pick(self, jobs: list[Job], session: Session | None, outputs: OutputFolder) -> Iterator[Done]:
        session_json = session.to_json() if session else None
        futures = {}
        for job in jobs:  # a session sample goes to the worker that holds its encoding (any other if it died)
            where = self._placed.get(job.path)
            placement = {"workers": [where], "allow_other_workers": True} if where else {}
            futures[self.client.submit(batch_task, job, str(outputs.root), session_json, pure=False, **placement)] = job
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths
                yield failed(futures[future], exc)
        left = remove_stale_temporaries(outputs.root)  # every task is over: these were being written by a worker that died
        if left:
            log.info("removed %d temporary files left by workers that died", len(left))


class ClusterPipeline:
    """The daemon's pipeline on a Dask cluster, with the interface of :class:`emmae.runtime.stream.pipeline.Pipeline`.

    Each job becomes one task (check, read, pick, write the outputs) on a worker; at
    most ``depth`` per worker are in flight. The stream's session is fitted here, on
    the client, from samples the workers send back with their first picks, as the
    threaded pipeline does (provisional at 1, 2, 4, ... micrographs, fixed after
    ``cluster.session_micrographs``).
    """

    def __init__(self, config: EmmaeConfig, client: Any, outputs: OutputFolder, depth: int, builder: SessionBuilder,
                 on_done: Callable[[], None] | None = None) -> None:
        self.config, self.client, self.outputs, self.depth = config, client, outputs, depth
        self._on_done = on_done or (lambda: None)
        self._results: queue.Queue = queue.Queue()
        self._flights: dict[str, tuple[Job, Any]] = {}  # task key -> (job, future), until the future is done
        self._lock = threading.Lock()
        self._cancelled = False
        self.in_flight = 0
        self._workers, self._workers_at = 1, -float("inf")
        self.builder = builder  # the stream's session, grown here from the workers' samples

    @staticmethod
    def patch_px_of(config: EmmaeConfig) -> int:
        """The configured model's patch size, read from its bundle (this process opens no encoder)."""
        return open_bundle(bundle_path(config.model.bundle, config.model.precision)).info.patch_px

    def capacity(self) -> int:
        """``depth`` micrographs per worker; the worker count is asked of the scheduler at most every ``WORKERS_TTL_S``."""
        now = time.monotonic()
        if now - self._workers_at > WORKERS_TTL_S:
            self._workers = max(1, len(self.client.scheduler_info().get("workers", {})))
            self._workers_at = now
        return self.depth * self._workers

    def has_room(self) -> bool:
        return not self._cancelled and self.in_flight < self.capacity()

    def submit(self, job: Any) -> bool:
        if not self.has_room():
            return False
        session = self.builder.current
        key = f"emmae-pick-{uuid.uuid4().hex}"
        future = self.client.submit(stream_task, job, str(self.outputs.root), session.to_json() if session else None,
                                    self.builder.frozen is None, key=key, pure=False)
        with self._lock:
            self._flights[key] = (job, future)
        future.add_done_callback(self._finished)
        self.in_flight += 1
        return True

    def _finished(self, future: Any) -> None:
        with self._lock:
            flight = self._flights.pop(future.key, None)
        if flight is not None:
            self._results.put(flight)
            self._on_done()

    def collect(self) -> list[Done]:
        results = []
        while True:
            try:
                job, future = self._results.get_nowait()
            except queue.Empty:
                break
            results.append(self._done(job, future))
        self.in_flight -= len(results)
        return results

    def _done(self, job: Job, future: Any) -> Done:
        if future.cancelled():
            return Done(job, rolled_back=True, finished_at=time.time())
        try:
            done = future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths: recorded, the daemon goes on
            return failed(job, exc)
        if done.sample is not None:
            self.builder.add(done.sample, name=job.name)
        if done.picks is not None:
            self.outputs.remember(job.stem, done.picks, self.config)
        return done

    def cancel(self) -> None:
        """Cancel the tasks not yet finished (they come back rolled back)."""
        self._cancelled = True
        with self._lock:
            futures = [future for _, future in self._flights.values()]
        if futures:
            self.client.cancel(futures)

    def close(self) -> list:
        """Wait for the tasks in flight (or their cancellation); return the last results."""
        with self._lock:
            futures = [future for _, future in self._flights.values()]
        if futures:
            wait(futures)
        deadline = time.monotonic() + 30
        while self.in_flight > self._results.qsize() and time.monotonic() < deadline:  # callbacks still to run
            time.sleep(0.05)
        return self.collect()


def stream_task(job: Job, out: str, session_json: str | None, want_sample: bool) -> Done:
    """On a worker: :func:`pick_job` for a stream, with the client's current session (none yet: the job's own,
    from its sample); its session sample comes back when the client still grows the session."""
    worker = _picker()
    session = Session.from_json(session_json) if session_json else None
    builder = None if session else SessionBuilder(worker.config, worker.encoder.bundle.info.patch_px)
    return pick_job(job, replace(worker, session=session, builder=builder, keep_samples=want_sample), OutputFolder(Path(out)))


def describe(client: Any) -> dict:
    info = client.scheduler_info()
    return {"scheduler": info.get("address"), "workers": len(info.get("workers", {}))}
