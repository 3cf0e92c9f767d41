"""The web view (``emmae-stream --http``, ``emmae-view``): its figures against the journal, the picks it draws,
that it writes nothing, and what it refuses: paths outside the output folder, requests without the token.

One short ``--once`` stream (three synthetic micrographs and a broken file, served while it
runs) and one ``emmae-pick`` batch of the same micrographs are shared by the module.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from emmae.errors import ConfigError, EmmaeError
from emmae.runtime.commands import pick as pick_cmd
from emmae.runtime.commands import stream as stream_cmd
from emmae.runtime.commands import view as view_cmd
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.runtime.web import figures
from emmae.runtime.web.folder import FolderView
from emmae.runtime.web.live import LiveFigures
from emmae.runtime.web.reading import Micrograph
from emmae.runtime.web.server import parse_address, serve
from emmae.synth import SynthParams, write_session

pytestmark = pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model")
PARAMS = SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0, snr=0.3)
FAST = ["--diameter-px", "24", "--settle-s", "0", "--poll-interval-s", "0.05", "--poll", "--progress", "plain", "--threads", "2"]
URL = re.compile(r"(http://[^\s/]+)/(\?token=\S+)?")


class Records(logging.Handler):
    """Every log message of the ``emmae`` loggers while attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def url(self) -> str | None:
        found = [URL.search(m) for m in self.messages if m.startswith("web view of")]
        return found[-1].group(1) if found and found[-1] else None


def poll_while_running(records: Records, seen: list[dict], done: threading.Event) -> None:
    """Fetch /api/status every 50 ms while the stream runs (the page's requests, faster)."""
    while not done.is_set():
        base = records.url()
        if base is not None:
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=5) as answer:
                    seen.append(json.load(answer))
            except (OSError, ValueError):
                pass
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A stream picked with --once and served with --http 127.0.0.1:0 while it ran; what the page saw meanwhile."""
    root = tmp_path_factory.mktemp("web")
    watch, out = root / "session", root / "session" / "emmae_picks"
    write_session(watch, 3, PARAMS, seed=5)
    (watch / "broken.mrc").write_bytes(b"not a micrograph\n" * 64)
    records, seen, done = Records(), [], threading.Event()
    logging.getLogger("emmae").addHandler(records)
    poller = threading.Thread(target=poll_while_running, args=(records, seen, done), daemon=True)
    poller.start()
    try:
        code = stream_cmd.main(["--watch", str(watch), "--out", str(out), "--once", *FAST, "--http", "127.0.0.1:0"])
    finally:
        done.set()
        poller.join()
        logging.getLogger("emmae").removeHandler(records)
    yield SimpleNamespace(root=root, watch=watch, out=out, code=code, url=records.url(), seen=seen)


@pytest.fixture(scope="module")
def batch_run(stream_run: SimpleNamespace) -> Path:
    """The same micrographs picked as a batch by emmae-pick (no journal)."""
    out = stream_run.root / "batch"
    mics = sorted(str(p) for p in stream_run.watch.glob("mic_*.mrc"))
    assert pick_cmd.main([*mics, "--diameter-px", "24", "--out", str(out), "--threads", "2"]) == 0
    return out


@pytest.fixture
def server(stream_run: SimpleNamespace) -> Iterator[str]:
    """The stream's folder served on loopback, no token; yields the base address."""
    running = serve(FolderView(stream_run.out), "127.0.0.1:0")
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.read(), dict(refused.headers)


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..`` or of percent signs)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def journal_rows(out: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{out / 'emmae-journal.sqlite'}?mode=ro&immutable=1", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM micrographs ORDER BY updated").fetchall()
    finally:
        db.close()


def status(base: str) -> dict:
    code, body, _ = get(f"{base}/api/status")
    assert code == 200, body
    return json.loads(body)


