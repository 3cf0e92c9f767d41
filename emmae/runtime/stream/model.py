"""Which model picks in a stream, with which session: the picker factory.

A :class:`StreamModel` is the stream's model as it starts: its id (recorded with every
pick), the folder its session is kept in, and :meth:`StreamModel.picker`, the one place
the pipeline's :class:`~emmae.runtime.jobs.Picker` is built. Its session is read back
when an earlier run fixed it; else it grows from the samples an earlier run counted
(read and encoded again) and the coming micrographs, saved as they come, so a restart
carries it on. Under ``--adapt`` the daemon gets a
:class:`~emmae.runtime.stream.switcher.ModelSwitcher` instead (:func:`open_model`), which
adds the adaptation and the switch to the adapted model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from emmae.config import EmmaeConfig
from emmae.errors import EmmaeError
from emmae.runtime.jobs import Picker
from emmae.runtime.outputs import OutputFolder
from emmae.runtime.picking.builder import SessionBuilder
from emmae.runtime.picking.encoder import Encoder, bundle_path
from emmae.runtime.picking.picker import encode, prepare, session_sample
from emmae.runtime.picking.session import Session, SessionSample
from emmae.runtime.stream.adapter import model_id
from emmae.runtime.stream.names import shown
from emmae.runtime.stream.recorder import Recorder

log = logging.getLogger("emmae.stream")


class StreamModel:
    """The stream's model and its session; see the module docstring. ``encoder``: None when a cluster picks."""

    switching = False  # a model switch waits for the pipeline to drain (only a ModelSwitcher's does)

    def __init__(self, outputs: OutputFolder, config: EmmaeConfig, recorder: Recorder, encoder: Encoder | None, threads: int | None,
                 path_of: Callable[[str], Path]) -> None:
        self.outputs, self.config, self.recorder, self.encoder, self.threads = outputs, config, recorder, encoder, threads
        self.path_of = path_of  # a journal key's file
        self.stopping: Callable[[], bool] = lambda: False  # a stop asked for (the session samples are then not read back)
        self.parent = encoder.bundle.path if encoder is not None else bundle_path(config.model.bundle, config.model.precision)
        self.id = model_id(self.parent)  # recorded with every pick

    @property
    def session_folder(self) -> OutputFolder:
        """Where the current model's session is kept."""
        return self.outputs

    def builder(self, patch_px: int) -> SessionBuilder:
        """The current model's session: read back if it was fixed before; else grown from the samples an earlier run counted
        (encoded again) and the coming micrographs; the samples' names and the fixed session are saved as they come."""
        folder = self.session_folder
        fixed = folder.read_session()
        if fixed is not None:
            log.info("session %s read from %s", fixed.digest(), folder.root)
        builder = SessionBuilder(self.config, patch_px, fixed, on_fixed=lambda session, names: self._save(folder, session, names),
                                 on_sample=folder.write_session_samples, background=True)  # a refit never holds up a pick
        if fixed is None and self.encoder is not None:
            builder.restore(self._samples_of(folder.read_session_samples()))
        return builder

    def _samples_of(self, names: list[str]) -> list[tuple[str, SessionSample]]:
        """The session samples of the micrographs ``names``, read and encoded again (a missing one is left out)."""
        samples = []
        for name in names:
            if self.stopping():
                log.info("stopping: the session samples of an earlier run are not read back")
                return []
            key = self.recorder.journal.key_of(name)
            try:
                if key is None:
                    raise FileNotFoundError(name)
                encoded = encode(prepare(self.path_of(key), self.config, self.encoder, name=name), self.encoder)
            except (EmmaeError, OSError) as exc:
                log.warning("session sample %s of an earlier run left out: %s", shown(name), exc)
                continue
            samples.append((name, session_sample(encoded, self.config, self.encoder)))
        return samples

    def picker(self, builder: SessionBuilder | None = None) -> Picker:
        """The pipeline's picker: the configuration, the opened encoder and the current model's session (``builder``,
        else :meth:`builder`'s)."""
        if self.encoder is None:  # nothing to pick with (a daemon that only scans and admits, e.g. in tests)
            return Picker(self.config, None)
        return Picker(self.config, self.encoder, builder=builder or self.builder(self.encoder.bundle.info.patch_px))

    def step(self, in_flight: int) -> Picker | None:
        """The picker to switch to, once there is one (never, for a model that does not adapt)."""
        return None

    def busy(self) -> bool:
        """Work of the model's own still to come (an adaptation)."""
        return False

    def status(self) -> str:
        """For the status line: what the model is doing, or ''."""
        return ""

    def stop(self) -> None:
        """A clean stop of the daemon."""

    @staticmethod
    def _save(folder: OutputFolder, session: Session, names: list[str]) -> None:
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            folder.write_session(session, names)
        except OSError as exc:
            log.warning("cannot save the session to %s: %s", folder.root, exc)
