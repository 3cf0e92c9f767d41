"""A stream's session builder fits in the background: a refit never holds up the pick that calls for it."""

from __future__ import annotations

import threading

from emmae.config import EmmaeConfig
from emmae.runtime.picking import builder as builder_module
from emmae.runtime.picking.builder import SessionBuilder


class FakeSession:
    def __init__(self, samples: list) -> None:
        self.micrographs, self.samples = len(samples), list(samples)

    def digest(self) -> str:
        return f"fit-of-{self.micrographs}"

    def summary(self) -> dict:
        return {}


def _fake_fits(monkeypatch, gate: threading.Event) -> list[int]:
    fits: list[int] = []

    def fit_session(samples, config, patch_px):
        if fits:  # the first fit (nothing to pick with before it) runs at once; the others wait for the gate
            assert gate.wait(10)
        fits.append(len(samples))
        return FakeSession(samples)

    monkeypatch.setattr(builder_module, "fit_session", fit_session)
    return fits


def test_background_refits_never_hold_up_a_pick_and_fix_the_first_samples(monkeypatch):
    gate = threading.Event()
    fits = _fake_fits(monkeypatch, gate)
    fixed: list[tuple[str, list[str]]] = []
    config = EmmaeConfig.model_validate({"cluster": {"session_micrographs": 4}})
    builder = SessionBuilder(config, 4, on_fixed=lambda session, names: fixed.append((session.digest(), names)), background=True)
    first = builder.add("s0", name="m0")
    assert first.digest() == "fit-of-1" and fits == [1]  # the first fit: in the call, nothing to pick with before it
    assert builder.add("s1", name="m1") is first and builder.fitting  # the refit at 2 runs on its own thread
    assert builder.add("s2", name="m2") is first
    assert builder.add("s3", name="m3") is first  # the 4th: the fixed session's fit is asked for, behind the one at 2
    assert builder.add("s4", name="m4") is first and builder.names == ["m0", "m1", "m2", "m3"]  # not counted any more
    assert builder.frozen is None and not fixed
    gate.set()
    builder.wait(10)
    assert not builder.fitting and fits == [1, 2, 4]
    assert builder.frozen.digest() == "fit-of-4" and builder.frozen.samples == ["s0", "s1", "s2", "s3"]
    assert fixed == [("fit-of-4", ["m0", "m1", "m2", "m3"])]
    assert builder.add("s5", name="m5") is builder.frozen


def test_without_background_each_fit_runs_in_the_call(monkeypatch):
    gate = threading.Event()
    gate.set()
    fits = _fake_fits(monkeypatch, gate)
    config = EmmaeConfig.model_validate({"cluster": {"session_micrographs": 3}})
    builder = SessionBuilder(config, 4)
    assert builder.add("s0").digest() == "fit-of-1"
    assert builder.add("s1").digest() == "fit-of-2" and not builder.fitting
    assert builder.add("s2").digest() == "fit-of-3" and builder.frozen is not None and fits == [1, 2, 3]
