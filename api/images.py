"""Image inputs for request fields: URL, raw base64 or ``data:`` URI -> uint8 RGB pixels.

This module owns turning a client-supplied image reference into a fully
decoded ``uint8 [H, W, 3]`` numpy array -- the one form an input image has from
here to the pipeline (the input store keeps it as ``.npy``, the backends pass it
on as is) -- and is the API's only outbound-HTTP surface driven by client input,
so it is written as an SSRF boundary:

* URLs are fetched only over http/https; every hop (including each redirect,
  which is followed by hand) has its host resolved once with
  ``loop.getaddrinfo`` and *every* resolved address vetted by
  :func:`check_address` before any socket is opened.
* The connection then goes to the vetted IP itself: the request URL is
  rewritten to the IP literal, the original ``Host`` header is sent, and for
  https the original hostname is passed as httpx's documented
  ``sni_hostname`` request extension so SNI and certificate verification still
  use the name the client asked for.  Nothing re-resolves the name between
  check and connect, so DNS rebinding cannot swap the address.
* Bodies are streamed with a byte cap, compressed transfer encodings are
  refused, and the whole fetch runs under one overall deadline.
* Bytes are sniffed (never trusting the URL, ``Content-Type`` or data-URI
  media type), only allowed formats reach Pillow, and the pixel count is
  checked from the header before any pixel data is decoded.

Every rejection raises :class:`ImageInputError`, whose message is meant to be
returned verbatim to the client as a 400 ``{"error": ...}``.  The command line's
``diffserve generate`` decodes through the same function
(:func:`load_image_or_file`, which also takes a local path -- never reachable
from HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageFetchPolicy",
    "ImageInputError",
    "check_address",
    "decode_image_bytes",
    "load_image",
    "load_image_or_file",
    "send_pinned",
    "sniff_format",
    "vet_url",
]

logger = logging.getLogger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class ImageInputError(ValueError):
    """A client-supplied image could not be accepted; the message is client-facing."""


@dataclass(frozen=True)
class ImageFetchPolicy:
    """Limits applied to one image input (fetch, decode and address policy)."""

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 15.0
    max_redirects: int = 3
    max_pixels: int = 40_000_000
    allowed_formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
    allow_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Fail at configuration time rather than on the first request.
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes and max_pixels must be positive")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        _parse_networks(tuple(self.allow_networks))


# --------------------------------------------------------------------------
# Address policy
# --------------------------------------------------------------------------

# Cloud instance-metadata / platform endpoints.  Some of these sit in ranges
# Python calls "global" (Azure WireServer, Oracle), so they are listed
# explicitly, and they stay refused even when an allow-listed CIDR covers
# them: credentials behind them are never a legitimate image source.
_METADATA_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.169.254/32",  # AWS / GCP / Azure / OpenStack IMDS
        "169.254.170.2/32",  # AWS ECS task metadata
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "168.63.129.16/32",  # Azure WireServer
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "192.0.0.192/32",  # Oracle Cloud metadata
    )
)

_V4_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_V4_SHARED = ipaddress.ip_network("100.64.0.0/10")
_V4_RFC1918 = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_V6_IPV4_COMPAT = ipaddress.ip_network("::/96")
_V6_ULA = ipaddress.ip_network("fc00::/7")
_V6_6TO4 = ipaddress.ip_network("2002::/16")
_V6_NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")
_V6_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


@functools.lru_cache(maxsize=64)
def _parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR in allow_networks: {cidr!r}: {exc}") from None
    return tuple(nets)


def _in_any(ip: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    # ipaddress returns False (not an error) for a v4/v6 mismatch.
    return any(ip in net for net in nets)


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    if ip.is_unspecified:
        return "the unspecified address"
    if ip in _V4_THIS_NETWORK:
        return "in the 'this network' range 0.0.0.0/8"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _V4_SHARED:
        return "in the shared address space 100.64.0.0/10"
    if _in_any(ip, _V4_RFC1918):
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _v6_problem(ip: ipaddress.IPv6Address) -> str | None:
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    # Embedded-IPv4 forms are judged by the IPv4 address they reach, and must
    # be handled before the generic checks: Python calls ::/8 "reserved" and
    # would otherwise refuse NAT64 forms of public addresses too.
    if ip in _V6_IPV4_COMPAT:
        return f"a deprecated IPv4-compatible IPv6 address (embeds {ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)})"
    if ip in _V6_NAT64_LOCAL:
        return "in the local-use NAT64 prefix 64:ff9b:1::/48"
    if ip in _V6_NAT64_WKP:
        inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        reason = _v4_problem(inner) or (
            "a cloud metadata endpoint" if _in_any(inner, _METADATA_NETWORKS) else None
        )
        return f"a NAT64 address embedding {inner}, which is {reason}" if reason else None
    if ip in _V6_6TO4:
        inner = ip.sixtofour
        assert inner is not None
        reason = _v4_problem(inner) or (
            "a cloud metadata endpoint" if _in_any(inner, _METADATA_NETWORKS) else None
        )
        if reason:
            return f"a 6to4 address embedding {inner}, which is {reason}"
        return None
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_site_local:
        return "a site-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _V6_ULA:
        return "a private (unique local) address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _address_problem(ip: IPAddress, policy: ImageFetchPolicy) -> str | None:
    """Why ``ip`` must not be contacted, or None if it may be."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if _in_any(ip, _METADATA_NETWORKS) or (mapped is not None and _in_any(mapped, _METADATA_NETWORKS)):
        return "a cloud metadata endpoint"
    allowed = _parse_networks(tuple(policy.allow_networks))
    # An IPv4-mapped address reaches exactly the IPv4 host, so the allow-list
    # applies to either spelling; 6to4/NAT64 go via a gateway and do not.
    if _in_any(ip, allowed) or (mapped is not None and _in_any(mapped, allowed)):
        return None
    if mapped is not None:
        reason = _v4_problem(mapped)
        return f"{reason} (IPv4-mapped form of {mapped})" if reason else None
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    return _v6_problem(ip)


