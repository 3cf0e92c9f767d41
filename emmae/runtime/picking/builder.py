"""A stream's session, grown from its first micrographs: picking never waits for it.

Until ``cluster.session_micrographs`` samples are in, each micrograph is picked with a
provisional session fitted on the samples so far (refitted when their count reaches 1,
2, 4, ...); then the session is fixed and handed, with its samples' names, to ``on_fixed`` (the caller saves it).
Each sample is named (its micrograph's name: a micrograph counts once) and the names so far
go to ``on_sample``, so a restarted stream can :meth:`restore` the same samples and fix the
same session. A builder started with a fixed session (read back on a restart) keeps it.
Used by one thread at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from emmae.config import EmmaeConfig
from emmae.runtime.picking.session import Session, SessionSample, fit_session

log = logging.getLogger(__name__)


class SessionBuilder:
    """Provisional sessions, then the fixed one (see the module docstring)."""

    def __init__(self, config: EmmaeConfig, patch_px: int, fixed: Session | None = None,
                 on_fixed: Callable[[Session, list[str]], None] | None = None, on_sample: Callable[[list[str]], None] | None = None) -> None:
        self.config, self.patch_px, self.on_fixed, self.on_sample = config, patch_px, on_fixed, on_sample
        self.samples: list[SessionSample] = []
        self.names: list[str] = []  # of the samples' micrographs, in the order they came
        self.frozen: Session | None = fixed
        self.provisional: Session | None = None

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
        if name is not None and name in self.names:
            return self.current  # picked again (a restart, a re-pick): already counted
        self.samples.append(sample)
        self.names.append(name if name is not None else f"#{len(self.names)}")
        if self.on_sample is not None:
            self.on_sample(list(self.names))
        count = len(self.samples)
        if count >= self.config.cluster.session_micrographs:
            self._freeze(fit_session(self.samples, self.config, self.patch_px))
        elif refit or count & (count - 1) == 0:
            self.provisional = fit_session(self.samples, self.config, self.patch_px)
        return self.current

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

    def _freeze(self, session: Session) -> None:
        self.frozen, self.samples = session, []
        log.info("session %s fixed after %d micrographs: %s", session.digest(), session.micrographs, session.summary())
        if self.on_fixed is not None:
            self.on_fixed(session, list(self.names))