def pick_pixels(png: bytes) -> int:
    """Pixels of the picks' circle colour (BGR 0, 200, 255, anti-aliased) in a PNG."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a PNG"
    b, g, r = (image[..., i].astype(int) for i in range(3))
    return int(np.count_nonzero((r > 150) & (r - b > 90) & (g - b > 40)))


# --- the figures are the journal's --------------------------------------------------------------------


def test_api_figures_equal_the_journal(stream_run, server):
    assert stream_run.code == 3  # stopped cleanly, one micrograph failed
    rows = journal_rows(stream_run.out)
    picked = [r for r in rows if r["state"] == "picked"]
    answer = status(server)
    assert answer["source"] == "journal" and answer["live"] is False
    assert answer["counts"]["picked"] == len(picked) == 3
    assert answer["counts"]["failed"] == sum(r["state"] == "failed" for r in rows) == 1
    assert answer["counts"]["particles"] == sum(r["particles"] for r in picked)
    shown = {m["name"]: m["particles"] for m in answer["micrographs"]}
    assert shown == {r["name"]: r["particles"] for r in picked}
    assert answer["latest"]["name"] == picked[-1]["name"]
    assert answer["pace"]["latency_last_s"] == pytest.approx(json.loads(picked[-1]["timings"])["latency"])
    failed_txt = [line.split("\t") for line in (stream_run.out / "failed.txt").read_text().splitlines()[1:]]
    assert [[f["micrograph"], f["kind"], f["reason"]] for f in answer["failed"]] == failed_txt
    assert failed_txt[0][0] == "broken.mrc"
    histogram = answer["figure_of_merit"]
    assert histogram["picks"] == sum(histogram["counts"]) == answer["counts"]["particles"]  # all 3 are among the last 20


def test_the_stream_served_its_live_figures_while_it_ran_and_freed_the_port_at_exit(stream_run):
    assert stream_run.url is not None and stream_run.url.startswith("http://127.0.0.1:")
    live = [s for s in stream_run.seen if s["live"]]
    assert live, "no answer from the server while the stream ran"
    assert all(isinstance(s["pace"]["queued"], int) and isinstance(s["pace"]["settling"], int) for s in live)
    assert [s["counts"]["picked"] for s in live] == sorted(s["counts"]["picked"] for s in live)  # never goes back
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{stream_run.url}/api/status", timeout=2).close()


def test_each_micrograph_shows_its_picks(stream_run, server):
    rows = {r["outputs"]: r for r in journal_rows(stream_run.out) if r["state"] == "picked"}
    for m in status(server)["micrographs"]:
        code, body, _ = get(f"{server}/api/micrograph?stem={urllib.request.quote(m['stem'])}")
        assert code == 200, body
        detail = json.loads(body)
        recorded = next(r for key, r in rows.items() if key.endswith(f"{m['stem']}_autopick.star"))
        assert detail["particles"] == recorded["particles"] == len(detail["picks"])
        code, png, headers = get(f"{server}/overlay.png?stem={urllib.request.quote(m['stem'])}")
        assert code == 200 and headers["Content-Type"] == "image/png"
        assert pick_pixels(png) > 20 * detail["particles"]  # a circle per pick
    assert get(f"{server}/overlay.png?stem=mic_99999")[0] == 404
    assert get(f"{server}/overlay.png")[0] == 400


def test_serving_writes_nothing_in_the_folder(stream_run, server):
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(stream_run.out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in stream_run.out.rglob("*")}

    before = snapshot()
    for path in ("/", "/api/status", "/static/app.js", "/files/failed.txt"):
        assert get(f"{server}{path}")[0] == 200
    stem = status(server)["latest"]["stem"]
    assert get(f"{server}/overlay.png?stem={stem}")[0] == 200
    assert snapshot() == before
    assert not list(stream_run.out.glob("*-wal")) and not list(stream_run.out.glob("*-shm"))


def test_a_batch_is_browsed_alike(batch_run):
    view = FolderView(batch_run)
    answer = view.status()
    assert answer["source"] == "index"
    assert answer["counts"]["picked"] == 3
    listed = {m["stem"]: m["particles"] for m in answer["micrographs"]}
    for stem, particles in listed.items():
        assert particles == view.micrograph(stem)["particles"] > 0
        assert pick_pixels(view.overlay(stem)) > 0
    assert answer["session"]["fixed"] is True and len(answer["session"]["profile"]) > 3


# --- what is refused ------------------------------------------------------------------------------------


TRAVERSALS = [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt", "/files/..%2fsecret.txt",
    "/files/.%2e/secret.txt", "/files/%2fetc%2fpasswd", "/files//etc/passwd", "/files/emmae_picks/../../secret.txt",
    "/files/%252e%252e/secret.txt", "/files/..%5csecret.txt", "/files/link-out", "/files/link-out/secret.txt",
    "/static/../../../../../secret.txt", "/static/%2e%2e/server.py", "/static/..%2F..%2Fweb%2Fserver.py",
    "/../secret.txt", "/%2e%2e/secret.txt", "/files/%00secret.txt",
]


@pytest.fixture
def traversal_server(tmp_path: Path) -> Iterator[str]:
    """A small output folder beside a secret file, with a link inside pointing out of it."""
    out = tmp_path / "emmae_picks"
    out.mkdir()
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE\n")
    (out / "failed.txt").write_text("# micrograph\tkind\treason\n")
    (out / "link-out").symlink_to(tmp_path)
    running = serve(FolderView(out), "127.0.0.1:0")
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_outside_the_output_folder_are_refused(traversal_server, path):
    code, body = raw_get(traversal_server, path)
    assert code in (400, 403, 404), (path, code)
    assert b"SECRET-OUTSIDE" not in body and b"root:" not in body and b"def " not in body


def test_files_inside_the_folder_and_the_page_are_served(traversal_server):
    assert raw_get(traversal_server, "/files/failed.txt") == (200, b"# micrograph\tkind\treason\n")
    assert raw_get(traversal_server, "/static/app.js")[0] == 200
    assert raw_get(traversal_server, "/files/")[0] in (403, 404)


def test_only_get_and_head_are_answered(server):
    for method in ("POST", "PUT", "DELETE"):
        request = urllib.request.Request(f"{server}/api/status", data=b"x", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        refused.value.close()
        assert refused.value.code == 405
    head = urllib.request.Request(f"{server}/api/status", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as answer:
        assert answer.status == 200 and answer.read() == b""


def non_loopback_address() -> str | None:
    """One of this machine's addresses that is not loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("bind", ["0.0.0.0", "own address"])
