"""The bounded, retried standard-library HTTP client and the error types that every kind of location shares.

storage/remote.py (locations of every scheme) and storage/hub.py (the Hugging Face Hub) both build on it; it sits
below both so neither imports the other for these. ``TransientError`` marks a failure worth retrying;
``with_retries`` turns the last one into a RemoteError that names the location.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

CHUNK = 1 << 20
MAX_BACKOFF_S = 30.0


class RemoteError(ValueError):
    """A shard location cannot be used: unknown scheme, missing package or credentials, a full cache, or a network
    failure that outlasted the retries. The message names the location (or config key) and what to do."""


class RemoteNotFound(RemoteError, FileNotFoundError):
    """The location does not exist (HTTP 404, missing object or file)."""


class TransientError(Exception):
    """A failure worth retrying (connection reset, timeout, HTTP 5xx, truncated body); the message is the reason."""


class SinkError(RemoteError):
    """Writing the local copy failed (a full disk, a read-only folder): not the source's fault, never retried."""

    def __init__(self, err: OSError):
        super().__init__(f"{err.strerror or err}")
        self.error = err


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects carrying the Authorization header only to the same scheme, host and port: a token for the
    Hub is never sent to the CDN (or any other host) that a file URL redirects to. The header is added as an
    "unredirected" one, which urllib drops on every redirect; this puts it back where the origin is unchanged."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and _origin(newurl) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


HttpErrorHook = Callable[[int, str, object, str], "Exception | None"]  # (status, reason, headers, URL) -> error


@contextlib.contextmanager
def open_http(
    url: str, timeout: float, *, token: str | None = None, on_error: HttpErrorHook | None = None
) -> Iterator[tuple[object, int | None]]:
    """(response, declared size) of a GET; ``token`` goes as a bearer token to ``url``'s own host only (never on a
    redirect to another one); ``on_error`` may turn an HTTP error status into a clearer permanent error."""
    request = urllib.request.Request(url, headers={"User-Agent": "mimscale", "Accept-Encoding": "identity"})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.build_opener(_SameHostAuth).open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        custom = on_error(err.code, str(err.reason), err.headers, err.geturl() or url) if on_error else None
        if custom is not None:
            raise custom from None
        if err.code in (404, 410):
            raise RemoteNotFound(f"{url}: HTTP {err.code} {err.reason}; check the URL") from None
        if err.code in (401, 403):
            raise RemoteError(
                f"{url}: HTTP {err.code} {err.reason}; check the credentials (expired signed URL?)"
            ) from None
        if err.code in (408, 425, 429) or err.code >= 500:
            raise TransientError(f"HTTP {err.code} {err.reason}") from None
        raise RemoteError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise TransientError(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
    length = response.headers.get("Content-Length", "")
    with response:
        yield response, int(length) if length.isdigit() else None


def copy_bounded(
    reader,
    sink,
    *,
    location: str,
    declared: int | None,
    expected: int | None = None,
    sha256: str | None = None,
    bound: int,
    digest=None,
    min_rate: float | None = None,
    timeout_s: float = 0.0,
) -> int:
    """Copy reader to sink, never reading more than the size we expect; returns the bytes copied.

    The expected size is the manifest's when known, else what the server declared, else ``bound``. A server that
    declares or sends more is refused (RemoteError); a short body or a sha256 mismatch is retryable. ``digest`` (a
    hashlib object) is fed every byte as it streams, so a caller records the file's sha256 without a second read.
    With ``min_rate`` (bytes/s) the whole copy must end within expected size / min_rate + ``timeout_s`` (the
    per-read timeout): a source trickling bytes just fast enough to defeat the per-read timeout is cut off (and
    retried). Reads take what has arrived (``read1``), so the deadline is checked between small reads. A failing
    write to ``sink`` raises SinkError.
    """
    if expected is not None and declared is not None and declared != expected:
        raise RemoteError(
            f"{location}: the source reports {declared} bytes but the manifest says {expected}; the shard changed "
            "since the manifest was written: re-index the shard set or restore the original file"
        )
    limit = next(size for size in (expected, declared, bound) if size is not None)
    digest = digest if digest is not None else (hashlib.sha256() if sha256 else None)
    allowed = limit / min_rate + timeout_s if min_rate else math.inf
    deadline = time.monotonic() + allowed
    read = getattr(reader, "read1", None) or reader.read
    total = 0
    while True:
        chunk = read(min(CHUNK, limit + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise RemoteError(f"{location}: the source sent more than the {limit} bytes expected; refusing it")
        try:
            sink.write(chunk)
        except OSError as err:
            raise SinkError(err) from err
        if digest is not None:
            digest.update(chunk)
        if time.monotonic() > deadline:
            raise TransientError(
                f"{total} of {limit} bytes after {allowed:.0f} s, slower than data.download_min_rate={min_rate:g} "
                "bytes/s allows"
            )
    wanted = expected if expected is not None else declared
    if wanted is not None and total != wanted:
        raise TransientError(f"the transfer ended after {total} of {wanted} bytes")
    if sha256 and digest.hexdigest() != sha256:
        raise TransientError(f"sha256 {digest.hexdigest()[:12]}... differs from the manifest's {sha256[:12]}...")
    return total


def with_retries(location: str, attempt: Callable[[], object], *, retries: int, backoff_s: float):
    """Run attempt(), retrying TransientError failures with jittered exponential backoff; then a RemoteError."""
    start, reason = time.monotonic(), ""
    for number in range(retries + 1):
        try:
            return attempt()
        except TransientError as err:
            reason = str(err)
        if number < retries:
            time.sleep(min(MAX_BACKOFF_S, backoff_s * 2**number) * random.uniform(0.5, 1.5))
    raise RemoteError(
        f"could not read {location}: {reason} ({retries + 1} attempts over {time.monotonic() - start:.1f} s); "
        "check the URL, the network and the credentials, then resume the run"
    )
