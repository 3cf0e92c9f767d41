"""Which model picks under ``--adapt N``: the one the stream started with, then the model fine-tuned on its first micrographs.

The :class:`ModelSwitcher` starts the adaptation (a separate process, :mod:`.adapter`)
once N micrographs are picked and, when the adapted bundle is ready and the pipeline has
drained, opens it, fits its session on the adaptation's micrographs and hands back the
picker to pick with from then on; what the old model picked is sent back to be picked
again (``--adapt-then repick``) or only marked. A stream restarted after an adaptation
picks with the adapted model at once. Each model's session is kept in its own folder
(the output folder, or the adaptation's), so a restart carries it on. Without
``--adapt`` the stream's model is a plain :class:`~emmae.runtime.stream.model.StreamModel`
(:func:`open_model` chooses).
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
from emmae.runtime.picking.encoder import Encoder
from emmae.runtime.picking.picker import encode, needs_session, prepare, session_sample
from emmae.runtime.stream.adapter import Adapter, model_id
from emmae.runtime.stream.model import StreamModel
from emmae.runtime.stream.names import shown
from emmae.runtime.stream.recorder import Recorder

log = logging.getLogger("emmae.stream")


def open_model(outputs: OutputFolder, config: EmmaeConfig, recorder: Recorder, encoder: Encoder | None, threads: int | None,
               path_of: Callable[[str], Path]) -> StreamModel:
    """The stream's model: a :class:`ModelSwitcher` under ``--adapt`` (``stream.adapt_after``), else the model it starts with."""
    kind = ModelSwitcher if config.stream.adapt_after else StreamModel
    return kind(outputs, config, recorder, encoder, threads, path_of)


class ModelSwitcher(StreamModel):
    """The stream's model and its adaptation; see the module docstring. ``encoder``: None when a cluster picks."""

    def __init__(self, outputs: OutputFolder, config: EmmaeConfig, recorder: Recorder, encoder: Encoder | None, threads: int | None,
                 path_of: Callable[[str], Path]) -> None:
        super().__init__(outputs, config, recorder, encoder, threads, path_of)
        self.adapter = Adapter(outputs.root, config, recorder, self.parent, threads)
        self.switching = False  # the adapted model is ready: the pipeline drains, then the model is switched
        adapted = self.adapter.done_bundle()
        if adapted is not None:  # adapted by an earlier run: keep the adapted model
            self.encoder = self._open(adapted)
            self.id = model_id(adapted)
            self._repick_old()

    @property
    def session_folder(self) -> OutputFolder:
        """Where the current model's session is kept (the adaptation's folder once adapted)."""
        return OutputFolder(self.adapter.folder) if self.adapter.done_bundle() is not None else self.outputs

    def step(self, in_flight: int) -> Picker | None:
        """Start the adaptation when due; once its model is ready and nothing is in flight, switch: returns the new picker."""
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
        return self.switching or self.adapter.busy() or self.adapter.due(len(self.recorder.picked))

    def status(self) -> str:
        return self.adapter.status()

    def stop(self) -> None:
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
        self.id = model_id(bundle)
        with self.recorder.journal.batch():
            self.adapter.finish(self.id)
            again = self._repick_old()
        self.switching = False
        log.info("switched to the adapted model %s%s", self.id,
                 f"; the {len(again)} micrographs the old model picked are picked again" if again else "")
        return self.picker(builder)

    def _repick_old(self) -> list[str]:
        """With ``adapt_then = repick``: what another model picked goes back to the queue (its outputs are overwritten later)."""
        if self.config.stream.adapt_then != "repick":
            return []
        return self.recorder.repick_other_models(self.id)

    def _open(self, bundle: Path) -> Encoder:
        like = self.encoder
        return Encoder.open(bundle, "fp32", like.backend, like.batch_tiles, self.threads)

