"""The web view's HTTP server: read-only, GET only, in daemon threads beside the picker.

Routes (everything else is 404, every method but GET and HEAD 405):

* ``/``: the page (``static/index.html``); ``/static/NAME``: its script and style;
* ``/api/status``: the figures as JSON (:meth:`FolderView.status`);
* ``/api/micrograph?stem=STEM``: one picked micrograph's picks; ``/overlay.png?stem=STEM``: its overlay;
* ``/files/PATH``: a file of the output folder (``failed.txt``, STAR files, the session file).

Only files inside the output folder or the package's ``static`` folder are served: a path is
decoded once, refused (403) with a ``..`` part, an absolute path or a backslash, and
resolved (symbolic links followed) and refused unless it still lies inside. A server bound
to anything but loopback needs a token (given, or generated and logged in the URL): a
request without it (``?token=``, the cookie the page gets, or ``Authorization: Bearer``)
is refused with 401. On loopback without a token, a request whose Host header names
another site (a page elsewhere rebinding its name to 127.0.0.1) is refused with 403. Each request's thread runs at a lower CPU priority than the picker's.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import os
import secrets
import socket
import sqlite3
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from emmae.errors import ConfigError, EmmaeError
from emmae.runtime.web.folder import FolderView, UnknownMicrograph

log = logging.getLogger("emmae.web")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
COOKIE = "emmae_token"
NICENESS = 10  # added to each request thread's nice value: the picker comes first
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    """A request answered with ``status`` and a one-line ``reason``."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (an IPv6 host in brackets) as (host, port); the host defaults to ``127.0.0.1``.

    Raises:
        ConfigError: not of that form, or a port outside 0-65535.
    """
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or int(port) > 65535 or (":" in host and not text.startswith("[")):
        raise ConfigError(f"--http {text}: give [HOST:]PORT, e.g. 8765 (this machine only), 0.0.0.0:8765 or [::1]:8765")
    return host or DEFAULT_HOST, int(port)


def is_loopback(host: str) -> bool:
    """``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def inside(root: Path, relative: str) -> Path:
    """The regular file ``relative`` (already URL-decoded) names below ``root``.

    Raises:
        Refused: 403 for a path that leaves ``root`` (``..``, absolute, a link out), 404 when there is no such file.
    """
    parts = relative.split("/")
    if not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative or ".." in parts:
        raise Refused(HTTPStatus.FORBIDDEN, "only files inside the output folder are served")
    base = root.resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused(HTTPStatus.NOT_FOUND, "no such file") from None
    if not target.is_relative_to(base):
        raise Refused(HTTPStatus.FORBIDDEN, "only files inside the output folder are served")
    if not target.is_file():
        raise Refused(HTTPStatus.NOT_FOUND, "no such file")
    return target


class ViewServer(ThreadingHTTPServer):
    """The web view of one :class:`FolderView` at ``host:port`` (port 0: any free one); ``token`` None: none needed.

    Raises:
        EmmaeError: the address cannot be bound (in use, not this machine's, no permission).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, view: FolderView, host: str, port: int, token: str | None) -> None:
        self.view, self.token, self.host = view, token, host
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), Handler)
        except (OSError, OverflowError) as exc:
            raise EmmaeError(f"cannot serve the web view on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                             "choose another port with --http") from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, host: str | None = None) -> str:
        """The page's address (with the token when one is needed); ``host`` as a browser should spell it."""
        shown = host or (socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host)
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> ViewServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="emmae-web", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port (requests in progress are left to finish on their own)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()


def serve(view: FolderView, address: str, token: str | None = None) -> ViewServer:
    """Start serving ``view`` at ``address`` (``[HOST:]PORT``) and log its URL. Beyond loopback a token is required:
    ``token``, or one generated here.

    Raises:
        ConfigError: a malformed address; EmmaeError: it cannot be bound.
    """
    host, port = parse_address(address)
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(18)
    server = ViewServer(view, host, port, token or None).start()
    log.info("web view of %s: %s", view.folder, server.url())
    if is_loopback(host):
        log.info("from another machine: ssh -L %d:localhost:%d USER@%s, then open http://localhost:%d/", server.port, server.port,
                 socket.gethostname(), server.port)
    return server


