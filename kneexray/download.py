"""Fetch one file over http(s) or file:// with resume, bounded retries, a size cap and a checksum.

Bytes stream into ``<dest>.part``; only a complete, verified file is renamed over ``dest``, so an
earlier good ``dest`` survives any failure. A stale ``.part`` from an earlier run is discarded
rather than resumed, because nothing records which URL or version it came from.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from kneexray import __version__

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https", "file")
ALTERNATIVES = (
    "alternatives: dataset.source=phantom (built-in synthetic data) or dataset.source=path "
    "with dataset.path=<zip or folder downloaded by hand>"
)
_CHUNK = 64 * 1024
_MAX_DELAY = 60.0  # cap on one back-off sleep, whatever backoff/retries say
_OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}
_RETRY_STATUSES = {408, 425, 429}  # 4xx codes that mean "try again later", not "wrong URL"


class DownloadError(RuntimeError):
    """A download failed; the message is a single human-readable line."""


class _Retryable(Exception):
    """A transient failure worth another attempt; `reason` is the human part of the message."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    max_bytes: int = 2**31,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    `retries` counts attempts after the first; the n-th retry waits ``backoff * 2**(n-1)`` seconds
    (capped at 60 s) and resumes the partial file with an HTTP Range request. `timeout` bounds the
    connection and each socket read. 4xx answers fail at once; 5xx, timeouts and dropped or
    truncated connections are retried. Raises DownloadError with a one-line message.
    """
    dest = Path(dest)
    shown = _redact(url)
    expected = _normalise_sha256(sha256)
    if retries < 0 or timeout <= 0 or backoff < 0 or max_bytes < 0:
        raise ValueError("retries, backoff and max_bytes must be >= 0 and timeout > 0")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadError(
            f"unsupported URL scheme {scheme + '://' if scheme else '(none)'} in {shown}: "
            "use http://, https:// or file://"
        )
    if scheme != "file":
        try:
            host_ok, _ = parts.hostname, parts.port  # .port raises on a malformed port
        except ValueError as err:
            raise DownloadError(f"malformed URL {shown}: {err}") from None
        if not host_ok:
            raise DownloadError(f"malformed URL {shown}: no host name")
        if "@" in parts.netloc:  # urllib would treat "user:pw@host" as a host name
            raise DownloadError(f"user:password in the URL {shown} is not supported")
    if dest.is_dir():
        raise DownloadError(f"download destination {dest} is a folder, expected a file path")

    part = dest.with_name(dest.name + ".part")
    done = False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _unlink(part)
        if scheme == "file":
            _copy_local(parts, part, max_bytes=max_bytes, progress=progress, shown=shown)
        else:
            _fetch_http(url, part, max_bytes=max_bytes, timeout=timeout, retries=retries,
                        backoff=backoff, progress=progress, shown=shown)
        if expected is not None:
            actual = sha256_file(part)
            if actual != expected:
                raise DownloadError(
                    f"checksum mismatch for {shown}: expected sha256 {expected}, got {actual}"
                )
        os.replace(part, dest)  # atomic: readers see the old dest or the new one
        done = True
    except OSError as err:  # local file-system trouble (disk full, permissions)
        raise DownloadError(f"cannot write {part}: {_one_line(err)}") from err
    finally:
        if not done:
            _unlink(part)  # also on KeyboardInterrupt: a .part is never resumed by a later run
    log.info("downloaded %s -> %s (%d bytes)", shown, dest, dest.stat().st_size)
    return dest


# --------------------------------------------------------------------------------------- http(s)


def _fetch_http(url: str, part: Path, *, max_bytes: int, timeout: float, retries: int,
                backoff: float, progress: bool, shown: str) -> None:
    opener = urllib.request.build_opener()  # per call, so proxy settings follow the environment
    last: _Retryable | None = None
    for attempt in range(retries + 1):
        try:
            _fetch_once(opener, url, part, max_bytes=max_bytes, timeout=timeout,
                        progress=progress, shown=shown)
            return
        except _Retryable as err:
            last = err
            if attempt == retries:
                break
            delay = min(backoff * 2**attempt, _MAX_DELAY)
            have = part.stat().st_size if part.exists() else 0
            log.warning("download %s: %s; retry %d/%d in %.2fs%s", shown, err.reason, attempt + 1,
                        retries, delay, f" (resuming at byte {have})" if have else "")
            time.sleep(delay)
    assert last is not None
    raise DownloadError(_final_message(url, shown, last, retries + 1))


def _fetch_once(opener: urllib.request.OpenerDirector, url: str, part: Path, *, max_bytes: int,
                timeout: float, progress: bool, shown: str) -> None:
    """One request; appends to `part` from its current size. Raises _Retryable or DownloadError."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: a gzip-encoded body would be saved compressed and fail the checksum
    headers = {"User-Agent": f"kneexray/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            _truncate(part)
            raise _Retryable("server refused the resume range (HTTP 416); restarting from zero", err)
        if err.code >= 500 or err.code in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {err.code} {_one_line(err.reason)}", err)
        raise DownloadError(
            f"HTTP {err.code} {_one_line(err.reason)} for {shown} (not retried); {ALTERNATIVES}"
        ) from None
    except (OSError, http.client.HTTPException) as err:
        if isinstance(_root(err), ssl.SSLCertVerificationError):
            raise DownloadError(f"TLS certificate check failed for {shown}: "
                                f"{_one_line(_root(err))}") from None
        raise _Retryable(_describe(err), err) from err

    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                _truncate(part)
                got_range = response.headers.get("Content-Range")
                raise _Retryable(f"server answered the resume from byte {offset} with Content-Range "
                                 f"{_one_line(got_range)!r}; restarting from zero")
            if total is None and length is not None:
                total = offset + length
        else:
            if offset:
                log.warning("download %s: server ignored the resume request; restarting from zero",
                            shown)
            start, total = 0, length
        if total is not None and total > max_bytes:
            raise DownloadError(f"{shown} is {total} bytes, over the limit max_bytes={max_bytes}")

        def read(n: int) -> bytes:
            try:
                return response.read(n)
            except (OSError, http.client.HTTPException) as err:
                raise _Retryable(_describe(err), err) from err

        got = _stream(read, part, start=start, total=total, max_bytes=max_bytes,
                      progress=progress, shown=shown)
    if total is not None and got < total:
        raise _Retryable(f"connection closed after {got} of {total} bytes")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _int_header(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n >= 0 else None


def _root(err: BaseException) -> BaseException:
    """urllib wraps connect errors in URLError(reason=<the real exception>)."""
    reason = getattr(err, "reason", None)
    return reason if isinstance(reason, BaseException) else err


def _describe(err: BaseException) -> str:
    root = _root(err)
    if isinstance(root, socket.gaierror):
        return f"cannot resolve the host name ({_one_line(root.strerror or root)})"
    if isinstance(root, (TimeoutError, socket.timeout)):
        return "timed out waiting for the server"
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "connection dropped by the server"
    if isinstance(root, http.client.IncompleteRead):
        return "connection closed before the body was complete"
    return _one_line(f"{type(root).__name__}: {root}")


def _looks_offline(url: str, err: BaseException | None) -> bool:
    root = _root(err) if err is not None else None
    if isinstance(root, socket.gaierror):
        return True
    if isinstance(root, OSError) and root.errno in _OFFLINE_ERRNOS:
        return True
    return isinstance(root, ConnectionRefusedError) and not _is_local(urllib.parse.urlsplit(url).hostname)


def _is_local(host: str | None) -> bool:
    if not host or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _final_message(url: str, shown: str, last: _Retryable, attempts: int) -> str:
    head = "this machine seems offline: " if _looks_offline(url, last.cause) else ""
    return (f"{head}download of {shown} failed after {attempts} attempt(s): {last.reason}; "
            f"{ALTERNATIVES}")


# ------------------------------------------------------------------------------------- file://


def _copy_local(parts: urllib.parse.SplitResult, part: Path, *, max_bytes: int, progress: bool,
                shown: str) -> None:
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"file:// URL {shown} names host {parts.netloc!r}; only local files work")
    source = Path(urllib.request.url2pathname(parts.path))
    try:
        handle = open(source, "rb")
    except OSError as err:
        raise DownloadError(f"cannot read {source} (from {shown}): {_one_line(err.strerror or err)}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise DownloadError(f"{shown} is {size} bytes, over the limit max_bytes={max_bytes}")
        got = _stream(handle.read, part, start=0, total=size, max_bytes=max_bytes,
                      progress=progress, shown=shown)
    if got != size:
        raise DownloadError(f"{source} changed while it was being copied ({got} of {size} bytes)")


# -------------------------------------------------------------------------------------- shared


def _stream(read: Callable[[int], bytes], part: Path, *, start: int, total: int | None,
            max_bytes: int, progress: bool, shown: str) -> int:
    """Write `read` chunks into `part` from byte `start` (truncating what follows); return its size.

    The size cap is enforced on bytes actually received, since Content-Length may be absent or lie.
    """
    got = start
    with open(part, "r+b" if part.exists() else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
        desc=part.name[: -len(".part")], disable=not progress, leave=False,
    ) as bar:
        out.seek(start)
        out.truncate()
        try:
            while True:
                chunk = read(_CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    raise DownloadError(f"{shown} sent more than max_bytes={max_bytes} bytes; aborted")
                out.write(chunk)
                bar.update(len(chunk))
        finally:
            # keep what arrived so a retry can resume from it
            out.flush()
            os.fsync(out.fileno())
    return got


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DownloadError(f"expected sha256 {sha256!r} is not 64 hex digits")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _redact(url: str) -> str:
    """URL for messages: drop user:password and query strings (signed URLs carry tokens there)."""
    try:
        p = urllib.parse.urlsplit(url)
        netloc = p.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "..." if p.query else "", ""))
    except ValueError:
        return _one_line(url)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
