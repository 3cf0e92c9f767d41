"""The stream's self-supervised adaptation (``emmae-stream --adapt N``).

Once N micrographs are picked, the model is fine-tuned on them in a child process
(``emmae-adapt``, which needs torch: the daemon itself never imports it) while the
daemon keeps picking with the current model. When the adapted bundle is written the
daemon switches to it between two micrographs (see the daemon's ``Session``).

The journal's ``adaptation`` row is the state: ``running`` (with the micrographs and
the attempts so far), ``done`` (the bundle and its model id) or ``failed``. A daemon
killed during the adaptation takes the child with it (the child watches its parent);
the next start finds ``running`` and launches it again, and the child resumes from
its last finished epoch (its work folder keeps the checkpoint). A child that fails is
launched again up to ``MAX_ATTEMPTS`` times, then the adaptation is recorded as
failed and the stream goes on with its model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import ConfigError
from emmae.runtime.stream.journal import Adaptation
from emmae.runtime.stream.recorder import Recorder

log = logging.getLogger("emmae.stream")

FOLDER = "emmae-adapt"  # in the output folder: the adapted bundle, its weights, work files, log and progress
MAX_ATTEMPTS = 3
STOP_WAIT_S = 10.0


def read_progress(path: Path) -> dict | None:
    """The last record of an adaptation's progress file (``emmae-adapt --progress-file``), or None when there is none (yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_id(bundle: Path) -> str:
    """How the journal names a model: the bundle's file name and the start of its SHA-256."""
    return f"{bundle.name}:{hashlib.sha256(bundle.read_bytes()).hexdigest()[:12]}"


def check_can_adapt() -> None:
    """Raises ConfigError unless the training extra (torch, onnx) is installed for the child process."""
    missing = [name for name in ("torch", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--adapt needs the training extra ({', '.join(missing)} missing): "
                          "pip install torch==2.13.0 (a CPU build) then pip install 'cryo-emmae[train]'")


class Adapter:
    """Starts, watches and restarts the fine-tuning child of one stream (the daemon's scanning thread only)."""

    def __init__(self, out: Path, config: EmmaeConfig, recorder: Recorder, parent: Path, threads: int | None = None) -> None:
        """``recorder``: the journal's owner, which records the adaptation's state."""
        self.config, self.recorder, self.parent, self.threads = config, recorder, parent, threads
        self.folder = out / FOLDER
        self.bundle = self.folder / "adapted.onnx"
        self.progress_file = self.folder / "progress.json"
        self._child: subprocess.Popen | None = None

    @property
    def record(self) -> Adaptation | None:
        return self.recorder.journal.adaptation()

    def done_bundle(self) -> Path | None:
        """The adapted bundle, once the adaptation is done and it is on disk."""
        record = self.record
        return self.bundle if record is not None and record.state == "done" and self.bundle.is_file() else None

    def due(self, picked: int) -> bool:
        """Time to start: N micrographs picked and no adaptation yet."""
        return self.record is None and picked >= self.config.stream.adapt_after

    def busy(self) -> bool:
        """Running, or finished and waiting for the switch."""
        record = self.record
        return record is not None and record.state == "running"

    def start(self, micrographs: list[str]) -> None:
        log.info("adapting the model to this session on %d micrographs in a separate process (log: %s); picking goes on meanwhile",
                 len(micrographs), self.folder / "adapt.log")
        self.recorder.set_adaptation("running", micrographs, attempts=1)
        self._launch(micrographs)

    def poll(self) -> str:
        """``idle`` (none, done or failed), ``running`` or ``ready`` (the bundle is written: switch to it)."""
        record = self.record
        if record is None or record.state != "running":
            return "idle"
        if self._child is None:  # a restart found it running: the child died with the last daemon
            log.info("resuming the adaptation interrupted by a restart")
            self._launch(record.micrographs)
            return "running"
        status = self._child.poll()
        if status is None:
            return "running"
        self._child = None
        if status == 0 and self.bundle.is_file():
            return "ready"
        if record.attempts < MAX_ATTEMPTS:
            log.warning("the adaptation stopped (exit status %s, see %s): trying again", status, self.folder / "adapt.log")
            self.recorder.set_adaptation("running", record.micrographs, attempts=record.attempts + 1)
            self._launch(record.micrographs)
            return "running"
        reason = f"exit status {status} after {record.attempts} attempts (see {self.folder / 'adapt.log'})"
        self.recorder.set_adaptation("failed", record.micrographs, attempts=record.attempts, reason=reason)
        log.error("the adaptation failed: %s; picking goes on with %s", reason, self.parent.name)
        return "idle"

    def finish(self, model: str) -> None:
        """Record the adaptation as done (the switch is made)."""
        record = self.record
        self.recorder.set_adaptation("done", record.micrographs if record else [], str(self.bundle), model, record.attempts if record else 0)

    def status(self) -> str:
        """For the status line: the adaptation's stage and progress, or ''."""
        if not self.busy():
            return ""
        progress = read_progress(self.progress_file) or {}
        if progress.get("stage") == "train" and progress.get("total"):
            return f"adapting {100 * progress['step'] / progress['total']:.0f} %"
        return f"adapting ({progress.get('stage', 'starting')})"

    def stop(self) -> None:
        """Stop the child (a clean stop of the daemon); the next start resumes the adaptation."""
        if self._child is None or self._child.poll() is not None:
            return
        self._child.terminate()
        try:
            self._child.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._child = None

    def _launch(self, micrographs: list[str]) -> None:
        stream, pre = self.config.stream, self.config.preprocess
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "emmae.adapt", *micrographs, "--model", str(self.parent), "--out", str(self.bundle),
                   "--work", str(self.folder / "work"), "--epochs", str(stream.adapt_epochs), "--budget-s", str(stream.adapt_budget_s),
                   "--progress-file", str(self.progress_file), "--exit-with-parent", str(os.getpid())]
        for flag, value in (("--diameter-px", pre.diameter_px), ("--diameter-A", pre.diameter_A), ("--pixel-size-A", pre.pixel_size_A),
                            ("--threads", self.threads)):
            if value is not None:
                command += [flag, str(value)]
        try:
            self.progress_file.unlink()
        except FileNotFoundError:
            pass
        with open(self.folder / "adapt.log", "ab") as output:
            self._child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
