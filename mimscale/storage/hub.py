"""``hf://datasets/ORG/NAME[@REVISION]/path`` locations: WebDataset shards published on the Hugging Face Hub.

A location resolves to the Hub's file URL, ``{HF_ENDPOINT}/datasets/ORG/NAME/resolve/{revision}/{path}``, read by
the same bounded, retried standard-library client as https (storage/http_client.py); folders and globs are listed with
the Hub's tree API, ``/api/datasets/ORG/NAME/tree/{revision}/{folder}``, page after page (the ``Link: rel="next"``
header). ``HF_ENDPOINT`` (default https://huggingface.co), ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean
to huggingface_hub, read when a location is used (not once at import). The token goes as a bearer token to the
endpoint's own host only: the Hub redirects large files to a CDN with a signed URL, and that request (or any other
host's) never carries it. The token never appears in a message.

Why not huggingface_hub's ``HfFileSystem``: its reads are ranged block reads (or its own stream) with its own
retry policy, outside the size bounds, sha256 check and minimum rate every other shard download has here; it reads
the endpoint and offline mode once at import and asks the Hub for the repo's info before a listing. What it would
add for a whole-file GET of a known URL and a paginated listing is the ~150 lines below.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import http.client
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin

from mimscale.storage import http_client
from mimscale.storage.http_client import RemoteError, RemoteNotFound

DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_PAGE_BYTES = 64 << 20  # one page of the tree API (the Hub sends 1,000 entries, ~300 kB)
MAX_PAGES = 100_000
_REVISION = (
    r"refs/convert/[\w-]+|refs/pr/\d+|[^/?#]+"  # the Hub's special refs may be written unquoted, as in HfFileSystem
)
_LOCATION = re.compile(
    rf"^hf://(?P<kind>[^/]*)/(?P<org>[^/@?#]+)/(?P<name>[^/@?#]+)(?:@(?P<rev>{_REVISION}))?(?:/(?P<path>[^?#]*))?$",
    re.IGNORECASE,
)
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
_USAGE = "hf://datasets/ORG/NAME[@REVISION]/path/shard-{0000..0099}.tar"


@dataclass(frozen=True)
class HubPath:
    """One parsed location: the dataset repo, the revision as the user spelled it (a '/' in it URL-quoted, except in
    the Hub's ``refs/convert/NAME`` and ``refs/pr/N``), and the path inside the repo ('' for its root)."""

    repo: str
    rev_spelled: str
    path: str

    @property
    def revision(self) -> str:
        return unquote(self.rev_spelled) if self.rev_spelled else "main"

    def location(self, path: str) -> str:
        at = f"@{self.rev_spelled}" if self.rev_spelled else ""
        return f"hf://datasets/{self.repo}{at}/{path}"

    def file_url(self, endpoint: str) -> str:
        return f"{endpoint}/datasets/{self.repo}/resolve/{quote(self.revision, safe='')}/{quote(self.path)}"

    def tree_url(self, endpoint: str, folder: str, recursive: bool) -> str:
        query = "?recursive=true&expand=false" if recursive else "?expand=false"
        return f"{endpoint}/api/datasets/{self.repo}/tree/{quote(self.revision, safe='')}/{quote(folder)}{query}"

    def describe(self) -> str:
        return f"dataset {self.repo}, revision {self.revision}, path {self.path!r}"


def parse(location: str, key: str = "data.shards") -> HubPath:
    """The parts of an hf:// location; anything else (a model repo, '..', a query string) is refused, naming it."""
    match = _LOCATION.match(location)
    if not match or match["kind"] != "datasets":
        raise RemoteError(f"{key}={location!r}: an hf:// location names a dataset repo: {_USAGE}")
    repo_parts, path = (match["org"], match["name"]), match["path"] or ""
    if not all(_REPO_PART.match(part) and ".." not in part for part in repo_parts):
        raise RemoteError(f"{key}={location!r}: {'/'.join(repo_parts)!r} is not a Hub repo id (letters, digits, -_.)")
    if path.startswith("/") or any(part in ("..", ".") for part in path.split("/")):
        raise RemoteError(f"{key}={location!r}: the path inside the repo may not start with '/' or hold '.' or '..'")
    return HubPath("/".join(repo_parts), match["rev"] or "", path)


def endpoint() -> str:
    """HF_ENDPOINT as huggingface_hub reads it (default https://huggingface.co, trailing '/' dropped)."""
    value = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    if not value.lower().startswith(("http://", "https://")):
        raise RemoteError(f"HF_ENDPOINT={value!r} is not an http(s) URL; unset it for {DEFAULT_ENDPOINT}")
    return value


def _token() -> str | None:
    return os.environ.get("HF_TOKEN", "").strip() or None


def _check_online(location: str) -> None:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise RemoteError(
            f"{location}: HF_HUB_OFFLINE={value} forbids reaching the Hub; unset it to read hf:// shards "
            "(shards already in the node cache are read without it)"
        )


def _error_hook(where: HubPath, shown: str, base: str, token: str | None) -> http_client.HttpErrorHook:
    """Clear permanent errors for the Hub's own answers (not the CDN's: those keep the https meaning)."""

    def hook(status: int, reason: str, headers, url: str) -> Exception | None:
        if not url.startswith(base + "/"):
            return None
        code, text = headers.get("X-Error-Code", ""), headers.get("X-Error-Message", "")
        detail = f" ({code}: {text})" if code or text else f" ({reason})"
        if status == 404:
            return RemoteNotFound(f"{shown}: not on the Hub at {base}{detail}: {where.describe()}; check them")
        if status == 401 and token is None:
            return RemoteError(
                f"{shown}: the Hub answers 401{detail}: {where.repo} is gated, private or missing and no token was "
                f"sent; set HF_TOKEN to a token with access to it ({base}/settings/tokens)"
            )
        if status in (401, 403):
            return RemoteError(
                f"{shown}: the Hub refuses HF_TOKEN with {status}{detail}: check that the token is valid and has "
                f"access to {where.repo} (for a gated set, accept its conditions at {base}/datasets/{where.repo})"
            )
        return None

    return hook


@contextlib.contextmanager
def open_file(location: str, timeout: float) -> Iterator[tuple[object, int | None]]:
    """(reader, declared size) of one file of a Hub dataset, following the Hub's redirect to its CDN."""
    where, base, token = parse(location, "location"), endpoint(), _token()
    _check_online(location)
    hook = _error_hook(where, location, base, token)
    with http_client.open_http(where.file_url(base), timeout, token=token, on_error=hook) as opened:
        yield opened


# ----------------------------------------------------------------------------------------------- listing


def expand(candidates: list[str], shown: str, key: str) -> list[str]:
    """Shard locations of brace-expanded hf:// candidates: a .tar file as named (its existence is checked when it is
    read), a folder's .tar files, or a glob's matches (``*``, ``?``, ``[..]`` within one path segment)."""
    found: list[str] = []
    for candidate in candidates:
        where = parse(candidate, key)
        if where.path.endswith(".tar") and not glob.has_magic(where.path):
            found.append(candidate)
            continue
        pattern = where.path if glob.has_magic(where.path) else f"{where.path.rstrip('/')}/*.tar".lstrip("/")
        found.extend(where.location(path) for path in _matching(where, candidate, pattern, key))
    if not found:
        raise RemoteError(f"{key}={shown!r} matches no .tar shards on the Hub; check the repo, revision and pattern")
    return found


def _matching(where: HubPath, shown: str, pattern: str, key: str) -> list[str]:
    parts = pattern.split("/")
    if "**" in parts:
        raise RemoteError(f"{key}={shown!r}: '**' is not supported; name each folder level with '*'")
    fixed = next((n for n, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    folder = "/".join(parts[:fixed])
    paths = _list_files(where, shown, folder, recursive=len(parts) - fixed > 1)
    return sorted(
        path
        for path in paths
        if path.endswith(".tar")
        and len(path.split("/")) == len(parts)
        and all(fnmatch.fnmatchcase(got, wanted) for got, wanted in zip(path.split("/"), parts, strict=True))
    )


def _list_files(where: HubPath, shown: str, folder: str, recursive: bool) -> list[str]:
    """Every file path under ``folder`` from the tree API, following its pages; a malformed page is refused."""
    base, token = endpoint(), _token()
    _check_online(shown)
    hook = _error_hook(HubPath(where.repo, where.rev_spelled, folder), shown, base, token)
    url: str | None = where.tree_url(base, folder, recursive)
    files: list[str] = []
    for _ in range(MAX_PAGES):
        if url is None:
            return files
        body, link = _page(url, shown, token, hook)
        files.extend(_files_of(body, folder, shown))
        following = _NEXT.search(link)
        url = urljoin(url, following.group(1)) if following else None
        if url is not None and not url.startswith(base + "/"):
            raise RemoteError(f"{shown}: the Hub's listing points its next page at another host ({url}); refused")
    raise RemoteError(f"{shown}: the Hub's listing has more than {MAX_PAGES} pages; name the shards with braces")


def _page(url: str, shown: str, token: str | None, hook: http_client.HttpErrorHook) -> tuple[bytes, str]:
    def attempt() -> tuple[bytes, str]:
        buffer = io.BytesIO()
        try:
            with http_client.open_http(url, 60.0, token=token, on_error=hook) as (response, declared):
                http_client.copy_bounded(
                    response, buffer, location=shown, declared=declared, bound=MAX_PAGE_BYTES, timeout_s=60.0
                )
                return buffer.getvalue(), response.headers.get("Link", "")
        except RemoteError:  # a 404 is a FileNotFoundError too: permanent, not a reset
            raise
        except (OSError, http.client.HTTPException) as err:  # reset or timeout while reading the body
            raise http_client.TransientError(f"{type(err).__name__}: {err}") from None

    return http_client.with_retries(f"the Hub's listing for {shown}", attempt, retries=3, backoff_s=0.5)


def _files_of(body: bytes, folder: str, shown: str) -> list[str]:
    try:
        entries = json.loads(body)
    except ValueError as err:
        raise RemoteError(f"{shown}: the Hub's listing is not JSON ({err})") from None
    prefix = f"{folder}/" if folder else ""
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry.get("type") in ("file", "directory")
        for entry in entries
    ):
        raise RemoteError(f"{shown}: the Hub's listing is not a list of files and folders; check HF_ENDPOINT")
    paths = [entry["path"] for entry in entries if entry["type"] == "file"]
    stray = [path for path in paths if not path.startswith(prefix) or ".." in path.split("/")]
    if stray:
        raise RemoteError(f"{shown}: the Hub's listing of {folder!r} names {stray[0]!r}, outside it; refused")
    return paths
