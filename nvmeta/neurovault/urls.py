"""URL safety: canonical NeuroVault URLs, file names, pagination links."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from nvmeta.neurovault.errors import CorruptFile

NEUROVAULT_HOSTS = frozenset({"neurovault.org", "www.neurovault.org"})

__all__ = [
    "NEUROVAULT_HOSTS",
    "PUBLIC_MEDIA",
    "canonical_url",
    "media_base",
    "page_key",
    "short_url",
    "sibling",
    "source_format",
]

#: NeuroVault's public media root (``file`` URLs of public images)
PUBLIC_MEDIA = "https://neurovault.org/media/"


def canonical_url(url: str) -> str:
    """Rewrite ``http://neurovault.org/...`` (and www.) to https; other URLs unchanged."""
    parts = urlsplit(url)
    if (
        parts.scheme == "http"
        and (parts.hostname or "").lower() in NEUROVAULT_HOSTS
        and parts.port in (None, 80)
    ):
        return urlunsplit(("https", parts.hostname.lower(), parts.path, parts.query, parts.fragment))
    return url


def source_format(url: str) -> str:
    """``"nii.gz"``, ``"nii"`` or ``"analyze"`` from a file URL's name; CorruptFile otherwise."""
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1].lower()
    if name.endswith(".nii.gz"):
        return "nii.gz"
    if name.endswith(".nii"):
        return "nii"
    if name.endswith((".hdr", ".img")):
        return "analyze"
    raise CorruptFile(f"not a NIfTI file name: {name[:80]!r}", url)


def sibling(url: str, ext: str) -> str:
    parts = urlsplit(url)
    path = parts.path
    new_ext = ext.upper() if path[-4:].isupper() else ext
    return urlunsplit((parts.scheme, parts.netloc, path[:-4] + new_ext, parts.query, ""))


def page_key(url: str, query: Mapping[str, Any] | None) -> str:
    """Key of a listing page (host, path, sorted query): detects a repeated page."""
    p = urlsplit(url)
    q = sorted(parse_qsl(p.query, keep_blank_values=True) + [(k, str(v)) for k, v in (query or {}).items()])
    return urlunsplit(("", p.netloc.lower(), p.path, urlencode(q), ""))


def short_url(url: str) -> str:
    """Path and query of a URL (for messages)."""
    p = urlsplit(url)
    return p.path + (f"?{p.query}" if p.query else "")


def media_base(api_url: str) -> str:
    """Media root that goes with an API root: ``https://neurovault.org/api/`` ->
    ``https://neurovault.org/media/`` (the same for another host, e.g. the fixture server); a
    snapshot directory -> :data:`PUBLIC_MEDIA` (its files are addressed by their public URLs)."""
    parts = urlsplit(str(api_url))
    if parts.scheme not in ("http", "https"):
        return PUBLIC_MEDIA
    path = parts.path.rstrip("/")
    if path.endswith("/api") or path == "api":
        path = path[: -len("api")].rstrip("/")
    return canonical_url(urlunsplit((parts.scheme, parts.netloc, path + "/media/", "", "")))
