"""Image references of API requests: `data:` URIs, local files under an allowed folder, and (when
allowed) http(s) URLs on public addresses. Each becomes a reference `load_image` takes (a data URI
or an absolute path) after the checks below; the image itself is decoded and checked by
`vision.image.load_image` (formats, modes, pixel limits)."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vision.image import ImageError, load_image

from .options import DEFAULT_MAX_IMAGE_BYTES

DEFAULT_FETCH_TIMEOUT = 10.0


class MediaError(ValueError):
    """A refused image reference. `status` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class MediaPolicy:
    allowed_local_path: Path | None = None  # local files only under this folder
    allow_fetch: bool = False  # http(s) URLs (public addresses only)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT

    def resolve(self, url: str) -> str:
        """A checked reference for the image at `url`."""
        if not isinstance(url, str) or not url:
            raise MediaError("image_url.url must be a non-empty string")
        if url.startswith("data:"):
            ref = self._data_uri(url)
        elif url.startswith(("http://", "https://")):
            ref = self._fetch(url)
        elif url.startswith("file://") or url.startswith("/") or "://" not in url:
            ref = self._local(url)
        else:
            scheme = url.split(":", 1)[0]
            raise MediaError(f"image_url scheme {scheme!r} is not supported: send a data: URI (base64), a local "
                             f"file under --allowed-local-media-path, or http(s) with --allow-fetch")
        try:
            load_image(ref)  # refuse a corrupt or oversized picture now, with a 400, not inside the engine
        except ImageError as e:
            raise MediaError(f"the image cannot be used: {e}") from e
        return ref

    def _data_uri(self, url: str) -> str:
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise MediaError("a data: image URI must be base64, e.g. data:image/png;base64,....")
        if len(payload) * 3 // 4 > self.max_image_bytes:
            raise MediaError(f"the image is about {len(payload) * 3 // 4:,} bytes, over the limit of "
                             f"{self.max_image_bytes:,} (--max-image-bytes): send a smaller image", status=413)
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"the data: URI is not valid base64 ({e})") from e
        return url

    def _local(self, url: str) -> str:
        if self.allowed_local_path is None:
            raise MediaError("local image files are not allowed: start the server with --allowed-local-media-path "
                             "DIR, or send the image as a data: URI")
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.allowed_local_path))
        if root != real and root not in real.parents:
            raise MediaError(f"{path} is outside the allowed media folder (--allowed-local-media-path)")
        if not real.is_file():
            raise MediaError(f"{path}: no such image file")
        if real.stat().st_size > self.max_image_bytes:
            raise MediaError(f"{path} is {real.stat().st_size:,} bytes, over the limit of {self.max_image_bytes:,}",
                             status=413)
        return str(real)

    def _fetch(self, url: str) -> str:
        if not self.allow_fetch:
            raise MediaError("fetching images by URL is off: start the server with --allow-fetch, or send the image "
                             "as a data: URI")
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if not host:
            raise MediaError(f"image URL {url!r} has no host")
        check_public_host(host, port)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "xcomposer-server"}),
                             timeout=self.fetch_timeout) as resp:
                data = resp.read(self.max_image_bytes + 1)
                ctype = resp.headers.get_content_type()
        except MediaError:
            raise
        except Exception as e:  # network errors of any kind are the URL's problem, not ours
            raise MediaError(f"fetching {url} failed: {e}") from e
        if len(data) > self.max_image_bytes:
            raise MediaError(f"the image at {url} is over the limit of {self.max_image_bytes:,} bytes", status=413)
        return f"data:{ctype or 'application/octet-stream'};base64,{base64.b64encode(data).decode('ascii')}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # a redirect could point inside
        raise MediaError(f"the image URL redirects ({code}) to {newurl}: give the final URL")


def check_public_host(host: str, port: int) -> None:
    """Refuse a host that resolves to a loopback, private, link-local or otherwise non-public address."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise MediaError(f"cannot resolve image host {host!r}: {e}") from e
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise MediaError(f"image host {host!r} resolves to {addr}, a non-public address: fetching from "
                             f"loopback or private networks is refused")


__all__ = ["MediaPolicy", "MediaError", "check_public_host", "DEFAULT_MAX_IMAGE_BYTES"]
