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
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from kneexray import __version__
from kneexray.errors import KneexrayError

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
_MAX_TIMEOUT = 3600.0  # socket timeouts beyond this are a typo, and inf overflows the socket layer
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive's end record


class DownloadError(KneexrayError, RuntimeError):
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
    deadline: float = 3600.0,
    min_rate_kbps: float = 1.0,
    rate_window: float = 30.0,
    require_zip: bool = False,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    `retries` counts attempts after the first; the n-th retry waits ``backoff * 2**(n-1)`` seconds
    (capped at 60 s) and resumes the partial file with an HTTP Range request. `timeout` bounds the
    connection and each socket read. 4xx answers fail at once; 5xx, timeouts and dropped or
    truncated connections are retried. Raises DownloadError with a one-line message.

    `timeout` alone doesn't bound a server that trickles a byte at a time, so over http(s) the
    whole download, retries and back-offs included, must end within `deadline` seconds (not
    retried), and an attempt that receives under `min_rate_kbps` kilobits per second over a
    `rate_window` is abandoned and retried (0 turns the rate check off). Redirects are followed
    to http(s) only, never from https down to http. With `require_zip`, a body that doesn't start
    like a ZIP archive (an HTML error or login page) is refused before it replaces `dest`.
    """
    dest = Path(dest)
    shown = _redact(url)
    expected = _normalise_sha256(sha256)
    if retries < 0 or max_bytes < 0 or not 0 <= backoff < math.inf or not 0 <= min_rate_kbps < math.inf:
        raise ValueError("retries and max_bytes must be >= 0, backoff and min_rate_kbps finite and >= 0")
    for name, value in (("timeout", timeout), ("deadline", deadline), ("rate_window", rate_window)):
        if not 0 < value < math.inf:  # also refuses nan; an infinite timeout overflows the socket layer
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if timeout > _MAX_TIMEOUT:
        raise ValueError(f"timeout must be at most {_MAX_TIMEOUT:g} s, got {timeout!r}")
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
            content_type: str | None = "none, a local file"
        else:
            with _Pace(shown, deadline, min_rate_kbps, rate_window) as pace:
                content_type = _fetch_http(
                    url,
                    part,
                    max_bytes=max_bytes,
                    timeout=timeout,
                    retries=retries,
                    backoff=backoff,
                    progress=progress,
                    shown=shown,
                    pace=pace,
                )
        if require_zip:  # before the checksum: "an HTML page" says more than two digests
            _check_zip(part, content_type, shown)
        if expected is not None:
            actual = sha256_file(part)
            if actual != expected:
                raise DownloadError(f"checksum mismatch for {shown}: expected sha256 {expected}, got {actual}")
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


def _fetch_http(
    url: str,
    part: Path,
    *,
    max_bytes: int,
    timeout: float,
    retries: int,
    backoff: float,
    progress: bool,
    shown: str,
    pace: _Pace,
) -> str | None:
    """Fetch with retries; return the Content-Type of the answer that completed the file."""
    # per call, so proxy settings follow the environment
    opener = urllib.request.build_opener(
        _TrackedHTTP(pace.connections), _TrackedHTTPS(pace.connections), _CheckedRedirects()
    )
    last: _Retryable | None = None
    for attempt in range(retries + 1):
        pace.check()
        try:
            # no read may outlast the deadline (a zero timeout would make the socket non-blocking)
            content_type = _fetch_once(
                opener,
                url,
                part,
                max_bytes=max_bytes,
                pace=pace,
                timeout=max(min(timeout, pace.remaining()), 0.001),
                progress=progress,
                shown=shown,
            )
            pace.check()  # a read cut at the deadline looks like the end of a body without a length
            return content_type
        except _Retryable as err:
            pace.check()
            last = err
            if attempt == retries:
                break
            delay = min(backoff * 2**attempt, _MAX_DELAY, pace.remaining())
            have = part.stat().st_size if part.exists() else 0
            log.warning(
                "download %s: %s; retry %d/%d in %.2fs%s",
                shown,
                err.reason,
                attempt + 1,
                retries,
                delay,
                f" (resuming at byte {have})" if have else "",
            )
            time.sleep(delay)
    assert last is not None
    raise DownloadError(_final_message(url, shown, last, retries + 1))


def _fetch_once(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    *,
    max_bytes: int,
    timeout: float,
    progress: bool,
    shown: str,
    pace: _Pace,
) -> str | None:
    """One request; appends to `part` from its current size and returns the Content-Type.

    Raises _Retryable or DownloadError.
    """
    pace.start_attempt()
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
            raise _Retryable("server refused the resume range (HTTP 416); restarting from zero", err) from err
        if err.code >= 500 or err.code in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {err.code} {_one_line(err.reason)}", err) from err
        raise DownloadError(
            f"HTTP {err.code} {_one_line(err.reason)} for {shown} (not retried); {ALTERNATIVES}"
        ) from None
    except (OSError, http.client.HTTPException) as err:
        if isinstance(_root(err), ssl.SSLCertVerificationError):
            raise DownloadError(f"TLS certificate check failed for {shown}: {_one_line(_root(err))}") from None
        raise _Retryable(_describe(err), err) from err

    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                _truncate(part)
                got_range = response.headers.get("Content-Range")
                raise _Retryable(
                    f"server answered the resume from byte {offset} with Content-Range "
                    f"{_one_line(got_range)!r}; restarting from zero"
                )
            if total is None and length is not None:
                total = offset + length
        else:
            if offset:
                log.warning("download %s: server ignored the resume request; restarting from zero", shown)
            start, total = 0, length
        if total is not None and total > max_bytes:
            raise DownloadError(f"{shown} is {total} bytes, over the limit max_bytes={max_bytes}")

        def read(n: int) -> bytes:
            try:
                # read1: what one receive brought, so the rate and deadline are checked between
                # receives; read(n) would wait for all n bytes, a byte at a time if need be
                return response.read1(n)
            except (OSError, http.client.HTTPException) as err:
                raise _Retryable(_describe(err), err) from err

        got = _stream(
            read,
            part,
            start=start,
            total=total,
            max_bytes=max_bytes,
            progress=progress,
            shown=shown,
            on_chunk=pace.received,
        )
        content_type = response.headers.get("Content-Type")
    if total is not None and got < total:
        raise _Retryable(f"connection closed after {got} of {total} bytes")
    return content_type


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
    return f"{head}download of {shown} failed after {attempts} attempt(s): {last.reason}; {ALTERNATIVES}"


# ------------------------------------------------------------------ deadline, rate and redirects


class _Connections:
    """The sockets one download opened, so that its deadline can shut one a read is blocked on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.cut_off = False

    def track(self, base: type) -> type:
        """`base` (an http.client connection class) that registers its socket once connected."""
        connections = self

        class Tracked(base):
            def connect(self) -> None:
                super().connect()
                connections.add(self.sock)

        return Tracked

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks = [s for s in self._socks if s.fileno() != -1] + [sock]  # forget closed ones
            cut_off = self.cut_off
        if cut_off:
            _shut(sock)

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Wake a read blocked on `sock` from another thread: it sees the end of the stream."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
    except OSError:
        pass  # already closed


