"""Picking on a Dask cluster: many processes, many GPUs, many nodes (``--scheduler`` / ``--workers``).

Each worker opens the encoder once, when it joins (:class:`EncoderPlugin`, a Dask
worker plugin), and keeps it for its lifetime; tasks find it there. Workers read the
micrographs and write each micrograph's outputs themselves (atomically, into the
output folder on a shared file system) and send back the picks; the client alone
writes the index files, the session file and the journal.

``emmae-pick``: the session is fitted on the client from samples the workers encode
(the same micrographs and the same fit as a single-process run), then every
micrograph is picked by the cluster; the index files list them in input order, so the
outputs match a single-process run's. ``emmae-stream``: :class:`ClusterPipeline`
replaces the daemon's threads, with at most ``queue_depth`` micrographs in flight
per worker. A worker that dies takes its running task with it; the scheduler runs
the task again on another worker, and the client records the one result it gets.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin, get_worker, wait

from emmae.backend import get_backend
from emmae.config import EmmaeConfig
from emmae.errors import ConfigError, EmmaeError
from emmae.runtime.encoder import Encoder
from emmae.runtime.options import limit_cpu_threads
from emmae.runtime.bundle import open_bundle
from emmae.runtime.encoder import bundle_path
from emmae.runtime.picker import Encoded, Picks, StreamSession, encode_prepared, finish, prepare, session_sample
from emmae.runtime.stream.pipeline import ChangedError, Done, Job, check_job, failed, unchanged, unwritten
from emmae.runtime.session import Session, SessionSample, fit_session

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
    """Close the client and, for a local cluster, the cluster it started."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


class EncoderPlugin(WorkerPlugin):
    """Opens the configured encoder once per worker, when the worker starts (or joins later)."""

    name = PLUGIN_NAME

    def __init__(self, config_json: str) -> None:
        self.config_json = config_json
        self.encoder: Encoder | None = None
        self.config: EmmaeConfig | None = None
        self.encoded: dict[str, Encoded] = {}  # session samples encoded here, kept until their pick (path -> encoding)

    def setup(self, worker: Any) -> None:
        self.config = EmmaeConfig.model_validate_json(self.config_json)
        threads = int(os.environ.get("EMMAE_ENCODER_THREADS", "0")) or None
        limit_cpu_threads(threads)
        model = self.config.model
        self.encoder = Encoder.open(model.bundle, model.precision, get_backend(self.config.backend.device), model.batch_tiles, threads)

    def teardown(self, worker: Any) -> None:
        self.encoder, self.encoded = None, {}


def register(client: Any, config: EmmaeConfig) -> None:
    """Give every worker (and every worker that joins later) its encoder."""
    client.register_plugin(EncoderPlugin(config.model_dump_json()), name=PLUGIN_NAME)


def _plugin() -> EncoderPlugin:
    return get_worker().plugins[PLUGIN_NAME]


def sample_task(path: str, name: str) -> tuple[SessionSample, int]:
    """On a worker: a micrograph's session sample and the model's patch size (its encoding is kept for its pick)."""
    plugin = _plugin()
    encoded = encode_prepared(prepare(Path(path), plugin.config, plugin.encoder, name=name), plugin.encoder)
    plugin.encoded[path] = encoded
    return session_sample(encoded, plugin.config, plugin.encoder), plugin.encoder.bundle.info.patch_px


def pick_task(path: str, name: str, stem: str, out: str, session_json: str | None) -> Picks:
    """On a worker: pick one micrograph with the session and write its outputs into ``out`` (atomically)."""
    from emmae.runtime.cli import write_outputs

    plugin = _plugin()
    session = Session.from_json(session_json) if session_json else None
    encoded = plugin.encoded.pop(path, None)  # a session sample encoded here: not encoded twice
    if encoded is None:
        encoded = encode_prepared(prepare(Path(path), plugin.config, plugin.encoder, name=name), plugin.encoder)
    result = finish(encoded.prepared, plugin.config, plugin.encoder, encoded.latents, session)
    write_outputs(Path(out), stem, result, plugin.config, Path(path))
    return result


def fit_on_cluster(client: Any, samples: list[tuple[str, str]], config: EmmaeConfig) -> tuple[Session | None, dict[str, str]]:
    """The session fitted on the client from the workers' samples of ``samples`` (path, name); and the worker of each sample used."""
    futures = [client.submit(sample_task, path, name, pure=False) for path, name in samples]
    found, used = [], {}
    for (path, _), future in zip(samples, futures):
        try:
            sample, patch = future.result()
        except (EmmaeError, OSError) as exc:
            log.warning("session sample %s left out: %s", path, exc)
            continue
        found.append(sample)
        used[path] = next(iter(client.who_has(future).get(future.key, ())), None)
    del futures  # the samples can go; the encodings stay on their workers until picked
    if not found:
        return None, {}
    return fit_session(found, config, patch), used