def _display(ip: IPAddress) -> str:
    # Python 3.11 prints ::ffff:a9fe:a9fe; the dotted form is what people recognise.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def check_address(ip: IPAddress, policy: ImageFetchPolicy) -> None:
    """Raise :class:`ImageInputError` unless ``ip`` may be fetched from.

    Refuses loopback, private, link-local, multicast, reserved, unspecified,
    shared (100.64/10), non-global special-purpose ranges, cloud metadata
    endpoints, and IPv4-mapped / IPv4-compatible / 6to4 / NAT64 forms that
    embed such addresses -- unless the address is inside
    ``policy.allow_networks`` (metadata endpoints are refused regardless).
    """
    reason = _address_problem(ip, policy)
    if reason is not None:
        raise ImageInputError(f"address {_display(ip)} is not allowed: it is {reason}")


# --------------------------------------------------------------------------
# Byte-level decoding
# --------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name implied by the magic bytes, or None if unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _describe_unknown(data: bytes) -> str:
    """A short, client-useful guess at what non-image bytes are."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "it looks like an HTML page"
    if b"<svg" in head:
        return "it looks like SVG, which is not supported"
    if head.startswith(b"<?xml"):
        return "it looks like XML"
    if head.startswith((b"{", b"[")):
        return "it looks like JSON"
    if data.startswith(b"%PDF"):
        return "it looks like a PDF"
    if data[4:8] == b"ftyp":
        return "it looks like HEIC/AVIF/MP4, which is not supported"
    return f"unrecognised leading bytes {data[:8].hex(' ')}"


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    # 16/32-bit grey would be clipped (not scaled) by convert("RGB"), turning
    # most of a 16-bit PNG white; scale to 8 bits first.
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        # Composite on white: convert("RGB") would expose whatever colour the
        # transparent pixels happen to carry (often black), which then leaks
        # into img2img/inpaint conditioning.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def decode_image_bytes(data: bytes, field: str, policy: ImageFetchPolicy) -> np.ndarray:
    """Decode ``data`` into uint8 RGB pixels ``[H, W, 3]`` or raise ImageInputError.

    The real format is sniffed from the bytes; formats outside
    ``policy.allowed_formats`` never reach a Pillow decoder, the pixel count
    is checked from the header before pixel data is decoded, and truncated or
    corrupt data is rejected.  The first frame of animations is used and EXIF
    orientation is applied.
    """
    if not data:
        raise ImageInputError(f"{field}: image data is empty")
    if len(data) > policy.max_bytes:
        raise ImageInputError(
            f"{field}: image is {len(data)} bytes, over the limit of {policy.max_bytes} bytes"
        )
    fmt = sniff_format(data)
    allowed = ", ".join(sorted(policy.allowed_formats))
    if fmt is None:
        raise ImageInputError(
            f"{field}: data is not a supported image ({_describe_unknown(data)}); "
            f"accepted formats: {allowed}"
        )
    if fmt not in policy.allowed_formats:
        raise ImageInputError(f"{field}: {fmt} images are not accepted; accepted formats: {allowed}")

    try:
        # formats=[fmt] keeps Pillow from trying every other plugin on bytes
        # that merely look like one format.
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageInputError(f"{field}: {fmt} header declares an empty image ({width}x{height})")
            if width * height > policy.max_pixels:
                raise ImageInputError(
                    f"{field}: image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{policy.max_pixels} pixels (refused before decoding)"
                )
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - broken EXIF must not reject a decodable image
                logger.debug("%s: ignoring unusable EXIF orientation", field, exc_info=True)
                oriented = img
            rgb = _flatten_to_rgb(oriented if oriented is not None else img)
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        # Pillow's own (larger) guard fires inside open() before we can read
        # the size; the outcome for the client is the same.
        raise ImageInputError(
            f"{field}: image dimensions exceed the limit of {policy.max_pixels} pixels (refused before decoding)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # Pillow signals truncation and corruption through a grab-bag of types.
        logger.debug("%s: %s decode failed", field, fmt, exc_info=True)
        raise ImageInputError(f"{field}: {fmt} image data is truncated or corrupt ({exc})") from None
    # A writable, C-contiguous copy that no longer refers to Pillow's buffers.
    return np.array(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------
# base64 and data: URIs
# --------------------------------------------------------------------------

# ASCII whitespace only: str.split()/\s would also accept exotic Unicode spaces.
_B64_WHITESPACE = re.compile(r"[ \t\r\n\f\v]+")
_B64_INVALID = re.compile(r"[^A-Za-z0-9+/= \t\r\n\f\v]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def _decode_base64(text: str, field: str, policy: ImageFetchPolicy, what: str) -> bytes:
    # Generous bound (whitespace is tolerated) so a huge string is refused
    # before it is scanned or copied.
    if len(text) > 2 * policy.max_bytes + 4096:
        raise ImageInputError(f"{field}: {what} is too large (limit {policy.max_bytes} decoded bytes)")
    bad = _B64_INVALID.search(text)
    if bad is not None:
        hint = " (URL-safe base64 is not accepted; use the standard alphabet)" if bad.group() in "-_" else ""
        raise ImageInputError(
            f"{field}: invalid {what}: character {bad.group()!r} at position {bad.start()} "
            f"is not in the base64 alphabet{hint}"
        )
    compact = _B64_WHITESPACE.sub("", text)
    body = compact.rstrip("=")
    if not body:
        raise ImageInputError(f"{field}: {what} is empty")
    if "=" in body:
        raise ImageInputError(f"{field}: invalid {what}: '=' padding appears before the end of the data")
    if len(compact) - len(body) > 2:
        raise ImageInputError(f"{field}: invalid {what}: too much '=' padding")
    if len(body) % 4 == 1:
        raise ImageInputError(f"{field}: invalid {what}: length is impossible for base64 (truncated data?)")
    decoded_len = len(body) * 3 // 4
    if decoded_len > policy.max_bytes:
        raise ImageInputError(
            f"{field}: {what} decodes to {decoded_len} bytes, over the limit of {policy.max_bytes} bytes"
        )
    # Missing padding is unambiguous, so restore it rather than refuse.
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:  # pragma: no cover - pre-validation should catch everything
        raise ImageInputError(f"{field}: invalid {what}: {exc}") from None


def _decode_data_uri(text: str, field: str, policy: ImageFetchPolicy) -> bytes:
    comma = text.find(",")
    if comma < 0:
        raise ImageInputError(f"{field}: malformed data URI: no ',' separating the header from the data")
    header = text[len("data:"):comma]
    parts = [p.strip() for p in header.split(";")]
    media_type = parts[0].lower()
    if not media_type.startswith("image/"):
        shown = media_type or "text/plain (the default)"
        raise ImageInputError(f"{field}: data URI media type {shown!r} is not an image type")
    if len(parts) < 2 or parts[-1].lower() != "base64":
        raise ImageInputError(
            f"{field}: only base64 data URIs are accepted (expected 'data:{media_type};base64,...')"
        )
    return _decode_base64(text[comma + 1:], field, policy, "base64 in data URI")


# --------------------------------------------------------------------------
# URL fetching
# --------------------------------------------------------------------------

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_USER_AGENT: Final = "diffserve-image-fetch/1"


def _short(url: httpx.URL | str, limit: int = 200) -> str:
    text = str(url)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_url(text: str, field: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ImageInputError(f"{field}: invalid URL {_short(text)!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ImageInputError(f"{field}: URL scheme {url.scheme!r} is not allowed; use http or https")
    if not url.raw_host:
        raise ImageInputError(f"{field}: URL {_short(text)!r} has no host")
    if url.userinfo:
        raise ImageInputError(f"{field}: URLs with embedded credentials (user:password@) are not accepted")
    return url


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def _resolve_checked(url: httpx.URL, field: str, policy: ImageFetchPolicy) -> list[IPAddress]:
    """Resolve the URL's host once and vet every address; returns them in resolver order."""
    host = url.raw_host.decode("ascii")
    literal = _ip_literal(host)
    if literal is not None:
        reason = _address_problem(literal, policy)
        if reason is not None:
            logger.warning("refused image URL for %s: %s is %s", field, _display(literal), reason)
            raise ImageInputError(f"{field}: refusing to fetch {_short(url)}: {_display(literal)} is {reason}")
        return [literal]

    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        # Non-canonical numeric spellings (0x7f000001, 2130706433, 127.1,
        # 0177.1) are not IP literals to ipaddress, but the C resolver turns
        # them into the real address here, so they get the same check.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageInputError(f"{field}: could not resolve host {host!r} ({exc})") from None

    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ImageInputError(f"{field}: host {host!r} has no IPv4/IPv6 address")
    for ip in addresses:
        # One bad record refuses the host: otherwise an attacker could mix a
        # public and an internal record and win whichever we try first.
        reason = _address_problem(ip, policy)
        if reason is not None:
            logger.warning("refused image URL for %s: host %r resolves to %s (%s)", field, host, ip, reason)
            # The resolved address itself is not echoed, so the API cannot be
            # used to read internal DNS.
            raise ImageInputError(f"{field}: refusing to fetch {_short(url)}: host {host!r} resolves to {reason}")
    return addresses