class _Tracking:
    """Mixed into the http and https handlers: their connections register with `connections`."""

    def __init__(self, connections: _Connections) -> None:
        super().__init__()
        self.connections = connections

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.connections.track(http_class), req, **kwargs)


class _TrackedHTTP(_Tracking, urllib.request.HTTPHandler):
    pass


class _TrackedHTTPS(_Tracking, urllib.request.HTTPSHandler):
    pass


class _Pace:
    """The overall deadline and the minimum transfer rate of one http(s) download.

    Both are checked between receives; the deadline also has a timer that shuts the open sockets,
    since a server can trickle its status line and headers, which http.client reads without
    returning to us.
    """

    def __init__(self, shown: str, deadline: float, min_rate_kbps: float, window: float) -> None:
        self.shown, self.deadline, self.min_rate_kbps, self.window = shown, deadline, min_rate_kbps, window
        self.connections = _Connections()
        self.total = 0  # bytes received, all attempts together
        self._end = time.monotonic() + deadline
        self._timer = threading.Timer(deadline, self.connections.cut)
        self._timer.daemon = True
        self.start_attempt()

    def __enter__(self) -> _Pace:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def check(self) -> None:
        """Raise DownloadError (not retried) once the deadline has passed."""
        if self.remaining() <= 0 or self.connections.cut_off:
            raise DownloadError(
                f"download of {self.shown} did not finish within the overall deadline of "
                f"{self.deadline:g} s ({self.total} bytes received); {ALTERNATIVES}"
            )

    def start_attempt(self) -> None:
        """A new request starts a new rate window."""
        self._since, self._count = time.monotonic(), 0

    def received(self, n: int) -> None:
        """Count `n` new bytes; raise once a whole window has gone by below the minimum rate."""
        self.total += n
        self._count += n
        self.check()
        elapsed = time.monotonic() - self._since
        if elapsed < self.window:
            return
        if self._count * 8 / 1000 < self.min_rate_kbps * elapsed:
            raise _Retryable(
                f"transfer slower than the minimum {self.min_rate_kbps:g} kbit/s "
                f"({self._count} bytes in {elapsed:.1f} s)"
            )
        self.start_attempt()  # the next window starts here


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only, and never from https down to plain http.

    urllib alone follows a redirect to ftp://, and a redirect to plain http would send the rest of
    the transfer, resume ranges included, where anyone on the path can change it.
    """

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            source = req.full_url
            new = urllib.parse.urljoin(source, target.strip())
            new_scheme = urllib.parse.urlsplit(new).scheme.lower()
            if new_scheme not in ("http", "https") or (
                new_scheme == "http" and urllib.parse.urlsplit(source).scheme.lower() == "https"
            ):
                fp.close()
                why = (
                    "a downgrade from https to plain http"
                    if new_scheme == "http"
                    else f"{new_scheme + '://' if new_scheme else 'that'} is not http(s)"
                )
                raise DownloadError(
                    f"refused the HTTP {code} redirect from {_redact(source)} to "
                    f"{_redact(new)}: {why}; only http(s) redirects are followed"
                )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _check_zip(part: Path, content_type: str | None, shown: str) -> None:
    """Refuse a body that is not a ZIP archive, so an HTML error page is never cached as the dataset."""
    with open(part, "rb") as f:
        head = f.read(16)
    if head[:4] in _ZIP_MAGIC:
        return
    start = f"starts with {head!r}" if head else "is empty"
    raise DownloadError(
        f"{shown} is not a ZIP archive (Content-Type: {_one_line(content_type or 'none')}; "
        f"the body {start}): an error or login page? check dataset.url; {ALTERNATIVES}"
    )


# ------------------------------------------------------------------------------------- file://


def _copy_local(parts: urllib.parse.SplitResult, part: Path, *, max_bytes: int, progress: bool, shown: str) -> None:
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
        got = _stream(handle.read, part, start=0, total=size, max_bytes=max_bytes, progress=progress, shown=shown)
    if got != size:
        raise DownloadError(f"{source} changed while it was being copied ({got} of {size} bytes)")


# -------------------------------------------------------------------------------------- shared


def _stream(
    read: Callable[[int], bytes],
    part: Path,
    *,
    start: int,
    total: int | None,
    max_bytes: int,
    progress: bool,
    shown: str,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Write `read` chunks into `part` from byte `start` (truncating what follows); return its size.

    The size cap is enforced on bytes actually received, since Content-Length may be absent or lie.
    `on_chunk` hears each chunk's size after it is written, and may raise to stop.
    """
    got = start
    with (
        open(part, "r+b" if part.exists() else "wb") as out,
        tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name[: -len(".part")],
            disable=not progress,
            leave=False,
        ) as bar,
    ):
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
                if on_chunk is not None:
                    on_chunk(len(chunk))
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