class ClusterPipeline:
    """The daemon's pipeline on a Dask cluster, with the interface of :class:`emmae.runtime.stream.pipeline.Pipeline`.

    Each job becomes one task (check, read, pick, write the outputs) on a worker; at
    most ``depth`` per worker are in flight. The stream's session is fitted here, on
    the client, from samples the workers send back with their first picks, as the
    threaded pipeline does (provisional at 1, 2, 4, ... micrographs, fixed after
    ``cluster.session_micrographs``).
    """

    def __init__(self, config: EmmaeConfig, client: Any, out: Path, stem: Callable[[Any], str], depth: int,
                 on_done: Callable[[], None] | None = None, session_path: Path | None = None) -> None:
        self.config, self.client, self.out, self.stem, self.depth = config, client, out, stem, depth
        self._on_done = on_done or (lambda: None)
        self._results: queue.Queue = queue.Queue()
        self._flights: dict[str, tuple[Job, Any]] = {}  # task key -> (job, future), until the future is done
        self._lock = threading.Lock()
        self._cancelled = False
        self.in_flight = 0
        self._workers, self._workers_at = 1, -float("inf")
        patch_px = open_bundle(bundle_path(config.model.bundle, config.model.precision)).info.patch_px
        self.session = StreamSession(config, None, session_path, patch_px)  # fitted here from the workers' samples

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
        session = self.session.frozen or self.session.provisional
        key = f"emmae-pick-{uuid.uuid4().hex}"
        future = self.client.submit(stream_task, job, self.stem(job), str(self.out), session.to_json() if session else None,
                                    self.session.frozen is None, key=key, pure=False)
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
            picks, sample = future.result()
        except _Unwritten as exc:
            return unwritten(job, exc)
        except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths: recorded, the daemon goes on
            return failed(job, exc)
        if sample is not None:
            self.session.add(sample)
        return Done(job, picks=picks, finished_at=time.time())

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


class _Unwritten(OSError):
    """A stream task's outputs could not be written (a full disk, ...): the daemon retries it later."""


def stream_task(job: Job, stem: str, out: str, session_json: str | None, want_sample: bool) -> tuple[Picks, SessionSample | None]:
    """On a worker: one micrograph of a stream, checked, picked and written as the threaded pipeline does; with its session sample when asked."""
    from emmae.runtime.cli import write_outputs

    plugin = _plugin()
    config, encoder = plugin.config, plugin.encoder
    check_job(job, config)
    prepared = prepare(job.path, config, encoder, name=job.name)
    if not unchanged(job):
        raise ChangedError(f"{job.path} changed while it was read")
    encoded = encode_prepared(prepared, encoder)
    sample = session_sample(encoded, config, encoder) if want_sample else None
    session = Session.from_json(session_json) if session_json else None
    if session is None and sample is not None:
        session = fit_session([sample], config, encoder.bundle.info.patch_px)  # the very first: its own session
    result = finish(encoded.prepared, config, encoder, encoded.latents, session)
    try:
        write_outputs(Path(out), stem, result, config, job.path)
    except OSError as exc:
        raise _Unwritten(str(exc)) from exc
    return result, sample


def pick_all_on_cluster(items: list, config: EmmaeConfig, client: Any, out: Path, argv: list[str]) -> int:
    """:func:`emmae.runtime.cli.pick_all` with the cluster's workers: the same outputs, the index files in input order."""
    import json
    import statistics

    from distributed import as_completed

    from emmae.config import config_record
    from emmae.errors import OutputError
    from emmae.io.atomic import remove_stale_temporaries, write_bytes_atomic
    from emmae.runtime.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, SESSION_FILE, write_failed_list, write_record, write_session_files
    from emmae.runtime.options import progress_bar
    from emmae.runtime.picker import needs_session, session_sample_indices

    start = time.perf_counter()
    try:
        write_record(out, config_record(config, argv) | {"sources": {item.stem: os.path.abspath(item.path) for item in items},
                                                          "cluster": _describe(client)})
    except OutputError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    register(client, config)
    session, placed = None, {}
    if needs_session(config):
        chosen = [items[i] for i in session_sample_indices(len(items), config.cluster.session_micrographs)]
        session, placed = fit_on_cluster(client, [(str(item.path), item.name) for item in chosen], config)
        if session is not None:
            record = session.summary() | {"sample": list(placed)}
            write_bytes_atomic(out / SESSION_FILE, (json.dumps(record, indent=1) + "\n").encode())
    session_json = session.to_json() if session else None
    futures = {}
    for index, item in enumerate(items):  # a session sample goes to the worker that holds its encoding (any other if it died)
        where = placed.get(str(item.path))
        placement = {"workers": [where], "allow_other_workers": True} if where else {}
        future = client.submit(pick_task, str(item.path), item.name, item.stem, str(out), session_json, pure=False, **placement)
        futures[future] = index
    done: dict[int, Picks] = {}
    failures: list[tuple[int, str, str]] = []
    with progress_bar(as_completed(futures), len(futures), "micrograph") as bar:
        for future in bar:
            index = futures[future]
            item = items[index]
            try:
                done[index] = future.result()
            except (EmmaeError, OSError) as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                failures.append((index, str(item.path), reason))
                log.error("skipped %s: %s", item.path, reason)
                continue
            log.info("[%d/%d] %s: %d particles in %.2f s", len(done), len(items), item.path.name, len(done[index]),
                     sum(done[index].timings_s.values()))
    left = remove_stale_temporaries(out)  # every task is over: these were being written by a worker that died
    if left:
        log.info("removed %d temporary files left by workers that died", len(left))
    ordered = [(items[i].stem, done[i]) for i in sorted(done)]
    try:
        write_session_files(out, ordered, config)
        write_failed_list(out, [(path, reason) for _, path, reason in sorted(failures)])
    except OutputError as exc:
        log.error("%s: the index files could not be written", exc)
        return EXIT_FAILED
    per = [sum(r.timings_s.values()) for _, r in ordered]
    log.info("%d micrographs picked on the cluster, %d failed, %d particles, %.1f s (median %.2f s per micrograph on a worker)",
             len(done), len(failures), sum(len(r) for _, r in ordered), time.perf_counter() - start, statistics.median(per) if per else 0.0)
    if not done:
        return EXIT_FAILED
    return EXIT_PARTIAL if failures else EXIT_OK


def _describe(client: Any) -> dict:
    info = client.scheduler_info()
    return {"scheduler": info.get("address"), "workers": len(info.get("workers", {}))}
