"""Which model picks: the one the stream started with, then (``--adapt N``) the model fine-tuned on its first micrographs.

The :class:`ModelSwitcher` starts the adaptation (a separate process, :mod:`.adapter`)
once N micrographs are picked and, when the adapted bundle is ready and the pipeline has
drained, opens it, fits its session on the adaptation's micrographs and hands back the
picker to pick with from then on; what the old model picked is sent back to be picked
again (``--adapt-then repick``) or only marked. A stream restarted after an adaptation
picks with the adapted model at once. Each model's session is kept in its own folder
(the output folder, or the adaptation's), so a restart carries it on.
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
from emmae.runtime.picking.picker import encode, needs_session, prepare, session_sample
from emmae.runtime.picking.session import Session, SessionSample
from emmae.runtime.stream.adapter import Adapter, model_id
from emmae.runtime.stream.names import shown
from emmae.runtime.stream.recorder import Recorder

log = logging.getLogger("emmae.stream")


class ModelSwitcher:
    """The stream's model and its adaptation; see the module docstring. ``encoder``: None when a cluster picks."""

    def __init__(self, outputs: OutputFolder, config: EmmaeConfig, recorder: Recorder, encoder: Encoder | None, threads: int | None,
                 path_of: Callable[[str], Path]) -> None:
        self.outputs, self.config, self.recorder, self.encoder, self.threads = outputs, config, recorder, encoder, threads
        self.path_of = path_of  # a journal key's file
        parent = encoder.bundle.path if encoder is not None else bundle_path(config.model.bundle, config.model.precision)
        self.adapter = Adapter(outputs.root, config, recorder, parent, threads) if config.stream.adapt_after else None
        self.switching = False  # the adapted model is ready: the pipeline drains, then the model is switched
        self.stopping: Callable[[], bool] = lambda: False  # a stop asked for (the session samples are then not read back)
        self.model = model_id(parent)  # recorded with every pick
        adapted = self.adapter.done_bundle() if self.adapter else None
        if adapted is not None:  # adapted by an earlier run: keep the adapted model
            self.encoder = self._open(adapted)
            self.model = model_id(adapted)
            self._repick_old()

    @property
    def session_folder(self) -> OutputFolder:
        """Where the current model's session is kept (the adaptation's folder once adapted)."""
        adapted = self.adapter is not None and self.adapter.done_bundle() is not None
        return OutputFolder(self.adapter.folder) if adapted else self.outputs

    def builder(self, patch_px: int) -> SessionBuilder:
        """The current model's session: read back if it was fixed before; else grown from the samples an earlier run counted
        (encoded again) and the coming micrographs; the samples' names and the fixed session are saved as they come."""
        folder = self.session_folder
        fixed = folder.read_session()
        if fixed is not None:
            log.info("session %s read from %s", fixed.digest(), folder.root)
        builder = SessionBuilder(self.config, patch_px, fixed, on_fixed=lambda session, names: self._save(folder, session, names),
                                 on_sample=folder.write_session_samples)
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

    def picker(self) -> Picker:
        if self.encoder is None:  # nothing to pick with (a daemon that only scans and admits, e.g. in tests)
            return Picker(self.config, None)
        return Picker(self.config, self.encoder, builder=self.builder(self.encoder.bundle.info.patch_px))

    def step(self, in_flight: int) -> Picker | None:
        """Start the adaptation when due; once its model is ready and nothing is in flight, switch: returns the new picker."""
        if self.adapter is None:
            return None
        if self.adapter.poll() == "ready":
            self.switching = True
        elif not self.switching and self.adapter.due(len(self.recorder.picked)):
            first = self.recorder.journal.picked()[: self.config.stream.adapt_after]
            self.adapter.start([str(self.path_of(entry.path)) for entry in first])
        if self.switching and in_flight == 0:
            return self._switch()
        return None

    def busy(self) -> bool:
        """The adaptation (and the re-picks it brings) are still to come."""
        return self.adapter is not None and (self.switching or self.adapter.busy() or self.adapter.due(len(self.recorder.picked)))

    def status(self) -> str:
        return self.adapter.status() if self.adapter is not None else ""

    def stop(self) -> None:
        if self.adapter is not None:
            self.adapter.stop()  # resumed at the next start

    def _switch(self) -> Picker:
        bundle = self.adapter.bundle
        self.encoder = self._open(bundle)
        builder = SessionBuilder(self.config, self.encoder.bundle.info.patch_px,
                                 on_fixed=lambda session, names: self._save(OutputFolder(self.adapter.folder), session, names))
        record = self.adapter.record
        for path in (record.micrographs if record else [])[: self.config.cluster.session_micrographs]:
            try:
                if builder.frozen is None and needs_session(self.config):
                    builder.add(session_sample(encode(prepare(Path(path), self.config, self.encoder), self.encoder), self.config, self.encoder),
                                refit=True)
            except (EmmaeError, OSError) as exc:
                log.warning("%s left out of the adapted model's session: %s", shown(path), exc)
        self.model = model_id(bundle)
        with self.recorder.journal.batch():
            self.adapter.finish(self.model)
            again = self._repick_old()
        self.switching = False
        log.info("switched to the adapted model %s%s", self.model,
                 f"; the {len(again)} micrographs the old model picked are picked again" if again else "")
        return Picker(self.config, self.encoder, builder=builder)

    def _repick_old(self) -> list[str]:
        """With ``adapt_then = repick``: what another model picked goes back to the queue (its outputs are overwritten later)."""
        if self.config.stream.adapt_then != "repick":
            return []
        return self.recorder.repick_other_models(self.model)

    def _open(self, bundle: Path) -> Encoder:
        like = self.encoder
        return Encoder.open(bundle, "fp32", like.backend, like.batch_tiles, self.threads)

    @staticmethod
    def _save(folder: OutputFolder, session: Session, names: list[str]) -> None:
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
            folder.write_session(session, names)
        except OSError as exc:
            log.warning("cannot save the session to %s: %s", folder.root, exc)
