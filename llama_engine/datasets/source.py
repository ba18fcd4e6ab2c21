"""Fetch a dataset's ``content_url`` once: ``file://``, ``data:`` (base64 or percent-encoded)
or ``http(s)://`` (with a size limit and a timeout)."""
from __future__ import annotations

import base64
import binascii
import http.client
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: a large SFT set in JSONL is a few hundred MB
DEFAULT_TIMEOUT_S = 60.0
READ_CHUNK_BYTES = 1 << 20


class DatasetSourceError(ValueError):
    """The content cannot be fetched: the message says which URL and why."""


@dataclass(frozen=True)
class Content:
    """The fetched bytes, and what the URL says about their format (a file name or a MIME
    type; either may be empty)."""
    data: bytes
    name: str
    mime_type: str


def _read_limited(stream, max_bytes: int, url: str) -> bytes:
    chunks, total = [], 0
    while chunk := stream.read(READ_CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            raise DatasetSourceError(f"{url}: content is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def file_url_path(url: str) -> Path:
    """The local path a ``file://`` URL names, percent-decoded (``Path.as_uri``'s inverse).
    Raises ValueError for another scheme or a remote host."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"{url[:64]}: not a file:// URL")
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url}: file URLs must name a local path (file:///path)")
    return Path(urllib.parse.unquote(parsed.path))


def _fetch_file(url: str, max_bytes: int) -> Content:
    try:
        path = file_url_path(url)
    except ValueError as e:
        raise DatasetSourceError(str(e)) from None
    try:
        if path.is_dir():
            raise DatasetSourceError(f"{url}: a directory, not a file")
        if not path.is_file():
            raise DatasetSourceError(f"{url}: no such file")
        if path.stat().st_size > max_bytes:
            raise DatasetSourceError(f"{url}: file is larger than the limit of {max_bytes} bytes")
        return Content(path.read_bytes(), path.name, "")
    except (OSError, ValueError) as e:  # unreadable, or a path the OS refuses (a NUL byte)
        if isinstance(e, DatasetSourceError):
            raise
        raise DatasetSourceError(f"{url}: cannot read ({e})") from None


def _fetch_data(url: str, max_bytes: int) -> Content:
    """RFC 2397: ``data:[<mediatype>][;base64],<data>``."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise DatasetSourceError("data URL has no ',' before its payload")
    params = header.split(";")
    is_base64 = params[-1].strip().lower() == "base64"
    mime_type = params[0].strip().lower()
    try:
        data = (base64.b64decode(urllib.parse.unquote(payload), validate=True) if is_base64
                else urllib.parse.unquote_to_bytes(payload))
    except (binascii.Error, ValueError) as e:
        raise DatasetSourceError(f"data URL: invalid base64 payload ({e})") from None
    if len(data) > max_bytes:
        raise DatasetSourceError(f"data URL: content is larger than the limit of {max_bytes} bytes")
    return Content(data, "", mime_type)


def _fetch_http(url: str, max_bytes: int, timeout_s: float) -> Content:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llama-engine"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise DatasetSourceError(
                    f"{url}: content is larger than the limit of {max_bytes} bytes")
            data = _read_limited(response, max_bytes, url)
            mime_type = response.headers.get_content_type() or ""
    except DatasetSourceError:
        raise
    except urllib.error.HTTPError as e:
        raise DatasetSourceError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (ValueError, http.client.InvalidURL) as e:  # a malformed host, port or character
        raise DatasetSourceError(f"{url[:200]}: invalid URL ({e})") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DatasetSourceError(f"{url}: cannot fetch ({reason})") from None
    name = Path(urllib.parse.urlparse(url).path).name
    return Content(data, name, "" if mime_type == "application/octet-stream" else mime_type)


def fetch_content(url: str, max_bytes: int = DEFAULT_MAX_BYTES,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Content:
    """The bytes behind ``url``. Raises DatasetSourceError (unknown scheme, missing file, bad
    data URL, HTTP error, timeout after ``timeout_s`` seconds, more than ``max_bytes``)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "file":
        return _fetch_file(url, max_bytes)
    if scheme == "data":
        return _fetch_data(url, max_bytes)
    if scheme in ("http", "https"):
        return _fetch_http(url, max_bytes, timeout_s)
    raise DatasetSourceError(f"{url[:64]}: unsupported URL scheme (file://, data: or http(s)://)")
