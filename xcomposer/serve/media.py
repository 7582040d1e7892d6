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
DEFAULT_MAX_VIDEO_BYTES = 64 * 1024 * 1024
# the containers a path may name (upstream's video_extensions, and WebM); a GIF is an image by its
# name, so a GIF sent as a video_url travels as a data:video/gif URI
VIDEO_PATH_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv", ".webm")


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
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES

    def resolve_video(self, url: str) -> str:
        """A checked reference for the video at `url` (a `video_url` part, XComposer2.5): an absolute
        path with a video extension, or a `data:video/...;base64,` URI. Its container and first
        frame are decoded now (vision.hd), so a broken file is a 400 here, not an error inside the engine."""
        from vision.hd import VideoError, load_video
        if not isinstance(url, str) or not url:
            raise MediaError("video_url.url must be a non-empty string")
        limit = self.max_video_bytes
        if url.startswith("data:"):
            ref = self._data_uri(url, "video", limit)
            mime = ref[5:ref.index(";")].lower()
            if not (mime.startswith("video/") or mime == "image/gif"):
                raise MediaError(f"a video data: URI needs a video type (data:video/mp4;base64,...), got {mime!r}")
        elif url.startswith(("http://", "https://")):
            ref = self._fetch(url, "video", limit)
        elif url.startswith("file://") or url.startswith("/") or "://" not in url:
            ref = self._local(url, "video", limit)
        else:
            raise MediaError(f"video_url scheme {url.split(':', 1)[0]!r} is not supported: send a data: URI "
                             f"(base64), a local file under --allowed-local-media-path, or http(s) with --allow-fetch")
        if ref.startswith("data:"):
            payload = base64.b64decode(ref.partition(",")[2])
            ref = "data:video/" + ref[5:].split(";", 1)[0].split("/", 1)[-1] + ";base64," + ref.partition(",")[2]
            source = payload
        elif not ref.lower().endswith(VIDEO_PATH_EXTENSIONS):
            with open(ref, "rb") as f:  # a file whose name does not say video (.gif): carried as bytes
                payload = f.read()
            ref, source = "data:video/gif;base64," + base64.b64encode(payload).decode("ascii"), payload
        else:
            source = ref
        try:
            load_video(source, max_frames=1)
        except (VideoError, ValueError) as e:
            raise MediaError(f"the video cannot be used: {e}") from e
        return ref

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

    def _data_uri(self, url: str, kind: str = "image", limit: int | None = None) -> str:
        limit = self.max_image_bytes if limit is None else limit
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            example = "data:video/mp4;base64,...." if kind == "video" else "data:image/png;base64,...."
            raise MediaError(f"a data: {kind} URI must be base64, e.g. {example}")
        if len(payload) * 3 // 4 > limit:
            raise MediaError(f"the {kind} is about {len(payload) * 3 // 4:,} bytes, over the limit of "
                             f"{limit:,} (--max-{kind}-bytes): send a smaller {kind}", status=413)
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"the data: URI is not valid base64 ({e})") from e
        return url

    def _local(self, url: str, kind: str = "image", limit: int | None = None) -> str:
        limit = self.max_image_bytes if limit is None else limit
        if self.allowed_local_path is None:
            raise MediaError(f"local {kind} files are not allowed: start the server with --allowed-local-media-path "
                             f"DIR, or send the {kind} as a data: URI")
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.allowed_local_path))
        if root != real and root not in real.parents:
            raise MediaError(f"{path} is outside the allowed media folder (--allowed-local-media-path)")
        if not real.is_file():
            raise MediaError(f"{path}: no such {kind} file")
        if real.stat().st_size > limit:
            raise MediaError(f"{path} is {real.stat().st_size:,} bytes, over the limit of {limit:,}",
                             status=413)
        return str(real)

    def _fetch(self, url: str, kind: str = "image", limit: int | None = None) -> str:
        limit = self.max_image_bytes if limit is None else limit
        if not self.allow_fetch:
            raise MediaError(f"fetching {kind}s by URL is off: start the server with --allow-fetch, or send the "
                             f"{kind} as a data: URI")
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if not host:
            raise MediaError(f"image URL {url!r} has no host")
        check_public_host(host, port)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "xcomposer-server"}),
                             timeout=self.fetch_timeout) as resp:
                data = resp.read(limit + 1)
                ctype = resp.headers.get_content_type()
        except MediaError:
            raise
        except Exception as e:  # network errors of any kind are the URL's problem, not ours
            raise MediaError(f"fetching {url} failed: {e}") from e
        if len(data) > limit:
            raise MediaError(f"the {kind} at {url} is over the limit of {limit:,} bytes", status=413)
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


__all__ = ["MediaPolicy", "MediaError", "check_public_host", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_VIDEO_BYTES"]