class Handler(BaseHTTPRequestHandler):
    """One request: see the module docstring."""

    server: ViewServer
    server_version = "emmae-view"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(os.getpriority(os.PRIO_PROCESS, 0) + NICENESS, 19))
        except (AttributeError, OSError):
            pass  # not Linux: the same priority

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _answer(self, body: bool) -> None:
        self._body = body
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if not self._addressed_here():
                raise Refused(HTTPStatus.FORBIDDEN, "this view answers requests addressed to localhost only (the Host header names "
                              "another site); open it as http://localhost:PORT/ or http://127.0.0.1:PORT/")
            if not self._authorised(query.get("token")):
                raise Refused(HTTPStatus.UNAUTHORIZED, "a token is needed: open the address the server logged (ending in ?token=...)")
            self._route(url.path, query)
        except Refused as refused:
            self._send(refused.status, f"{refused}\n".encode(), "text/plain")
        except sqlite3.Error as exc:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"the journal cannot be read now: {exc}\n".encode(), "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _addressed_here(self) -> bool:
        """On loopback without a token, the request names this machine in its Host header: a page elsewhere whose name
        was rebound to 127.0.0.1 (DNS rebinding) is refused. Beyond loopback the token guards every request."""
        header = self.headers.get("Host")
        if header is None or self.server.token is not None or not is_loopback(self.server.host):
            return True
        host = header.strip().lower()
        host = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if host.count(":") == 1 else host
        return is_loopback(host)

    def _authorised(self, given: str | None) -> bool:
        token = self.server.token
        if token is None:
            return True
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        header = self.headers.get("Authorization", "")
        offered = [given, cookie[COOKIE].value if COOKIE in cookie else None, header[7:] if header.startswith("Bearer ") else None]
        return any(o is not None and hmac.compare_digest(o.encode(), token.encode()) for o in offered)

    def _route(self, path: str, query: dict[str, str]) -> None:
        view = self.server.view
        if path in ("/", "/index.html"):
            cookie = {"Set-Cookie": f"{COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"} if self.server.token else {}
            self._file(STATIC / "index.html", cookie)
        elif path.startswith("/static/"):
            self._file(inside(STATIC, unquote(path[len("/static/"):])))
        elif path.startswith("/files/"):
            self._file(inside(view.folder, unquote(path[len("/files/"):])))
        elif path == "/api/status":
            self._json(view.status())
        elif path == "/api/micrograph":
            self._json(self._picks(lambda: view.micrograph(self._stem(query))))
        elif path == "/overlay.png":
            self._send(HTTPStatus.OK, self._picks(lambda: view.overlay(self._stem(query))), "image/png", {"Cache-Control": "no-cache"})
        else:
            raise Refused(HTTPStatus.NOT_FOUND, "no such page")

    @staticmethod
    def _stem(query: dict[str, str]) -> str:
        if not query.get("stem"):
            raise Refused(HTTPStatus.BAD_REQUEST, "give ?stem= of a micrograph /api/status lists")
        return query["stem"]

    @staticmethod
    def _picks(answer: object) -> object:
        try:
            return answer()  # type: ignore[operator]
        except UnknownMicrograph as exc:
            raise Refused(HTTPStatus.NOT_FOUND, f"no picked micrograph {exc}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise Refused(HTTPStatus.NOT_FOUND, f"its saved picks cannot be read: {exc}") from None

    def _json(self, data: object) -> None:
        self._send(HTTPStatus.OK, json.dumps(plain(data)).encode(), "application/json", {"Cache-Control": "no-store"})

    def _file(self, path: Path, headers: dict[str, str] | None = None) -> None:
        kind = "text/plain" if path.suffix in (".star", ".txt", ".log", ".box", ".cbox") else mimetypes.guess_type(path.name)[0]
        try:
            data = path.read_bytes()
        except OSError:
            raise Refused(HTTPStatus.NOT_FOUND, "no such file") from None
        self._send(HTTPStatus.OK, data, kind or "application/octet-stream", {"Cache-Control": "no-cache", **(headers or {})})

    def _send(self, status: HTTPStatus, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        charset = "; charset=utf-8" if kind.startswith("text/") or kind in ("application/json", "application/javascript") else ""
        for name, value in {"Content-Type": kind + charset, "Content-Length": str(len(data)), **SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "_body", True):
            self.wfile.write(data)


def plain(value: object) -> object:
    """``value`` in JSON's types: NumPy scalars as numbers, a NaN or an infinity as null (which browsers can parse)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # type: ignore[union-attr]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