async def send_pinned(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    addresses: list[IPAddress],
    field: str,
    *,
    headers: dict[str, str],
    timeout_s: float,
    content: bytes | None = None,
) -> httpx.Response:
    """Send ``method url`` to one of the vetted ``addresses`` (from :func:`vet_url`), never
    re-resolving the name; returns a streaming response. Also the webhook deliverer's transport."""
    host = url.raw_host.decode("ascii")
    # url.netloc is host[:port] (no userinfo), bracketed for IPv6.
    headers = {"Host": url.netloc.decode("ascii"), **headers}
    extensions: dict[str, object] = {}
    if _ip_literal(host) is None:
        # httpcore uses this instead of the URL host for SNI and for
        # certificate hostname verification (ignored for plain http).
        extensions["sni_hostname"] = host.rstrip(".")
    last_error: Exception | None = None
    for ip in addresses:
        # A vetted IPv4-mapped address is dialled as plain IPv4 so the
        # connect does not depend on the host's dual-stack settings.
        target = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        pinned = url.copy_with(host=str(target))
        request = client.build_request(
            method, pinned, headers=headers, content=content, extensions=extensions, timeout=timeout_s
        )
        try:
            return await client.send(request, stream=True, follow_redirects=False)
        except httpx.ConnectError as exc:
            # Every address was vetted, so trying the next one is safe.
            logger.info("%s: connect to %s for %s failed: %s", field, ip, host, exc)
            last_error = exc
    raise ImageInputError(f"{field}: could not connect to {host!r} ({last_error})")


