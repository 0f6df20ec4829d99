"""A fixture NeuroVault server on 127.0.0.1, serving a snapshot directory, with switchable faults.

It behaves like the real API as described in ``docs/neurovault-api.md``: 301 to the trailing-slash URL,
DRF limit/offset pagination (default 100, cap 1000, absolute ``next``/``previous``), 404 bodies
``{"detail": "Not found."}``, 403 for private collections (API and media), media as raw bytes with
``Content-Length``. ``https://neurovault.org`` in the JSON it serves is rewritten to its own base.

Example
-------
>>> with FixtureServer(snapshot_root) as srv:                        # doctest: +SKIP
...     srv.add_fault(r"^/api/images/12/", "status", times=2, code=503)
...     make_client({"url": srv.url, ...}).image(12)

Run stand-alone with ``python -m nvmeta.testing.server ROOT [--port N]``.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from nvmeta.neurovault.layout import PUBLIC_BASE, Snapshot, UnsafePath, api_get

FAULT_KINDS = (
    "status",
    "retry_after",
    "truncate",
    "reset",
    "stall",
    "html200",
    "redirect",
    "redirect_loop",
    "empty_page",
    "duplicate",
    "miscount",
    "down",
    "not_nifti",
)

HTML_ERROR = (
    "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>\n"
    "<body><center><h1>{code} {reason}</h1></center><hr><center>nginx/1.15.6</center></body></html>\n"
)


@dataclass
class Fault:
    """One registered fault. ``times`` None = every matching request; ``hits`` counts applications."""

    pattern: re.Pattern
    kind: str
    times: int | None
    opts: dict
    hits: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict = field(default_factory=dict)
    obj: Any = None  # parsed JSON before serialisation (for page faults)


class FixtureServer:
    """NeuroVault-like HTTP server over a snapshot directory (context manager, daemon thread).

    Parameters
    ----------
    root : path-like
        Snapshot root (layout in :mod:`nvmeta.neurovault.layout`).
    latency : float
        Seconds slept before answering every request.
    public_base : str, optional
        What ``https://neurovault.org`` in served JSON is rewritten to (default: the server's own base,
        ``http://127.0.0.1:PORT``). Set e.g. ``"http://neurovault.org"`` to test link rewriting.
    private_image_status : int
        Status of ``/api/images/{id}/`` for an image of a private collection (404 on the real server).
    max_limit : int
        Largest page size served (1000 on the real server); smaller values make short listings
        span several pages.

    Attributes
    ----------
    url : str
        API root, ``http://127.0.0.1:PORT/api/``.
    base : str
        ``http://127.0.0.1:PORT``.
    requests : list of str
        Request paths (with query) in arrival order, faulted ones included.
    log : list of dict
        ``{"t", "method", "path", "status", "fault", "user_agent"}`` per request (``t``: time.monotonic()).
    max_in_flight : int
        Largest number of requests served at the same time.
    """

    def __init__(
        self,
        root: str | Path,
        latency: float = 0.0,
        public_base: str | None = None,
        private_image_status: int = 404,
        max_limit: int = 1000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.snapshot = Snapshot(root)
        self.latency = float(latency)
        self.private_image_status = private_image_status
        self.max_limit = int(max_limit)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._stop = threading.Event()
        self.requests: list[str] = []
        self.log: list[dict] = []
        self.bytes_sent = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.fixture = self
        self.base = f"http://{host}:{self._httpd.server_address[1]}"
        self.url = f"{self.base}/api/"
        self.public_base = public_base or self.base
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FixtureServer:
        """Start serving in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
            self._thread.daemon = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (wakes stalled handlers) and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FixtureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------------
    def add_fault(self, path_regex: str, kind: str, times: int | None = None, **opts: Any) -> Fault:
        """Register a fault for requests whose path (with query) matches ``path_regex`` (re.search).

        Parameters
        ----------
        path_regex : str
        kind : str
            One of :data:`FAULT_KINDS`:

            - ``"status"``: reply ``code`` (default 500) with an nginx-style HTML body.
            - ``"retry_after"``: 429 with ``Retry-After: seconds`` (default 1).
            - ``"truncate"``: declare the full Content-Length, send ``fraction`` (default 0.5) of the body, close.
            - ``"reset"``: send ``fraction`` (default 0.5) of the body, then a TCP RST (SO_LINGER 0).
            - ``"stall"``: sleep ``seconds`` (default 5) before replying normally.
            - ``"html200"``: an HTML error page with status 200.
            - ``"redirect"``: 301 to ``location`` (``{base}`` in it is replaced by the server base).
            - ``"redirect_loop"``: 301 to the same URL.
            - ``"empty_page"``: a listing page with ``results: []`` (count, next unchanged).
            - ``"miscount"``: a listing page whose ``count`` is ``count`` (default 3) instead of the
              real number (``next``/``results`` unchanged), as listings that under-report do.
            - ``"duplicate"``: a listing page starts with the previous page's last item
              (``mode="prepend"``, default, nothing lost; ``mode="replace"``: the page's own last item is lost).
            - ``"down"``: close the connection without reply (``mode="close"``, default) or 503 (``mode="503"``).
            - ``"not_nifti"``: media replaced by a valid gzip of non-NIfTI bytes.
        times : int, optional
            How many matching requests get the fault (None = all), then normal service.

        Returns
        -------
        Fault
            Its ``hits`` counts how often it was applied.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if kind == "redirect" and "location" not in opts:
            raise ValueError('fault "redirect" needs location=...')
        fault = Fault(re.compile(path_regex), kind, times, opts)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.active and f.pattern.search(path):
                    f.hits += 1
                    return f
        return None

    # -- counters --------------------------------------------------------------------------------
    def count(self, path_regex: str = "") -> int:
        """Number of requests whose path (with query) matches ``path_regex``."""
        rx = re.compile(path_regex)
        with self._lock:
            return sum(1 for p in self.requests if rx.search(p))

    def reset_log(self) -> None:
        """Forget the request log and counters."""
        with self._lock:
            self.requests.clear()
            self.log.clear()
            self.bytes_sent = 0
            self.max_in_flight = self.in_flight

    def _begin(self, method: str, path: str) -> dict:
        entry = {"t": time.monotonic(), "method": method, "path": path, "status": None, "fault": None}
        with self._lock:
            self.requests.append(path)
            self.log.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return entry

    def _end(self, nbytes: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.bytes_sent += nbytes

    # -- routing ---------------------------------------------------------------------------------
    def _json(self, status: int, obj: Any) -> _Reply:
        text = json.dumps(obj).replace(PUBLIC_BASE, self.public_base)
        return _Reply(status, text.encode(), "application/json", obj=obj)

    def _html(self, status: int, reason: str) -> _Reply:
        return _Reply(
            status, HTML_ERROR.format(code=status, reason=reason).encode(), "text/html; charset=utf-8"
        )

    def route(self, raw_path: str) -> _Reply:
        """Normal (fault-free) reply for a GET of ``raw_path``."""
        parts = urlsplit(raw_path)
        path, query = parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))
        if path.startswith("/media/"):
            return self._media(path)
        if path == "/api" or path.startswith("/api/"):
            if not path.endswith("/"):
                loc = f"{self.base}{path}/" + (f"?{parts.query}" if parts.query else "")
                return _Reply(301, b"", "text/html; charset=utf-8", {"Location": loc})
            if path == "/api/decode/":
                iid = query.get("neurovault", "")
                reply = self.snapshot.neurosynth(int(iid)) if iid.isdigit() else None
                return self._json(404, {"detail": "Not found."}) if reply is None else self._json(200, reply)
            status, obj = api_get(
                self.snapshot,
                path[len("/api/") :],
                query,
                base=self.public_base,
                private_image_status=self.private_image_status,
                max_limit=self.max_limit,
            )
            return self._json(status, obj)
        return self._html(404, "Not Found")

    def _media(self, path: str) -> _Reply:
        try:
            local = self.snapshot.media_path(path)
            cid = self.snapshot.media_collection(path)
        except UnsafePath:
            return self._html(404, "Not Found")
        if self.snapshot.is_private(cid):
            return self._html(403, "Forbidden")
        if not local.is_file():
            return self._html(404, "Not Found")
        return _Reply(200, local.read_bytes(), "application/octet-stream")

    def _apply_page_fault(self, fault: Fault, raw_path: str, reply: _Reply) -> _Reply:
        obj = reply.obj
        if not (isinstance(obj, dict) and isinstance(obj.get("results"), list)):
            return reply
        if fault.kind == "empty_page":
            obj = dict(obj, results=[])
        elif fault.kind == "miscount":
            obj = dict(obj, count=int(fault.opts.get("count", 3)))
        else:  # duplicate
            parts = urlsplit(raw_path)
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            try:
                offset = int(query.get("offset", 0))
            except ValueError:
                offset = 0
            if offset <= 0:
                return reply
            _, prev = api_get(
                self.snapshot, parts.path[len("/api/") :], dict(query, limit="1", offset=str(offset - 1))
            )
            if not prev.get("results"):
                return reply
            results = obj["results"]
            if fault.opts.get("mode", "prepend") == "replace":
                results = results[:-1]
            obj = dict(obj, results=prev["results"] + results)
        return self._json(reply.status, obj)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    fixture: FixtureServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nvmeta-fixture/1.0"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body
        # until the client's delayed ACK, a wait on every reply
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, BrokenPipeError, OSError, ValueError):
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (ConnectionError, OSError, ValueError):
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    # -- helpers ---------------------------------------------------------------------------------
    def _send(
        self, reply: _Reply, head: bool, entry: dict, *, declared: int | None = None, part: int | None = None
    ) -> int:
        entry["status"] = reply.status
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body) if declared is None else declared))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if part is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return 0
        body = reply.body if part is None else reply.body[:part]
        self.wfile.write(body)
        self.wfile.flush()
        return len(body)

    def _rst(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _serve(self, head: bool) -> None:
        srv = self.server.fixture
        raw = self.path
        entry = srv._begin(self.command, raw)
        entry["user_agent"] = self.headers.get("User-Agent")
        sent = 0
        try:
            if srv.latency:
                srv._stop.wait(srv.latency)
            fault = srv._take_fault(raw)
            entry["fault"] = fault.kind if fault else None
            if fault is None:
                sent = self._send(srv.route(raw), head, entry)
                return
            kind, opts = fault.kind, fault.opts
            if kind == "down":
                if opts.get("mode", "close") == "503":
                    sent = self._send(srv._html(503, "Service Unavailable"), head, entry)
                else:
                    entry["status"] = 0
                    self._rst()
                return
            if kind == "status":
                code = int(opts.get("code", 500))
                sent = self._send(srv._html(code, _reason(code)), head, entry)
                return
            if kind == "retry_after":
                reply = srv._json(429, {"detail": "Request was throttled."})
                reply.headers["Retry-After"] = str(opts.get("seconds", 1))
                sent = self._send(reply, head, entry)
                return
            if kind == "html200":
                body = (
                    b"<!DOCTYPE html><html><head><title>Server Error</title></head><body>"
                    b"<h1>Something went wrong</h1></body></html>"
                )
                sent = self._send(_Reply(200, body, "text/html; charset=utf-8"), head, entry)
                return
            if kind == "redirect":
                loc = str(opts["location"]).replace("{base}", srv.base)
                sent = self._send(_Reply(301, b"", "text/html", {"Location": loc}), head, entry)
                return
            if kind == "redirect_loop":
                sent = self._send(_Reply(301, b"", "text/html", {"Location": srv.base + raw}), head, entry)
                return
            if kind == "stall":
                srv._stop.wait(float(opts.get("seconds", 5)))
                if srv._stop.is_set():
                    return
                sent = self._send(srv.route(raw), head, entry)
                return
            reply = srv.route(raw)
            if kind in ("empty_page", "duplicate", "miscount"):
                reply = srv._apply_page_fault(fault, raw, reply)
                sent = self._send(reply, head, entry)
            elif kind == "not_nifti":
                if reply.status == 200 and reply.obj is None:
                    reply = _Reply(
                        200, gzip.compress(b"this is not a NIfTI image\n" * 64, mtime=0), reply.content_type
                    )
                sent = self._send(reply, head, entry)
            elif kind == "truncate":
                part = int(len(reply.body) * float(opts.get("fraction", 0.5)))
                sent = self._send(reply, head, entry, part=part)
                self.close_connection = True
            elif kind == "reset":
                part = int(len(reply.body) * float(opts.get("fraction", 0.5)))
                sent = self._send(reply, head, entry, part=part)
                self._rst()
        finally:
            srv._end(sent)


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def main(argv: list[str] | None = None) -> None:
    """Serve a snapshot until interrupted (prints the API URL)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args(argv)
    with FixtureServer(a.root, latency=a.latency, port=a.port) as srv:
        print(srv.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
