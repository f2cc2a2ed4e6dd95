"""A stand-in for the Hugging Face Hub on 127.0.0.1: its file (resolve) and tree routes for a local folder.

``root/ORG/NAME/REVISION/...`` is dataset ORG/NAME at that revision. ``GET /datasets/ORG/NAME/resolve/REV/PATH``
answers a file as the Hub does: small files directly, ``.tar`` files (the Hub's LFS files) with a 302 to a signed
URL on a second server (``cdn``, a tests/http_serve.py ShardServer on another port, i.e. another host) when one is
given. ``GET /api/datasets/ORG/NAME/tree/REV/PATH[?recursive=true]`` lists a folder ``page_size`` entries at a time,
the next page named in a ``Link: <...>; rel="next"`` header. Errors carry the Hub's ``X-Error-Code`` /
``X-Error-Message`` headers: 404 RepoNotFound, RevisionNotFound or EntryNotFound; a repo in ``gated`` answers 401
GatedRepo without ``Authorization: Bearer <its token>`` and 403 with another token; a repo in ``renamed`` (old name
-> new) answers 307 with a relative Location on the new name, as the Hub does. ``requests`` records (path,
Authorization header) of every request.

By hand: ``python tests/hub_serve.py FOLDER`` then ``HF_ENDPOINT=http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from http_serve import ShardServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        hub = self.server.owner
        parts = urlsplit(self.path)
        segments = [unquote(segment) for segment in parts.path.split("/")]
        with hub.lock:
            hub.requests.append((parts.path, self.headers.get("Authorization")))
        if segments[1:3] == ["api", "datasets"] and len(segments) >= 7 and segments[5] == "tree":
            self._route(segments[3:5], segments[6], "/".join(segments[7:]), parts.query, tree=True)
        elif segments[1] == "datasets" and len(segments) >= 7 and segments[4] == "resolve":
            self._route(segments[2:4], segments[5], "/".join(segments[6:]), parts.query, tree=False)
        else:
            self._fail(404, "", "no such route")

    def _route(self, repo_parts: list[str], revision: str, path: str, query: str, tree: bool) -> None:
        hub, repo = self.server.owner, "/".join(repo_parts)
        if repo in hub.renamed:  # the Hub answers a renamed repo's old name with a relative redirect to the new one
            self.send_response(307)
            self.send_header("Location", self.path.replace(f"/{repo}/", f"/{hub.renamed[repo]}/", 1))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if repo in hub.gated:
            sent = self.headers.get("Authorization")
            if sent is None:
                self._fail(401, "GatedRepo", f"Access to dataset {repo} is restricted. You must be authenticated.")
                return
            if sent != f"Bearer {hub.gated[repo]}":
                self._fail(403, "GatedRepo", f"Access to dataset {repo} is restricted and you are not in the list.")
                return
        repo_dir = hub.root / repo
        if ".." in repo_parts or not repo_dir.is_dir():
            self._fail(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return
        base = (repo_dir / revision).resolve()
        if base.parent != repo_dir.resolve() or not base.is_dir():
            self._fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        target = (base / path).resolve()
        if (target != base and base not in target.parents) or not target.exists():
            self._fail(404, "EntryNotFound", f"{path} does not exist on {revision!r}")
            return
        if tree:
            self._tree(base, target, parse_qs(query))
        elif target.suffix == ".tar" and hub.cdn is not None:
            self.send_response(302)
            self.send_header("Location", hub.cdn.url(f"{repo}/{revision}/{path}") + "?X-Amz-Signature=good")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(target.read_bytes(), "application/octet-stream")

    def _tree(self, base: Path, folder: Path, query: dict) -> None:
        hub = self.server.owner
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        found = sorted(folder.rglob("*") if recursive else folder.iterdir())
        entries = [
            {"type": "directory" if item.is_dir() else "file", "oid": "0" * 40, "path": str(item.relative_to(base))}
            | ({} if item.is_dir() else {"size": item.stat().st_size})
            for item in found
        ]
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + hub.page_size]
        links = {}
        if start + hub.page_size < len(entries):
            following = self.path.split("?")[0]
            flag = "true" if recursive else "false"
            links["Link"] = f'<{hub.url()}{following}?recursive={flag}&cursor={start + hub.page_size}>; rel="next"'
        self._send(json.dumps(page).encode(), "application/json", links)

    def _send(self, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HubServer


class HubServer:
    """``with HubServer(folder, cdn=True) as hub: os.environ["HF_ENDPOINT"] = hub.url()``; ``hub.cdn`` is the
    ShardServer that large files redirect to (None with ``cdn=False``)."""

    def __init__(self, root: str | os.PathLike, *, cdn: bool = True, page_size: int = 1000, port: int = 0):
        self.root = Path(root).resolve()
        self.page_size = page_size
        self.gated: dict[str, str] = {}  # repo -> the token it accepts
        self.renamed: dict[str, str] = {}  # old repo name -> new
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.cdn = ShardServer(self.root, port=0) if cdn else None
        if self.cdn is not None:
            self.cdn.require_query = "X-Amz-Signature=good"
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-http", daemon=True)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HubServer:
        if self.cdn is not None:
            self.cdn.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self.cdn is not None:
            self.cdn.__exit__(*exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="holds ORG/NAME/REVISION/... for each dataset repo")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    with HubServer(args.folder, port=args.port) as hub:
        print(f"serving {hub.root} as a Hub at {hub.url()}: export HF_ENDPOINT={hub.url()} (Ctrl-C to stop)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