async def vet_url(text: str, field: str, policy: ImageFetchPolicy) -> tuple[httpx.URL, list[IPAddress]]:
    """``text`` as an http(s) URL and the addresses its host resolves to, every one allowed by
    ``policy`` (the SSRF guard, also applied to webhook URLs); ImageInputError otherwise."""
    url = _parse_url(text, field)
    return url, await _resolve_checked(url, field, policy)


async def _read_capped(response: httpx.Response, url: httpx.URL, field: str, policy: ImageFetchPolicy) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ImageInputError(
            f"{field}: {_short(url)} was sent with Content-Encoding {encoding!r}; compressed responses are not accepted"
        )
    declared = response.headers.get("content-length")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise ImageInputError(f"{field}: {_short(url)} sent an invalid Content-Length {declared!r}") from None
        if declared_len > policy.max_bytes:
            raise ImageInputError(
                f"{field}: image at {_short(url)} is {declared_len} bytes (Content-Length), "
                f"over the limit of {policy.max_bytes} bytes"
            )
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageInputError(
                f"{field}: image at {_short(url)} exceeded the limit of {policy.max_bytes} bytes while downloading"
            )
    return bytes(body)


async def _fetch(url: httpx.URL, field: str, policy: ImageFetchPolicy, client: httpx.AsyncClient) -> bytes:
    redirects = 0
    while True:
        addresses = await _resolve_checked(url, field, policy)
        response = await send_pinned(client, "GET", url, addresses, field, timeout_s=policy.timeout_s, headers={
            "Accept": "image/*",
            # Compressed bodies would make the byte cap meaningless (a small
            # brotli body can inflate to gigabytes in one chunk).
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
        })
        try:
            status = response.status_code
            if status in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise ImageInputError(f"{field}: {_short(url)} answered HTTP {status} without a Location")
                if redirects >= policy.max_redirects:
                    raise ImageInputError(
                        f"{field}: too many redirects fetching the image (limit {policy.max_redirects})"
                    )
                redirects += 1
                try:
                    # Relative locations resolve against the logical URL,
                    # never against the IP-pinned one.
                    target = url.join(location)
                except httpx.InvalidURL as exc:
                    raise ImageInputError(f"{field}: redirect to an invalid URL ({exc})") from None
                url = _parse_url(str(target), field)
                logger.debug("%s: following HTTP %s to %s", field, status, _short(url))
                continue
            if not 200 <= status < 300 or status in (204, 205, 206):
                raise ImageInputError(f"{field}: fetching {_short(url)} failed with HTTP {status}")
            logger.debug(
                "%s: fetched %s (content-type %r)", field, _short(url), response.headers.get("content-type")
            )
            return await _read_capped(response, url, field, policy)
        finally:
            await response.aclose()


