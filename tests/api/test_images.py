"""Tests for diffserve.api.images: SSRF guard, pinned fetching, size/time limits and decoding.

Real sockets only, and only loopback ones: HTTP(S) servers run in threads on
127.0.0.1 / 127.0.0.2 / ::1 and count the connections they accept.  For
addresses that must never be contacted, socket connects are patched to fail
the test, so nothing is ever sent to them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import socket
import socketserver
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from diffserve.api.images import (
    ImageFetchPolicy,
    ImageInputError,
    check_address,
    decode_image_bytes,
    _resolve_checked,
    load_image,
    sniff_format,
)

LOOPBACK_ONLY = ImageFetchPolicy(allow_networks=("127.0.0.1/32",), timeout_s=5.0)


# --------------------------------------------------------------------------
# helpers: images
# --------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int] = (32, 24), mode: str = "RGB", color: Any = (200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG declaring width x height but carrying only a few rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------
# helpers: loopback servers that count connections
# --------------------------------------------------------------------------

Route = Callable[["Handler"], None]


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], routes: dict[str, Route], family: int, tls: ssl.SSLContext | None):
        self.address_family = family
        self.routes = routes
        self.accepted = 0
        self.requests: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        self.tls = tls
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn() on the bind address,
        # a reverse-DNS query that would leave the host for 127.0.0.2 / ::1.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        self.accepted += 1
        if self.tls is not None:
            # Handshake in the handler thread (first read), not in the accept loop.
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients abort on purpose (caps, timeouts, TLS failures): keep the output quiet.
        pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host")))
        route = self.server.routes.get(self.path)
        if route is None:
            respond(self, 404, b"not found", "text/plain")
        else:
            route(self)
        self.close_connection = True


def respond(h: Handler, status: int, body: bytes = b"", ctype: str = "image/png", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Connection", "close")
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def serves(body: bytes, ctype: str = "image/png") -> Route:
    return lambda h: respond(h, 200, body, ctype)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: respond(h, status, b"", "text/plain", {"Location": location})


@contextlib.contextmanager
def serve(
    routes: dict[str, Route],
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[CountingServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = CountingServer((host, port), routes, family, tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make any outbound socket connect fail the test (and record it)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"unexpected connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


# --------------------------------------------------------------------------
# check_address
# --------------------------------------------------------------------------

DENIED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "this network"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("::ffff:10.1.2.3", "private"),
    ("100.64.0.1", "shared"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "site-local"),
    ("169.254.169.254", "metadata"),
    ("::ffff:169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("168.63.129.16", "metadata"),
    ("2002:7f00:1::1", "6to4"),
    ("2002:a9fe:a9fe::1", "6to4"),
    ("2002:a00:1::", "6to4"),
    ("64:ff9b::7f00:1", "NAT64"),
    ("64:ff9b::a9fe:a9fe", "NAT64"),
    ("64:ff9b:1::1", "NAT64"),
    ("::7f00:1", "IPv4-compatible"),
    ("198.18.0.1", "not a globally routable"),
    ("192.0.2.1", "not a globally routable"),
    ("2001:db8::1", "not a globally routable"),
]


@pytest.mark.parametrize(("address", "reason"), DENIED)
def test_check_address_denies(address: str, reason: str) -> None:
    with pytest.raises(ImageInputError, match=reason):
        check_address(ipaddress.ip_address(address), ImageFetchPolicy())


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_check_address_allows_public(address: str) -> None:
    ip = ipaddress.ip_address(address)
    policy = ImageFetchPolicy()  # no allow-list: only the public-address rules let these through
    assert check_address(ip, policy) is None
    # What a fetch of a URL naming the address would dial: exactly that address, vetted.
    host = f"[{address}]" if ip.version == 6 else address
    assert run(_resolve_checked(httpx.URL(f"http://{host}/x.png"), "image", policy)) == [ip]
    # The same policy does refuse: loopback of the same family is not let through.
    with pytest.raises(ImageInputError, match="loopback"):
        check_address(ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1"), policy)


def test_check_address_allow_networks() -> None:
    policy = ImageFetchPolicy(allow_networks=("127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "fd00::/8"))
    for allowed in ("127.0.0.1", "::ffff:127.0.0.1", "10.9.8.7", "169.254.1.1"):
        check_address(ipaddress.ip_address(allowed), policy)
    # Metadata endpoints stay refused even inside an allow-listed range.
    for meta in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"):
        with pytest.raises(ImageInputError, match="metadata"):
            check_address(ipaddress.ip_address(meta), policy)
    with pytest.raises(ImageInputError, match="private"):
        check_address(ipaddress.ip_address("192.168.0.1"), policy)


def test_policy_rejects_bad_cidr() -> None:
    with pytest.raises(ValueError, match="allow_networks"):
        ImageFetchPolicy(allow_networks=("not-a-cidr",))


# --------------------------------------------------------------------------
# URL refusal table: nothing is ever connected to
# --------------------------------------------------------------------------

REFUSED_URLS = [
    ("http://127.0.0.1:{port}/x", "loopback"),
    ("http://0x7f000001:{port}/", "loopback"),
    ("http://2130706433:{port}/", "loopback"),
    ("http://127.1:{port}/", "loopback"),
    ("http://0177.1:{port}/", "loopback"),
    ("http://0177.0.0.1:{port}/", "invalid URL"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://0:{port}/", "unspecified"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data", "metadata"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://[fe80::1]/", "link-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[2002:a9fe:a9fe::1]/", "6to4"),
    ("http://[64:ff9b::a00:1]/", "NAT64"),
    ("https://10.0.0.1/img.png", "private"),
]


@pytest.mark.parametrize(("template", "reason"), REFUSED_URLS)
def test_refused_urls_never_connect(template: str, reason: str, no_connect: list[Any]) -> None:
    with serve({"/x": serves(image_bytes("PNG")), "/": serves(image_bytes("PNG"))}) as server:
        url = template.format(port=server.port)
        with pytest.raises(ImageInputError, match=reason) as info:
            run(load_image(url, "image", ImageFetchPolicy(timeout_s=2.0)))
        assert str(info.value).startswith("image: ")
        assert no_connect == []
        assert server.accepted == 0


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_loopback_refused_and_allowable(no_connect: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    png = image_bytes("PNG")
    with serve({"/": serves(png)}, host="::1") as server:
        with pytest.raises(ImageInputError, match="loopback"):
            run(load_image(f"http://[::1]:{server.port}/", "image", ImageFetchPolicy()))
        assert no_connect == []
        assert server.accepted == 0
        monkeypatch.undo()  # real connects from here on
        img = run(load_image(f"http://[::1]:{server.port}/", "image", ImageFetchPolicy(allow_networks=("::1/128",))))
        assert img.shape == (24, 32, 3)
        assert server.accepted == 1
        assert server.requests == [("/", f"[::1]:{server.port}")]


def test_other_schemes_and_credentials_refused(no_connect: list[Any]) -> None:
    for url, reason in [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://127.0.0.1/x.png", "scheme 'ftp'"),
        ("gopher://127.0.0.1:70/_x", "scheme 'gopher'"),
        ("http://user:pw@127.0.0.1/x.png", "credentials"),
        ("http:///x.png", "host"),
    ]:
        with pytest.raises(ImageInputError, match=reason):
            run(load_image(url, "init_image", LOOPBACK_ONLY))
    assert no_connect == []


# --------------------------------------------------------------------------
# fetching from allow-listed loopback servers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_fetch_valid_image(fmt: str) -> None:
    with serve({"/img": serves(image_bytes(fmt), "application/octet-stream")}) as server:
        img = run(load_image(f"http://127.0.0.1:{server.port}/img", "image", LOOPBACK_ONLY))
    assert img.dtype == np.uint8
    assert img.shape == (24, 32, 3)
    r, g, b = (int(v) for v in img[5, 5])
    assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 40) < 12


def test_numeric_host_forms_reach_the_real_address() -> None:
    # With 127.0.0.1 allow-listed, the hex spelling is checked and connected
    # as 127.0.0.1 while the client's Host header is preserved.
    with serve({"/": serves(image_bytes("PNG"))}) as server:
        img = run(load_image(f"http://0x7f000001:{server.port}/", "image", LOOPBACK_ONLY))
        assert img.shape == (24, 32, 3)
        img = run(load_image(f"http://[::ffff:127.0.0.1]:{server.port}/", "image", LOOPBACK_ONLY))
        assert img.shape == (24, 32, 3)
        assert server.requests == [("/", f"0x7f000001:{server.port}"), ("/", f"[::ffff:127.0.0.1]:{server.port}")]


def test_redirect_to_non_allowlisted_loopback_refused() -> None:
    png = image_bytes("PNG")
    with serve({"/img.png": serves(png)}, host="127.0.0.2") as target:
        routes = {
            "/redirect-ext": redirect(f"http://127.0.0.2:{target.port}/img.png"),
            "/redirect-local": redirect("/img.png"),
            "/img.png": serves(png),
        }
        with serve(routes) as origin:
            with pytest.raises(ImageInputError, match="loopback"):
                run(load_image(f"http://127.0.0.1:{origin.port}/redirect-ext", "image", LOOPBACK_ONLY))
            assert origin.accepted == 1
            assert target.accepted == 0

            img = run(load_image(f"http://127.0.0.1:{origin.port}/redirect-local", "image", LOOPBACK_ONLY))
            assert img.shape == (24, 32, 3)
            assert [p for p, _ in origin.requests] == ["/redirect-ext", "/redirect-local", "/img.png"]
        assert target.accepted == 0


def test_redirect_limits_and_schemes() -> None:
    routes = {
        "/loop": redirect("/loop"),
        "/to-file": redirect("file:///etc/passwd"),
        "/no-location": lambda h: respond(h, 302, b"", "text/plain"),
        "/one": redirect("/img.png", 301),
        "/img.png": serves(image_bytes("PNG")),
    }
    with serve(routes) as server:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(ImageInputError, match="too many redirects"):
            run(load_image(f"{base}/loop", "image", LOOPBACK_ONLY))
        assert server.accepted == LOOPBACK_ONLY.max_redirects + 1
        with pytest.raises(ImageInputError, match="scheme 'file'"):
            run(load_image(f"{base}/to-file", "image", LOOPBACK_ONLY))
        with pytest.raises(ImageInputError, match="without a Location"):
            run(load_image(f"{base}/no-location", "image", LOOPBACK_ONLY))
        no_redirects = ImageFetchPolicy(allow_networks=("127.0.0.1/32",), max_redirects=0)
        with pytest.raises(ImageInputError, match="too many redirects"):
            run(load_image(f"{base}/one", "image", no_redirects))
        assert run(load_image(f"{base}/one", "image", LOOPBACK_ONLY)).shape == (24, 32, 3)


def _fake_resolver(answers: Callable[[int], list[str]]) -> tuple[Callable[..., Any], list[str]]:
    """Build a loop.getaddrinfo replacement answering for 'img.test' only."""
    calls: list[str] = []

    def install() -> None:
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
            if host == "img.test":
                calls.append(host)
                return [
                    (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                    for ip in answers(len(calls))
                ]
            return await real(host, port, *args, **kwargs)

        loop.getaddrinfo = fake  # type: ignore[method-assign]

    return install, calls


def test_dns_rebinding_cannot_swap_the_pinned_address() -> None:
    # First lookup says 127.0.0.1 (allowed); any later lookup would say
    # 127.0.0.2.  The connection must go to the checked address.
    png = image_bytes("PNG")
    with serve({"/img.png": serves(png)}) as good:
        with serve({"/img.png": serves(png)}, host="127.0.0.2", port=good.port) as evil:
            install, calls = _fake_resolver(lambda n: ["127.0.0.1"] if n == 1 else ["127.0.0.2"])

            async def scenario() -> np.ndarray:
                install()
                return await load_image(f"http://img.test:{good.port}/img.png", "image", LOOPBACK_ONLY)

            img = run(scenario())
            assert img.shape == (24, 32, 3)
            assert calls == ["img.test"]
            assert good.requests == [("/img.png", f"img.test:{good.port}")]
            assert evil.accepted == 0


def test_every_resolved_address_is_checked() -> None:
    with serve({"/img.png": serves(image_bytes("PNG"))}) as server:
        install, _ = _fake_resolver(lambda n: ["127.0.0.1", "10.0.0.1"])

        async def scenario() -> np.ndarray:
            install()
            return await load_image(f"http://img.test:{server.port}/img.png", "image", LOOPBACK_ONLY)

        with pytest.raises(ImageInputError, match="resolves to a private address") as info:
            run(scenario())
        assert "10.0.0.1" not in str(info.value)  # internal DNS answers are not echoed
        assert server.accepted == 0


def test_https_pins_ip_but_verifies_original_hostname() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    png = image_bytes("PNG")

    def server_ctx(*names: str) -> tuple[ssl.SSLContext, list[str | None]]:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        seen: list[str | None] = []
        ctx.sni_callback = lambda sslobj, name, c: seen.append(name)  # type: ignore[assignment]
        return ctx, seen

    async def fetch(port: int) -> np.ndarray:
        install()
        async with httpx.AsyncClient(verify=client_ctx, trust_env=False) as client:
            return await load_image(f"https://img.test:{port}/img.png", "image", LOOPBACK_ONLY, client=client)

    install, calls = _fake_resolver(lambda n: ["127.0.0.1"])

    ctx, sni = server_ctx("img.test")
    with serve({"/img.png": serves(png)}, tls=ctx) as server:
        assert run(fetch(server.port)).shape == (24, 32, 3)
        assert sni == ["img.test"]
        assert server.requests == [("/img.png", f"img.test:{server.port}")]

    # A certificate valid only for the pinned IP must not satisfy a request
    # for the hostname: verification is against the name, not the IP.
    for names in (("127.0.0.1",), ("other.test",)):
        ctx, sni = server_ctx(*names)
        with serve({"/img.png": serves(png)}, tls=ctx) as server:
            with pytest.raises(ImageInputError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
                run(fetch(server.port))
            assert sni == ["img.test"]
            assert server.requests == []


def test_too_large_content_length_refused() -> None:
    policy = ImageFetchPolicy(allow_networks=("127.0.0.1/32",), max_bytes=10_000)
    with serve({"/big": serves(b"\x89PNG\r\n\x1a\n" + b"\0" * 50_000)}) as server:
        with pytest.raises(ImageInputError, match=r"50008 bytes \(Content-Length\), over the limit of 10000"):
            run(load_image(f"http://127.0.0.1:{server.port}/big", "image", policy))


def _chunked_forever(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"\0" * 4096
    try:
        for _ in range(1000):  # ~4 MB, far over the cap; the client should hang up early
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if h.server.stop.is_set():
                return
        h.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass


def _close_delimited(h: Handler) -> None:
    # HTTP/1.0 style: no length, no chunking, body ends at close.
    h.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n" + b"\0" * 50_000)


def test_too_large_streamed_body_refused() -> None:
    policy = ImageFetchPolicy(allow_networks=("127.0.0.1/32",), max_bytes=10_000)
    with serve({"/chunked": _chunked_forever, "/close": _close_delimited}) as server:
        for path in ("/chunked", "/close"):
            with pytest.raises(ImageInputError, match="exceeded the limit of 10000 bytes while downloading"):
                run(load_image(f"http://127.0.0.1:{server.port}{path}", "image", policy))


def _slow_headers(h: Handler) -> None:
    h.server.stop.wait(5)


def _slow_drip(h: Handler) -> None:
    # Each byte arrives well within any per-read timeout; only an overall
    # deadline stops this.
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "1000")
    h.end_headers()
    try:
        for _ in range(1000):
            h.wfile.write(b"\0")
            h.wfile.flush()
            if h.server.stop.wait(0.05):
                return
    except OSError:
        pass


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_slow_server_times_out(path: str) -> None:
    policy = ImageFetchPolicy(allow_networks=("127.0.0.1/32",), timeout_s=0.6)
    with serve({"/slow": _slow_headers, "/drip": _slow_drip}) as server:
        started = time.monotonic()
        with pytest.raises(ImageInputError, match=r"timed out after 0\.6s"):
            run(load_image(f"http://127.0.0.1:{server.port}{path}", "image", policy))
        assert time.monotonic() - started < 3


def test_content_type_is_not_trusted() -> None:
    html = b"<!DOCTYPE html><html><body>not an image</body></html>"
    with serve({"/fake.png": serves(html, "image/png")}) as server:
        with pytest.raises(ImageInputError, match="HTML"):
            run(load_image(f"http://127.0.0.1:{server.port}/fake.png", "image", LOOPBACK_ONLY))


def test_http_errors_and_compressed_bodies_refused() -> None:
    gz = lambda h: respond(h, 200, zlib.compress(image_bytes("PNG")), "image/png", {"Content-Encoding": "deflate"})  # noqa: E731
    with serve({"/gz": gz}) as server:
        with pytest.raises(ImageInputError, match="HTTP 404"):
            run(load_image(f"http://127.0.0.1:{server.port}/missing", "image", LOOPBACK_ONLY))
        with pytest.raises(ImageInputError, match="Content-Encoding 'deflate'"):
            run(load_image(f"http://127.0.0.1:{server.port}/gz", "image", LOOPBACK_ONLY))
        assert all(host == f"127.0.0.1:{server.port}" for _, host in server.requests)


def test_connection_refused_is_clear() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(ImageInputError, match="could not connect"):
            run(load_image(f"http://127.0.0.1:{port}/x.png", "image", LOOPBACK_ONLY))


# --------------------------------------------------------------------------
# decoding, base64 and data URIs
# --------------------------------------------------------------------------


def test_decompression_bomb_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self: Any) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    policy = ImageFetchPolicy()
    over_our_limit = png_header_only(8000, 6000)  # 48 MP: over 40 MP, under Pillow's own guard
    assert len(over_our_limit) < 200_000
    with pytest.raises(ImageInputError, match=r"8000x6000 = 48000000 pixels, over the limit of 40000000"):
        decode_image_bytes(over_our_limit, "image", policy)
    huge = png_header_only(20000, 20000)  # 400 MP: Pillow's guard fires inside open()
    with pytest.raises(ImageInputError, match="exceed the limit of 40000000 pixels"):
        run(load_image(base64.b64encode(huge).decode(), "image", policy))


def test_truncated_and_corrupt_refused() -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    png = buf.getvalue()
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        decode_image_bytes(png[: len(png) // 2], "image", ImageFetchPolicy())
    jpeg = image_bytes("JPEG", size=(64, 64))
    with pytest.raises(ImageInputError, match="JPEG image data is truncated or corrupt"):
        decode_image_bytes(jpeg[:3] + b"\x00" * 200, "image", ImageFetchPolicy())
    with pytest.raises(ImageInputError, match="empty"):
        decode_image_bytes(b"", "image", ImageFetchPolicy())


def test_formats_follow_policy() -> None:
    gif = image_bytes("GIF", mode="P", color=3)
    bmp = image_bytes("BMP")
    tiff = image_bytes("TIFF")
    default = ImageFetchPolicy()
    pixels = decode_image_bytes(gif, "image", default)
    assert pixels.dtype == np.uint8 and pixels.shape == (24, 32, 3)
    assert decode_image_bytes(bmp, "image", default).shape == (24, 32, 3)
    png_only = ImageFetchPolicy(allowed_formats=frozenset({"PNG"}))
    with pytest.raises(ImageInputError, match="GIF images are not accepted; accepted formats: PNG"):
        decode_image_bytes(gif, "image", png_only)
    with pytest.raises(ImageInputError, match="BMP images are not accepted"):
        decode_image_bytes(bmp, "image", png_only)
    with pytest.raises(ImageInputError, match="TIFF images are not accepted"):
        decode_image_bytes(tiff, "image", default)
    with_tiff = ImageFetchPolicy(allowed_formats=default.allowed_formats | {"TIFF"})
    assert decode_image_bytes(tiff, "image", with_tiff).shape == (24, 32, 3)
    assert sniff_format(image_bytes("WEBP")) == "WEBP"


def test_transparency_and_16bit_are_normalised() -> None:
    rgba = image_bytes("PNG", mode="RGBA", color=(0, 0, 0, 0))
    assert tuple(decode_image_bytes(rgba, "image", ImageFetchPolicy())[0, 0]) == (255, 255, 255)
    grey16 = image_bytes("PNG", mode="I;16", color=32768)
    assert tuple(decode_image_bytes(grey16, "image", ImageFetchPolicy())[0, 0]) == (128, 128, 128)


def test_base64_variants() -> None:
    png = image_bytes("PNG")
    policy = ImageFetchPolicy()
    wrapped = base64.encodebytes(png).decode()  # newline every 76 chars
    assert "\n" in wrapped
    assert run(load_image(wrapped, "image", policy)).shape == (24, 32, 3)
    unpadded = "  " + base64.b64encode(png).decode().rstrip("=") + "\r\n"
    assert run(load_image(unpadded, "image", policy)).shape == (24, 32, 3)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert run(load_image(uri, "image", policy)).shape == (24, 32, 3)
    # The data URI's declared type does not matter; the bytes do.
    uri_jpeg_label = "data:image/jpeg;base64," + base64.b64encode(png).decode()
    assert run(load_image(uri_jpeg_label, "image", policy)).shape == (24, 32, 3)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("iVBORw0KGgo!AAAA", r"invalid base64 image data: character '!' at position 11"),
        ("iVBORw0K-_AAAA", "URL-safe base64 is not accepted"),
        ("iVBO=Rw0KGgo", "padding appears before the end"),
        ("iVBORw0KG", "length is impossible"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain' is not an image type"),
        ("data:;base64,aGVsbG8=", "is not an image type"),
        ("data:image/png,rawbytes", "only base64 data URIs are accepted"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,!!!!", "invalid base64 in data URI"),
        ("data:image/png;base64,", "is empty"),
        ("   ", "empty"),
        ("aGVsbG8gd29ybGQ=", r"not a supported image \(unrecognised leading bytes 68 65 6c 6c"),
    ],
)
def test_invalid_inline_values(value: str, message: str) -> None:
    with pytest.raises(ImageInputError, match=message) as info:
        run(load_image(value, "mask_image", ImageFetchPolicy()))
    assert str(info.value).startswith("mask_image: ")


def test_base64_size_cap_applies_to_decoded_size() -> None:
    policy = ImageFetchPolicy(max_bytes=1000)
    just_fits = base64.b64encode(image_bytes("PNG", size=(4, 4)))
    assert len(base64.b64decode(just_fits)) < 1000
    assert run(load_image(just_fits.decode(), "image", policy)).shape == (4, 4, 3)
    too_big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 1500).decode()
    with pytest.raises(ImageInputError, match=r"decodes to 1508 bytes, over the limit of 1000"):
        run(load_image(too_big, "image", policy))


def test_non_string_value_refused() -> None:
    with pytest.raises(ImageInputError, match="expected a string"):
        run(load_image(b"abc", "image", ImageFetchPolicy()))  # type: ignore[arg-type]
