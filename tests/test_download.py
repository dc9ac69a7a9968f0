"""kneexray.data.download against a scripted local HTTP server (127.0.0.1 only, stopped in teardown)."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from kneexray import DEFAULT_CLASSES
from kneexray.data import sources
from kneexray.data.download import DownloadError, _CheckedRedirects, download
from kneexray.params import DatasetParams, load
from tests.support import ROOT

PAYLOAD = os.urandom(300 * 1024)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(timeout=2.0, retries=3, backoff=0.01, progress=False)
TRICKLE_GAP = 0.05  # seconds between the bytes of a trickling answer: 160 bit/s
HTML = b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n"


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


ZIP, EMPTY_ZIP = zip_bytes({"normal/a.png": b"x"}), zip_bytes({})


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drops_left = 0  # how many /file.bin answers are cut after half the body
        self.stop = threading.Event()  # releases stalled handlers at teardown
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up early (size cap, timeouts) is expected here


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    timeout = 5  # a handler never waits on a client for long

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        srv = self.server
        path, _, query = self.path.partition("?")
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
        if path == "/file.bin":
            with srv.lock:
                drop = srv.drops_left > 0
                srv.drops_left -= drop
            self._serve(honour_range=True, drop=drop)
        elif path == "/norange.bin":  # ignores Range; first answer is cut
            self._serve(honour_range=False, drop=srv.count(path) == 1)
        elif path == "/badrange.bin":  # answers a resume with a 206 starting at the wrong byte
            if self.headers.get("Range"):
                body = PAYLOAD[10:]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 10-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._serve(honour_range=False, drop=srv.count(path) == 1)
        elif path == "/nolength.bin":  # HTTP/1.0: body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif path == "/stall":  # accepts, then says nothing
            srv.stop.wait(10)
        elif path == "/stall-body":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.flush()
            srv.stop.wait(10)
        elif path == "/redirect":
            self._redirect("/file.bin")
        elif path == "/redirect-to":  # ?<target>: a redirect anywhere
            self._redirect(urllib.parse.unquote(query))
        elif path == "/trickle-body":  # a valid header, then one byte per TRICKLE_GAP seconds
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self._trickle(PAYLOAD)
        elif path == "/trickle-headers":  # a status line, then a header that never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            self._trickle(b"a" * len(PAYLOAD))
        elif path in ("/html", "/zip", "/empty-zip"):
            body, kind = {
                "/html": (HTML, "text/html; charset=utf-8"),
                "/zip": (ZIP, "application/zip"),
                "/empty-zip": (EMPTY_ZIP, "application/octet-stream"),
            }[path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/error":
            self.send_error(500, "Boom")
        elif path == "/forbidden":
            self.send_error(403)
        else:
            self.send_error(404)

    def _redirect(self, target: str) -> None:
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, body: bytes) -> None:
        """Send `body` a byte at a time until the client hangs up or the test ends (10 s at most)."""
        for byte in body[: int(10 / TRICKLE_GAP)]:
            if self.server.stop.is_set():
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(TRICKLE_GAP)

    def _serve(self, *, honour_range: bool, drop: bool) -> None:
        start = 0
        rng = self.headers.get("Range")
        if honour_range and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
        body = PAYLOAD[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:  # promise everything, deliver half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.wfile.write(body)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not intercept 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_ok_with_checksum(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "data.zip"
    out = download(f"{server.base}/file.bin", dest, sha256=SHA.upper(), **FAST)
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["data.zip"]
    assert server.requests == [("/file.bin", None)]


def test_dropped_connection_resumes_with_range(server: Server, tmp_path: Path, caplog) -> None:
    server.drops_left = 2
    dest = tmp_path / "data.zip"
    with caplog.at_level(logging.WARNING, logger="kneexray.data.download"):
        download(f"{server.base}/file.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    ranges = [r for _, r in server.requests]
    assert len(ranges) == 3 and ranges[0] is None
    starts = [int(r[len("bytes=") : -1]) for r in ranges[1:]]
    assert 0 < starts[0] < starts[1] < len(PAYLOAD)  # each retry resumes where the last stopped
    assert sum("retry" in rec.getMessage() for rec in caplog.records) == 2
    assert leftovers(tmp_path) == ["data.zip"]


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.bin"
    download(f"{server.base}/norange.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[1][1] is not None  # it did ask to resume


def test_wrong_content_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.bin"
    download(f"{server.base}/badrange.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    # cut answer, resume refused via bad 206, fresh full download
    assert [r is not None for _, r in server.requests] == [False, True, False]


@pytest.mark.parametrize("path", ["/stall", "/stall-body"])
def test_stalled_server_times_out_after_bounded_retries(server: Server, tmp_path: Path, path: str) -> None:
    dest = tmp_path / "d.bin"
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as info:
        download(f"{server.base}{path}", dest, timeout=0.3, retries=2, backoff=0.01, progress=False)
    elapsed = time.monotonic() - started
    assert server.count(path) == 3
    assert 0.8 < elapsed < 3.0  # (retries+1) * timeout + back-offs, plus slack
    assert "\n" not in str(info.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("path", "status"), [("/missing", "404"), ("/forbidden", "403")])
def test_client_error_fails_at_once(server: Server, tmp_path: Path, path: str, status: str) -> None:
    with pytest.raises(DownloadError, match=status) as info:
        download(f"{server.base}{path}", tmp_path / "d.bin", **FAST)
    assert path in str(info.value)
    assert len(server.requests) == 1  # no retry storm
    assert leftovers(tmp_path) == []


def test_server_error_is_retried_then_fails(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="500"):
        download(f"{server.base}/error", tmp_path / "d.bin", **{**FAST, "retries": 2})
    assert server.count("/error") == 3
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_leaves_nothing(server: Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError, match="checksum") as info:
        download(f"{server.base}/file.bin", tmp_path / "d.bin", sha256=wrong, **FAST)
    assert wrong in str(info.value) and SHA in str(info.value)
    assert leftovers(tmp_path) == []


def test_malformed_checksum_rejected_before_download(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="64 hex"):
        download(f"{server.base}/file.bin", tmp_path / "d.bin", sha256="abc", **FAST)
    assert server.requests == []


def test_redirect_is_followed(server: Server, tmp_path: Path) -> None:
    dest = download(f"{server.base}/redirect", tmp_path / "d.bin", sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/redirect", "/file.bin"]


def test_content_length_over_cap(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="max_bytes=1000"):
        download(f"{server.base}/file.bin", tmp_path / "d.bin", max_bytes=1000, **FAST)
    assert len(server.requests) == 1
    assert leftovers(tmp_path) == []


def test_streamed_bytes_over_cap_without_length(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="more than max_bytes=100000"):
        download(f"{server.base}/nolength.bin", tmp_path / "d.bin", max_bytes=100_000, **FAST)
    assert len(server.requests) == 1
    assert leftovers(tmp_path) == []


def test_download_without_length_ok(server: Server, tmp_path: Path) -> None:
    dest = download(f"{server.base}/nolength.bin", tmp_path / "d.bin", sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("path", ["/missing", "/error", "/file.bin?bad-sum"])
def test_previous_dest_survives_failure(server: Server, tmp_path: Path, path: str) -> None:
    dest = tmp_path / "d.bin"
    dest.write_bytes(b"old good data")
    with pytest.raises(DownloadError):
        download(f"{server.base}{path}", dest, sha256="f" * 64, **{**FAST, "retries": 1})
    assert dest.read_bytes() == b"old good data"
    assert leftovers(tmp_path) == ["d.bin"]


def test_stale_part_file_is_not_resumed(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.bin"
    (tmp_path / "d.bin.part").write_bytes(b"junk from another run")
    download(f"{server.base}/file.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/file.bin", None)]
    assert leftovers(tmp_path) == ["d.bin"]


def test_file_url(tmp_path: Path) -> None:
    src = tmp_path / "in dir" / "src.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = download(src.as_uri(), tmp_path / "out" / "d.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="max_bytes"):
        download(src.as_uri(), tmp_path / "out" / "e.bin", max_bytes=10, progress=False)
    with pytest.raises(DownloadError, match="cannot read"):
        download((tmp_path / "nope.bin").as_uri(), tmp_path / "out" / "f.bin", progress=False)
    assert leftovers(tmp_path / "out") == ["d.bin"]


@pytest.mark.parametrize("url", ["ftp://example.com/x.zip", "s3://bucket/x.zip", "x.zip"])
def test_unsupported_scheme(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError, match=r"http://, https:// or file://"):
        download(url, tmp_path / "d.bin", progress=False)


def test_connection_refused_names_offline_alternatives(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download(
            f"http://127.0.0.1:{port}/x.zip", tmp_path / "d.bin", timeout=1.0, retries=1, backoff=0.01, progress=False
        )
    message = str(info.value)
    assert "\n" not in message
    assert "refused" in message
    assert "dataset.source=phantom" in message and "dataset.source=path" in message
    assert "dataset.path=" in message
    assert leftovers(tmp_path) == []


def test_dns_failure_says_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match="seems offline") as info:
        download("https://data.example.org/knee.zip", tmp_path / "d.bin", retries=1, backoff=0.01, progress=False)
    assert "dataset.source=phantom" in str(info.value)


def test_credentials_and_query_not_shown(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="not supported") as info:
        download(f"http://user:secret@127.0.0.1:{port}/x.zip", tmp_path / "d.bin", progress=False)
    assert "secret" not in str(info.value)
    with pytest.raises(DownloadError, match="refused") as info:
        download(f"http://127.0.0.1:{port}/x.zip?token=secret", tmp_path / "d.bin", retries=0, progress=False)
    assert "secret" not in str(info.value)


# --- deadline and minimum rate: a byte now and then must not keep a download alive forever -------


def test_trickling_body_is_below_the_minimum_rate(server: Server, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"slower than the minimum 1 kbit/s") as info:
        download(
            f"{server.base}/trickle-body",
            tmp_path / "d.bin",
            timeout=2.0,
            retries=1,
            backoff=0.01,
            min_rate_kbps=1,
            rate_window=0.3,
            progress=False,
        )
    assert time.monotonic() - started < 3.0  # each receive came well within the 2 s timeout
    assert server.count("/trickle-body") == 2 and "failed after 2 attempt(s)" in str(info.value)
    assert "\n" not in str(info.value)
    assert leftovers(tmp_path) == []


def test_trickling_body_hits_the_overall_deadline(server: Server, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"did not finish within the overall deadline of 0.6 s") as info:
        download(
            f"{server.base}/trickle-body",
            tmp_path / "d.bin",
            timeout=2.0,
            retries=3,
            backoff=0.01,
            deadline=0.6,
            min_rate_kbps=0,
            progress=False,
        )
    assert 0.5 < time.monotonic() - started < 2.0
    assert server.count("/trickle-body") == 1  # the deadline is not retried
    assert "bytes received" in str(info.value) and "\n" not in str(info.value)
    assert leftovers(tmp_path) == []


def test_trickling_headers_are_cut_at_the_deadline(server: Server, tmp_path: Path) -> None:
    """http.client reads headers without returning to us: only the deadline's timer can stop it."""
    started = time.monotonic()
    with pytest.raises(DownloadError, match="overall deadline of 0.6 s"):
        download(
            f"{server.base}/trickle-headers",
            tmp_path / "d.bin",
            timeout=2.0,
            retries=3,
            backoff=0.01,
            deadline=0.6,
            progress=False,
        )
    assert time.monotonic() - started < 2.0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad",
    [
        dict(timeout=float("inf")),
        dict(timeout=1e300),
        dict(timeout=float("nan")),
        dict(deadline=float("inf")),
        dict(deadline=0),
        dict(min_rate_kbps=-1),
        dict(rate_window=0),
    ],
)
def test_unbounded_timing_arguments_are_refused(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        download("http://127.0.0.1:9/x.zip", tmp_path / "d.bin", progress=False, **bad)


# --- redirects: http(s) only, never down from https ------------------------------------------------


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x.zip", "file:///etc/passwd", "gopher://127.0.0.1/x"])
def test_redirect_to_another_scheme_is_refused(server: Server, tmp_path: Path, target: str) -> None:
    quoted = urllib.parse.quote(target, safe="")
    with pytest.raises(DownloadError, match=r"refused the HTTP 302 redirect from .*/redirect-to\?\.\.\. to ") as info:
        download(f"{server.base}/redirect-to?{quoted}", tmp_path / "d.bin", **FAST)
    message = str(info.value)
    assert f" to {target}: " in message and "not http(s)" in message and "\n" not in message
    assert server.count("/redirect-to") == 1  # not retried
    assert leftovers(tmp_path) == []


def test_absolute_http_redirect_is_followed(server: Server, tmp_path: Path) -> None:
    target = urllib.parse.quote(f"{server.base}/file.bin", safe="")
    dest = download(f"{server.base}/redirect-to?{target}", tmp_path / "d.bin", sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_redirect_from_https_down_to_http_is_refused() -> None:
    request = urllib.request.Request("https://data.example.org/knee.zip")
    with pytest.raises(DownloadError, match=r"to http://mirror.example.org/knee.zip: a downgrade from https"):
        _CheckedRedirects().http_error_302(
            request, io.BytesIO(), 302, "Found", {"location": "http://mirror.example.org/knee.zip"}
        )


# --- the body must be a ZIP archive ----------------------------------------------------------------


def test_html_page_is_not_taken_for_the_archive(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "d.zip"
    dest.write_bytes(b"old good data")
    with pytest.raises(
        DownloadError,
        match=r"is not a ZIP archive \(Content-Type: text/html; charset=utf-8; "
        r"the body starts with b'<!DOCTYPE html>",
    ) as info:
        download(f"{server.base}/html", dest, require_zip=True, **FAST)
    assert "\n" not in str(info.value) and "dataset.source=phantom" in str(info.value)
    assert dest.read_bytes() == b"old good data" and leftovers(tmp_path) == ["d.zip"]
    assert download(f"{server.base}/html", dest, **FAST).read_bytes() == HTML  # unchecked when not asked


@pytest.mark.parametrize(("path", "body"), [("/zip", ZIP), ("/empty-zip", EMPTY_ZIP)])
def test_zip_archives_pass_the_check(server: Server, tmp_path: Path, path: str, body: bytes) -> None:
    assert download(f"{server.base}{path}", tmp_path / "d.zip", require_zip=True, **FAST).read_bytes() == body


def test_local_file_that_is_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_bytes(b"")
    with pytest.raises(DownloadError, match=r"not a ZIP archive \(Content-Type: none, a local file; the body is empty"):
        download((tmp_path / "page.html").as_uri(), tmp_path / "out" / "d.zip", require_zip=True, progress=False)


PHANTOM = load(ROOT / "params.yaml").phantom  # unused by a URL source


def url_params(url: str, **dataset) -> DatasetParams:
    return DatasetParams(
        **{
            "source": "url",
            "classes": DEFAULT_CLASSES,
            "sources": (),
            "url": url,
            "path": "",
            "sha256": "",
            "max_download_mb": 1,
            "timeout_s": 2,
            "retries": 0,
            "deadline_s": 5,
            "min_rate_kbps": 1,
            **dataset,
        }
    )


def test_fetch_stage_refuses_an_html_page_in_one_line(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "raw" / "dataset.zip"
    with pytest.raises(RuntimeError, match="is not a ZIP archive") as info:
        sources.fetch(url_params(f"{server.base}/html"), PHANTOM, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert sources.fetch(url_params(f"{server.base}/zip"), PHANTOM, out)["bytes"] == len(ZIP)


def test_fetch_stage_passes_the_deadline_through(server: Server, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="overall deadline of 0.5 s"):
        sources.fetch(url_params(f"{server.base}/trickle-headers", deadline_s=0.5), PHANTOM, tmp_path / "d.zip")
    assert time.monotonic() - started < 2.0