def test_beyond_loopback_every_request_needs_the_token(stream_run, bind):
    host = non_loopback_address() if bind == "own address" else bind
    if host is None:
        pytest.skip("this machine has no address beside loopback")
    running = serve(FolderView(stream_run.out), f"{host}:0", "s3cret-token")
    base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{running.port}"
    try:
        for path in ("/", "/api/status", "/static/app.js", "/files/failed.txt", "/overlay.png?stem=x"):
            assert get(f"{base}{path}")[0] == 401, path
            assert get(f"{base}{path}{'&' if '?' in path else '?'}token=wrong")[0] == 401, path
        code, _, headers = get(f"{base}/?token=s3cret-token")
        assert code == 200 and "emmae_token=s3cret-token" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        assert get(f"{base}/api/status?token=s3cret-token")[0] == 200
        assert get(f"{base}/api/status", {"Cookie": "emmae_token=s3cret-token"})[0] == 200
        assert get(f"{base}/api/status", {"Authorization": "Bearer s3cret-token"})[0] == 200
    finally:
        running.stop()


def test_a_token_is_generated_beyond_loopback_and_none_is_needed_on_it(stream_run):
    wide = serve(FolderView(stream_run.out), "0.0.0.0:0")
    try:
        assert wide.token and len(wide.token) >= 20 and f"?token={wide.token}" in wide.url()
        assert get(f"http://127.0.0.1:{wide.port}/api/status")[0] == 401
        assert get(f"http://127.0.0.1:{wide.port}/api/status?token={wide.token}")[0] == 200
    finally:
        wide.stop()
    local = serve(FolderView(stream_run.out), "127.0.0.1:0")
    try:
        assert local.token is None and get(f"http://127.0.0.1:{local.port}/api/status")[0] == 200
    finally:
        local.stop()


def test_addresses_are_parsed_or_refused_in_one_line():
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:8765") == ("::1", 8765)
    assert parse_address("picker-host:9000") == ("picker-host", 9000)
    for bad in ("", "host", "host:", "70000", "::1:80", "host:port"):
        with pytest.raises(ConfigError, match=r"\[HOST:\]PORT"):
            parse_address(bad)


def test_a_busy_port_is_one_error(stream_run):
    first = serve(FolderView(stream_run.out), "127.0.0.1:0")
    try:
        with pytest.raises(EmmaeError, match="cannot serve the web view.*choose another port"):
            serve(FolderView(stream_run.out), f"127.0.0.1:{first.port}")
    finally:
        first.stop()


# --- the commands -------------------------------------------------------------------------------------


