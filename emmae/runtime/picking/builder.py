"""A stream's session, grown from its first micrographs: picking never waits for it.

Until ``cluster.session_micrographs`` samples are in, each micrograph is picked with a
provisional session fitted on the samples so far (refitted when their count reaches 1,
2, 4, ...); then the session is fixed and handed to ``on_fixed`` (the caller saves it).
A builder started with a fixed session (read back on a restart) keeps it. Used by one
thread at a time.
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
                 on_fixed: Callable[[Session], None] | None = None) -> None:
        self.config, self.patch_px, self.on_fixed = config, patch_px, on_fixed
        self.samples: list[SessionSample] = []
        self.frozen: Session | None = fixed
        self.provisional: Session | None = None

    @property
    def current(self) -> Session | None:
        """The session to pick with now: the fixed one, else the latest provisional one (None before any sample)."""
        return self.frozen or self.provisional

    def add(self, sample: SessionSample, refit: bool = False) -> Session | None:
        """Count ``sample`` in; returns the session to pick with now.

        Fixed once ``cluster.session_micrographs`` samples are in; until then refitted
        when their count reaches 1, 2, 4, ... (at every sample with ``refit``).
        """
        if self.frozen is not None:
            return self.frozen
        self.samples.append(sample)
        count = len(self.samples)
        if count >= self.config.cluster.session_micrographs:
            self._freeze(fit_session(self.samples, self.config, self.patch_px))
        elif refit or count & (count - 1) == 0:
            self.provisional = fit_session(self.samples, self.config, self.patch_px)
        return self.current

    def _freeze(self, session: Session) -> None:
        self.frozen, self.samples = session, []
        log.info("session %s fixed after %d micrographs: %s", session.digest(), session.micrographs, session.summary())
        if self.on_fixed is not None:
            self.on_fixed(session)