async def _fetch_url(
    text: str, field: str, policy: ImageFetchPolicy, client: httpx.AsyncClient | None
) -> bytes:
    url = _parse_url(text, field)
    owned = client is None
    if client is None:
        # trust_env=False: an HTTP(S)_PROXY from the environment would do
        # its own connecting.  No keep-alive: the client lives for one call.
        client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=policy.timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
    try:
        # One deadline for DNS, every hop and the body, so a slow-drip
        # server cannot stretch the fetch by staying under per-read timeouts.
        # wait_for rather than asyncio.timeout: the project supports 3.10.
        return await asyncio.wait_for(_fetch(url, field, policy, client), policy.timeout_s)
    except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
        raise ImageInputError(
            f"{field}: timed out after {policy.timeout_s:g}s fetching the image from {_short(url)}"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageInputError(f"{field}: error fetching {_short(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        if owned:
            await client.aclose()


async def load_image(
    value: str,
    field: str,
    policy: ImageFetchPolicy,
    *,
    client: httpx.AsyncClient | None = None,
) -> np.ndarray:
    """Load the image a request field refers to; returns uint8 RGB pixels ``[H, W, 3]``.

    ``value`` may be an http(s) URL, raw base64, or a ``data:image/...;base64,``
    URI.  ``field`` names the request field in error messages.

    ``client`` lets the caller supply transport settings (e.g. a custom CA).
    Connection pinning works with any httpx client, but a shared client pools
    connections by IP, so a TLS connection verified for one hostname could be
    reused for another hostname on the same IP; pass a client without
    environment proxies (``trust_env=False``) and prefer the default (a fresh
    client per call) unless you need otherwise.
    """
    if not isinstance(value, str):
        raise ImageInputError(f"{field}: expected a string (URL, base64 or data URI), got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ImageInputError(f"{field}: image value is empty")
    # ':' is outside the base64 alphabet, so a scheme prefix is unambiguous.
    scheme_match = _SCHEME.match(text)
    if scheme_match is not None:
        scheme = scheme_match.group(1).lower()
        if scheme == "data":
            data = _decode_data_uri(text, field, policy)
        elif scheme in ("http", "https"):
            data = await _fetch_url(text, field, policy, client)
        else:
            raise ImageInputError(f"{field}: URL scheme {scheme!r} is not allowed; use http or https")
    else:
        data = _decode_base64(text, field, policy, "base64 image data")
    # Decoding a large image takes long enough to stall the event loop.
    return await asyncio.to_thread(decode_image_bytes, data, field, policy)


async def load_image_or_file(value: str, field: str, policy: ImageFetchPolicy) -> np.ndarray:
    """:func:`load_image` for the command line: ``value`` may also be a local file path.

    The file's bytes go through the same :func:`decode_image_bytes` (format sniffing, size and
    pixel limits) as an HTTP input. Only ``diffserve generate`` calls this; the HTTP API must
    not, since a path would let clients read the server's files.
    """
    if isinstance(value, str) and _is_file(value):
        return await asyncio.to_thread(decode_image_bytes, Path(value).read_bytes(), field, policy)
    return await load_image(value, field, policy)


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except OSError:  # e.g. a base64 string longer than a file name may be
        return False