def test_stream_flags_are_checked_before_anything_starts(tmp_path, caplog):
    assert stream_cmd.main(["--watch", str(tmp_path), "--diameter-px", "24", "--http-token", "x"]) == 2
    assert stream_cmd.main(["--watch", str(tmp_path), "--diameter-px", "24", "--http", "localhost"]) == 2
    assert "--http-token needs --http" in caplog.text and "give [HOST:]PORT" in caplog.text
    assert not (tmp_path / "emmae_picks").exists()


def test_emmae_view_refuses_what_it_cannot_serve(tmp_path, caplog):
    assert view_cmd.main([str(tmp_path / "missing")]) == 2
    assert view_cmd.main([str(tmp_path)]) == 2
    assert "is not a folder" in caplog.text and "holds no picks, journal or index" in caplog.text


def test_emmae_view_serves_a_finished_stream_until_sigterm(stream_run):
    code = "import sys; from emmae.runtime.commands.view import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", code, str(stream_run.out), "--http", "127.0.0.1:0"],
                             stderr=subprocess.PIPE, text=True)
    try:
        base = None
        for line in child.stderr:
            found = URL.search(line) if "web view of" in line else None
            if found:
                base = found.group(1)
                break
        assert base is not None, "no address logged"
        assert status(base)["counts"]["picked"] == 3
    finally:
        child.send_signal(signal.SIGTERM)
        _, rest = child.communicate(timeout=30)
    assert child.returncode == 0, rest


# --- the figures' rules -----------------------------------------------------------------------------------


def test_rates_and_the_falling_behind_rule():
    assert figures.rate_per_hour([0.0, 3.6, 7.2]) == pytest.approx(1000.0)
    assert figures.rate_per_hour([5.0]) is None
    landing = [Micrograph(f"m{i}", f"m{i}", "picked", f"m{i}", 10, 1.0, 10.0 + 7.2 * i, 3.6 * i) for i in range(10)]
    waiting = [Micrograph(f"w{i}", f"w{i}", "seen", None, None) for i in range(6)]
    pace = figures.pace(landing + waiting, queue_depth=4)
    assert pace["acquisition_per_hour"] == pytest.approx(1000.0) and pace["throughput_per_hour"] == pytest.approx(500.0)
    assert pace["falling_behind"] and "6 micrographs wait to be picked, ~43 s of picking" in pace["warning"]  # 6 at 500 per hour
    assert pace["behind_s"] == pytest.approx(6 / 500 * 3600)
    assert not figures.pace(landing + waiting[:4], queue_depth=4)["falling_behind"]  # no more than the queue holds
    assert figures.pace(landing + waiting[:4], queue_depth=4)["behind_s"] is None
    keeping_up = [Micrograph(f"m{i}", f"m{i}", "picked", f"m{i}", 10, 1.0, 10.0 + 3.6 * i, 3.6 * i) for i in range(10)]
    assert not figures.pace(keeping_up + waiting, queue_depth=4)["falling_behind"]
    live = {"queued": 9, "settling": 0, "backlog_growing": True, "throughput_per_hour": 2000.0}
    assert figures.pace(keeping_up, queue_depth=4, live=live)["falling_behind"]


def test_live_figures_see_a_growing_backlog(monkeypatch):
    progress = SimpleNamespace(rate_per_hour=lambda: 900.0, last_latency_s=2.5)
    daemon = SimpleNamespace(queued=2, admission=SimpleNamespace(pending=1), progress=progress,
                             model=SimpleNamespace(id="m:1", status=lambda: ""))
    clock = iter([0.0, 30.0, 61.0, 62.0])
    monkeypatch.setattr("emmae.runtime.web.live.time.monotonic", lambda: next(clock))
    live = LiveFigures(daemon)  # type: ignore[arg-type]
    assert live()["backlog_growing"] is False
    daemon.queued = 5
    assert live()["backlog_growing"] is False  # nothing a minute old yet
    assert live()["backlog_growing"] is True  # 5 now against 2 a minute ago
    daemon.queued = 1
    figures_now = live()
    assert figures_now["backlog_growing"] is False
    assert (figures_now["queued"], figures_now["settling"], figures_now["latency_last_s"]) == (1, 1, 2.5)


def test_emmae_view_help_is_plain_and_explains_every_option(capsys):
    parser = view_cmd.build_parser()
    assert parser.prog == "emmae-view"
    text = parser.format_help()
    assert "``" not in text and "--http [HOST:]PORT" in text and "ssh -L" in text
    assert [a.option_strings for a in parser._actions if not (a.help and a.help.strip())] == []
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("emmae-view ")
