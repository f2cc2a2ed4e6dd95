"""A threaded HTTP server for a shard folder on 127.0.0.1, with added latency, request counts and injected faults.

The tests and ``bench/bench_remote.py`` read shards through it as they would from a real server; try remote
reading by hand with ``python tests/http_serve.py shards/sample --latency-ms 50`` and
``--set data.shards=http://127.0.0.1:PORT/train-{000..003}.tar``.

Faults (``server.faults[name] = [...]``, one consumed per request of that file): ``"500"`` answers HTTP 500,
``"close"`` sends half the body then closes the connection, ``"hang"`` sends half the body and then waits until
``server.release`` is set, ``"extra"`` sends the body plus 100 junk bytes with no Content-Length, ``"long"``
declares and sends 100 more bytes than the file has, ``"trickle"`` declares the full length and then sends one byte
every ``server.trickle_s`` seconds (fast enough for any per-read timeout, too slow to ever finish) until the client
goes away. ``server.require_query = "X-Amz-Signature=good"`` makes it a pre-signed-URL store: a request whose
query string lacks that text gets HTTP 403, as a signed URL edited into another one would. ``server.authorizations``
lists the Authorization header of every request (None when absent): a CDN behind a token-holding host must see none.
``request_log`` (``--request-log FILE``) appends "CLIENT-ADDRESS METHOD NAME" per request; with ``--bind`` it serves a
namespace cluster's nodes from its storage host (tests/cluster.py ``serve``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        owner = self.server.owner
        with owner.lock:
            owner.active += 1
            owner.peak_active = max(owner.peak_active, owner.active)
        try:
            self._answer(owner)
        finally:
            with owner.lock:
                owner.active -= 1

    def _answer(self, owner: ShardServer) -> None:
        parts = urlsplit(self.path)
        name = unquote(parts.path).lstrip("/")
        path = (owner.root / name).resolve()
        with owner.lock:
            owner.requests[name] += 1
            owner.authorizations.append(self.headers.get("Authorization"))
            if owner.request_log is not None:  # one line per request: client address, method, file name
                owner.request_log.write(f"{self.client_address[0]} {self.command} {name}\n")
                owner.request_log.flush()
            fault = owner.faults.get(name, []).pop(0) if owner.faults.get(name) else ""
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if owner.require_query and owner.require_query not in parts.query:
            self.send_error(403, "signature does not match")
            return
        if owner.root not in path.parents or not path.is_file():
            self.send_error(404)
            return
        if fault == "500":
            self.send_error(500, "injected failure")
            return
        self._send(path.read_bytes(), fault)

    def _send(self, body: bytes, fault: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        if fault != "extra":
            self.send_header("Content-Length", str(len(body) + (100 if fault == "long" else 0)))
        self.end_headers()
        if fault == "trickle":
            with contextlib.suppress(OSError):  # the client gave up: that is the point
                for byte in range(len(body)):
                    self.wfile.write(body[byte : byte + 1])
                    self.wfile.flush()
                    time.sleep(self.server.owner.trickle_s)
            return
        if fault in ("close", "hang"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault == "hang":
                self.server.owner.hanging.set()
                self.server.owner.release.wait(120)
            self.close_connection = True
            return
        self.wfile.write(body + (b"\0" * 100 if fault in ("extra", "long") else b""))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ShardServer


class ShardServer:
    """``with ShardServer(folder, latency_s=0.05) as server: server.url("x.tar")``."""

    def __init__(
        self,
        root: str | os.PathLike,
        latency_s: float = 0.0,
        port: int = 0,
        host: str = "127.0.0.1",
        request_log: str | os.PathLike | None = None,
    ):
        self.root, self.host = Path(root).resolve(), host
        self.request_log = open(request_log, "a") if request_log else None  # noqa: SIM115 - closed in __exit__
        self.latency_s = latency_s
        self.requests: Counter = Counter()
        self.authorizations: list[str | None] = []
        self.active = self.peak_active = 0  # requests being answered now, and the most at once so far
        self.faults: dict[str, list[str]] = {}
        self.trickle_s = 0.2
        self.require_query = ""
        self.lock = threading.Lock()
        self.hanging, self.release = threading.Event(), threading.Event()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="shard-http", daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self.request_log is not None:
            self.request_log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (a test host's own address)")
    parser.add_argument("--request-log", help="append 'CLIENT METHOD NAME' for every request to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop by pid closes the log like Ctrl-C
    server = ShardServer(args.folder, args.latency_ms / 1000, args.port, args.bind, args.request_log)
    with server:
        print(f"serving {server.root} at {server.url()} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
