"""A stream's session, grown from its first micrographs: picking never waits for it.

Until ``cluster.session_micrographs`` samples are in, each micrograph is picked with a
provisional session fitted on the samples so far (refitted when their count reaches 1,
2, 4, ...); then the session is fixed and handed, with its samples' names, to ``on_fixed`` (the caller saves it).
Each sample is named (its micrograph's name: a micrograph counts once) and the names so far
go to ``on_sample``, so a restarted stream can :meth:`restore` the same samples and fix the
same session. A builder started with a fixed session (read back on a restart) keeps it.
Used by one thread at a time.

With ``background`` (a stream's), every fit but the first runs on a thread of its own
while the micrographs that come meanwhile are picked with the session there is, so a
refit never delays a new micrograph's pick: the fixed session is fitted on the first
``cluster.session_micrographs`` samples as before, and what was picked with a
provisional session is picked again once it is fixed (the stream's re-picks). Without
``background`` (a batch, the tests) each fit runs in the ``add`` that calls for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from emmae.config import EmmaeConfig
from emmae.runtime.picking.session import Session, SessionSample, fit_session

log = logging.getLogger(__name__)


class SessionBuilder:
    """Provisional sessions, then the fixed one (see the module docstring)."""

    def __init__(self, config: EmmaeConfig, patch_px: int, fixed: Session | None = None,
                 on_fixed: Callable[[Session, list[str]], None] | None = None, on_sample: Callable[[list[str]], None] | None = None,
                 background: bool = False) -> None:
        self.config, self.patch_px, self.on_fixed, self.on_sample = config, patch_px, on_fixed, on_sample
        self.samples: list[SessionSample] = []
        self.names: list[str] = []  # of the samples' micrographs, in the order they came
        self.frozen: Session | None = fixed
        self.provisional: Session | None = None
        self.background = background
        self._fit: threading.Thread | None = None  # the fit running on its own thread (background)
        self._final_asked = False  # the fixed session's fit has started: no more samples are counted

    @property
    def current(self) -> Session | None:
        """The session to pick with now: the fixed one, else the latest provisional one (None before any sample)."""
        return self.frozen or self.provisional

    def add(self, sample: SessionSample, refit: bool = False, name: str | None = None) -> Session | None:
        """Count ``sample`` (of micrograph ``name``: counted once) in; returns the session to pick with now.

        Fixed once ``cluster.session_micrographs`` samples are in; until then refitted
        when their count reaches 1, 2, 4, ... (at every sample with ``refit``).
        """
        if self.frozen is not None:
            return self.frozen
        if self._final_asked or (name is not None and name in self.names):
            return self.current  # the fixed session is being fitted; or picked again (a restart, a re-pick): already counted
        self.samples.append(sample)
        self.names.append(name if name is not None else f"#{len(self.names)}")
        if self.on_sample is not None:
            self.on_sample(list(self.names))
        count = len(self.samples)
        final = count >= self.config.cluster.session_micrographs
        if final or refit or count & (count - 1) == 0:
            if self.background and self.current is not None:
                self._fit_later(final)
            elif final:
                self._freeze(fit_session(self.samples, self.config, self.patch_px))
            else:
                self.provisional = fit_session(self.samples, self.config, self.patch_px)
        return self.current

    @property
    def fitting(self) -> bool:
        """A fit runs on its own thread."""
        return self._fit is not None and self._fit.is_alive()

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the fit on its own thread (if any) is done."""
        if self._fit is not None:
            self._fit.join(timeout_s)

    def _fit_later(self, final: bool) -> None:
        """Fit the samples so far on a thread of its own (after the fit before it); the session is taken when it is done."""
        samples, names, before = list(self.samples), list(self.names), self._fit
        self._final_asked = final

        def fit() -> None:
            if before is not None:
                before.join()
            try:
                session = fit_session(samples, self.config, self.patch_px)
            except Exception:  # noqa: BLE001 - a failed refit keeps the session there is; the next one tries again
                log.exception("the session could not be refitted on %d micrographs", len(samples))
                if final:
                    self._final_asked = False  # the next sample asks for the fixed session's fit again
                return
            if final:
                self._freeze(session, names)
            elif self.frozen is None:
                self.provisional = session

        self._fit = threading.Thread(target=fit, name="emmae-session-fit")  # not a daemon thread: never cut off at exit
        self._fit.start()

    def restore(self, samples: list[tuple[str, SessionSample]]) -> None:
        """Take back the samples an earlier run of the stream counted (in their order): one fit, fixed if enough."""
        if self.frozen is not None or not samples:
            return
        for name, sample in samples:
            if name not in self.names:
                self.names.append(name)
                self.samples.append(sample)
        session = fit_session(self.samples, self.config, self.patch_px)
        if len(self.samples) >= self.config.cluster.session_micrographs:
            self._freeze(session)
        else:
            self.provisional = session
        log.info("session samples of an earlier run taken back: %d micrographs", len(self.names))

    def _freeze(self, session: Session, names: list[str] | None = None) -> None:
        self.frozen, self.samples = session, []
        log.info("session %s fixed after %d micrographs: %s", session.digest(), session.micrographs, session.summary())
        if self.on_fixed is not None:
            self.on_fixed(session, list(self.names if names is None else names))
