"""NeuroVault API clients: HTTP (polite, retrying, bounded) and offline snapshot directory.

``make_client(config["neurovault"])`` returns an :class:`HTTPClient`, or a :class:`SnapshotClient`
when ``url`` is an existing local directory. Both offer the same interface::

    client.get_json("images/151/")              # trailing slash always added
    client.iter_results("collections/1425/images/", limit=1000, log=print)
    client.image(151); client.collection(1425)
    client.get_json_url(url, params)            # absolute URL (Neurosynth)
    client.download(url, dest, expected_size)   # stream to temp, verify, atomic rename

Errors are :class:`NeuroVaultError` subclasses whose ``str`` is a short, specific reason that can go
into the QC table. Retries of the *request* (connection errors, timeouts, 429/5xx with Retry-After)
are urllib3's ``Retry``; only a body cut short after the headers is re-attempted here (see
``HTTPClient._fetch_to``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from nvmeta.errors import ConfigError
from nvmeta.io import atomic_path
from nvmeta.snapshot import PUBLIC_BASE, Snapshot, UnsafePath, api_get

logger = logging.getLogger("nvmeta.client")

NEUROVAULT_HOSTS = frozenset({"neurovault.org", "www.neurovault.org"})
MAX_LIMIT = 1000
MODES = ("download_new", "overwrite", "offline")
#: a compressed map may decompress to at most this many times ``max_file_bytes``
MAX_DECOMPRESSION_RATIO = 16
#: cap on a server's Retry-After (seconds); a longer wait fails the request instead of hanging a job
RETRY_AFTER_MAX = 120


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
class NeuroVaultError(Exception):
    """A request or file could not be had. ``str(exc)`` is a short specific reason."""

    def __init__(self, reason: str, url: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = url


class NotFound(NeuroVaultError):
    """HTTP 404 (unknown or deleted record, image of a private collection, missing file)."""


class Forbidden(NeuroVaultError):
    """HTTP 403 (private collection, API or media)."""


class OfflineError(NeuroVaultError):
    """A network call was attempted in offline mode."""


class CorruptFile(NeuroVaultError):
    """A file is truncated, not gzip, not a NIfTI, or arrived incomplete after re-attempts."""


class TooLarge(NeuroVaultError):
    """A declared or actual size above ``max_file_bytes`` / ``max_json_bytes``."""


class UnsafeInput(NeuroVaultError, ValueError):
    """A server- or caller-provided value that must not be used (bad id, foreign or tricky URL)."""


class ServerError(NeuroVaultError):
    """5xx/429 after retries, timeouts, connection failures, redirect loops."""


class NotJSON(NeuroVaultError):
    """The server answered something other than JSON where JSON was expected (e.g. an HTML page)."""


class _Truncated(Exception):
    """Body cut short or connection broken mid-body (internal: triggers a bounded re-attempt)."""


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def check_image_id(value: Any) -> int:
    """Return ``value`` as a positive int, or raise :class:`UnsafeInput`.

    Accepts ints and strings of decimal digits (Snakemake wildcards); rejects bools, floats,
    signs, whitespace, ``0``, negative values and anything else.
    """
    if isinstance(value, bool):
        raise UnsafeInput(f"invalid id (not a positive integer): {value!r}")
    if isinstance(value, int):
        iid = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        iid = int(value)
    else:
        raise UnsafeInput(f"invalid id (not a positive integer): {str(value)[:60]!r}")
    if iid <= 0:
        raise UnsafeInput(f"invalid id (not a positive integer): {value!r}")
    return iid


#: ids above this are refused (NeuroVault's are below 10**7; a 12-digit bound keeps paths sane)
MAX_ID = 10**12 - 1


def record_id(value: Any, what: str = "id") -> int:
    """A record id as the server sent it, validated once at the boundary (contract C5).

    An int, or a float with an integral value (``5021.0``, as some JSON encoders write it), is
    returned as an int; anything else (``5021.5``, ``"5021"``, ``"abc"``, a bool, ``0``, a
    negative or a huge number, NaN, null) raises :class:`UnsafeInput` naming the value, so the
    record is excluded with that reason. Everything downstream may assume int ids.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsafeInput(f"invalid {what} {str(value)[:40]!r} (not a positive integer)")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise UnsafeInput(f"invalid {what} {value!r} (not a positive integer)")
        value = int(value)
    if not 0 < value <= MAX_ID:
        raise UnsafeInput(f"invalid {what} {str(value)[:40]} (not a positive integer up to {MAX_ID})")
    return value


def normalize_record(record: Any, kind: str = "image") -> dict:
    """A copy of a server record with its ``id`` (and an image's ``collection_id``) as ints.

    Raises
    ------
    UnsafeInput
        Not a JSON object, or an id that :func:`record_id` refuses (the reason names it).
    """
    if not isinstance(record, Mapping):
        raise UnsafeInput(f"{kind} record is not a JSON object ({type(record).__name__})")
    rec = dict(record)
    rec["id"] = record_id(rec.get("id"), f"{kind} id")
    if kind == "image" and rec.get("collection_id") is not None:
        rec["collection_id"] = record_id(rec["collection_id"], "collection_id")
    return rec


def _checked_record(obj: dict, kind: str, asked: int) -> dict:
    try:
        return normalize_record(obj, kind)
    except UnsafeInput as exc:
        raise UnsafeInput(
            f"server returned a record with id {str(obj.get('id'))[:20]!r} for {kind} {asked} ({exc})"
        ) from None


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


def _sibling(url: str, ext: str) -> str:
    parts = urlsplit(url)
    path = parts.path
    new_ext = ext.upper() if path[-4:].isupper() else ext
    return urlunsplit((parts.scheme, parts.netloc, path[:-4] + new_ext, parts.query, ""))


def _md5_files(*paths: Path) -> str:
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file."""
    return _md5_files(Path(path))


def _sniff(path: Path, what: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CorruptFile(f"empty {what}")
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower():
        raise CorruptFile(f"server returned HTML instead of a {what}")
    return head


def check_gzip(path: Path, max_bytes: int | None = None) -> int:
    """Decompress a whole gzip file (CRC and length checked); return the decompressed size.

    Raises
    ------
    CorruptFile
        Not gzip, truncated or corrupt. TooLarge when it decompresses to more than ``max_bytes``.
    """
    head = _sniff(path, "NIfTI file")
    if head[:2] != b"\x1f\x8b":
        raise CorruptFile("not a gzip file (bad magic bytes)")
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if max_bytes is not None and n > max_bytes:
                    raise TooLarge(f"file decompresses to more than {max_bytes} bytes")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptFile(f"corrupt gzip ({type(e).__name__}: {str(e)[:80]})") from None
    return n


def check_nifti(path: Path, raw_size: int | None = None) -> Any:
    """Load a NIfTI/Analyze header with nibabel and check the data fits in the file.

    Parameters
    ----------
    path : Path
        ``.nii``, ``.nii.gz`` or ``.hdr`` (with its ``.img``).
    raw_size : int, optional
        Uncompressed size of a single-file NIfTI, to check ``vox_offset + data`` fits.

    Returns
    -------
    nibabel image (data not loaded)
    """
    import nibabel as nib  # lazy: keep per-image imports lean
    import numpy as np

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except Exception as e:  # nibabel raises many types for garbage
        detail = str(e).replace(str(path), "file").replace(Path(path).name, "file")
        raise CorruptFile(f"not a NIfTI image ({type(e).__name__}: {detail[:80]})") from None
    if not shape or min(shape) <= 0:
        raise CorruptFile(f"not a NIfTI image (shape {shape})")
    if raw_size is not None and isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        need = int(img.header.get("vox_offset", 0)) + int(np.prod(shape)) * itemsize
        if raw_size < need:
            raise CorruptFile(f"NIfTI data shorter than its header declares ({raw_size} < {need} bytes)")
    return img


# ------------------------------------------------------------------------------------------------
# shared client logic
# ------------------------------------------------------------------------------------------------
class BaseClient:
    """Interface and logic shared by the HTTP and snapshot clients."""

    base: str  # API root, ends with "/"
    mode: str = "download_new"
    offline: bool = False
    max_file_bytes: int
    max_json_bytes: int
    max_pages: int = 100_000
    verify_attempts: int = 2
    log: logging.Logger = logger

    def __init__(self) -> None:
        self.last_listing: dict | None = None
        self.n_requests = 0

    # -- to implement ------------------------------------------------------------------------------
    def _fetch_json(self, url: str, params: Mapping[str, Any] | None) -> Any:
        raise NotImplementedError

    def _fetch_to(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        raise NotImplementedError

    def _allowed_netlocs(self) -> set[str]:
        raise NotImplementedError

    # -- JSON --------------------------------------------------------------------------------------
    def api_url(self, path: str) -> str:
        """Absolute URL of an API path (relative to the API root), with its trailing slash."""
        if (
            not isinstance(path, str)
            or "://" in path
            or path.startswith("/")
            or any(c in path for c in "?#\\")
        ):
            raise UnsafeInput(f"invalid API path: {str(path)[:80]!r}")
        if ".." in PurePosixPath(path).parts:
            raise UnsafeInput(f"invalid API path: {path[:80]!r}")
        if not path.endswith("/"):
            path += "/"
        return self.base + path

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> dict:
        """GET an API path (``"images/151/"``) and return the JSON object."""
        obj = self._fetch_json(self.api_url(path), params)
        if not isinstance(obj, dict):
            raise NotJSON(f"unexpected JSON reply (a {type(obj).__name__}, not an object)")
        return obj

    def get_json_url(self, url: str, params: Mapping[str, Any] | None = None) -> dict:
        """GET an absolute http(s) URL (e.g. Neurosynth) with the same retries and limits."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise UnsafeInput(f"not an http(s) URL: {url[:80]!r}")
        obj = self._fetch_json(canonical_url(url), params)
        if not isinstance(obj, dict):
            raise NotJSON(f"unexpected JSON reply (a {type(obj).__name__}, not an object)")
        return obj

    def image(self, image_id: int | str) -> dict:
        """Image record (``GET images/{id}/``); checks the record's id."""
        iid = check_image_id(image_id)
        rec = _checked_record(self.get_json(f"images/{iid}/"), "image", iid)
        if rec.get("id") != iid:
            raise UnsafeInput(f"server returned a record with id {str(rec.get('id'))[:20]!r} for image {iid}")
        return rec

    def collection(self, cid: int | str) -> dict:
        """Collection record (``GET collections/{cid}/``)."""
        c = check_image_id(cid)
        rec = _checked_record(self.get_json(f"collections/{c}/"), "collection", c)
        if rec.get("id") != c:
            raise UnsafeInput(
                f"server returned a record with id {str(rec.get('id'))[:20]!r} for collection {c}"
            )
        return rec

    def collection_images(
        self, cid: int | str, limit: int = MAX_LIMIT, log: logging.Logger | None = None
    ) -> Iterator[dict]:
        """Image records of a collection (all pages)."""
        return self.iter_results(f"collections/{check_image_id(cid)}/images/", limit=limit, log=log)

    # -- pagination ----------------------------------------------------------------------------------
    def _next_url(self, nxt: Any, current: str) -> str:
        """Validate and normalise a ``next`` link: same host and path, clean integer limit/offset."""
        if not isinstance(nxt, str):
            raise UnsafeInput("pagination link is not a string")
        nxt = canonical_url(nxt)
        p, c = urlsplit(nxt), urlsplit(current)
        if p.scheme not in ("http", "https") or p.netloc.lower() not in self._allowed_netlocs() | {
            c.netloc.lower()
        }:
            raise UnsafeInput(f"pagination link to another host: {nxt[:100]!r}")
        if p.path.rstrip("/") != c.path.rstrip("/"):
            raise UnsafeInput(f"pagination link to another path: {nxt[:100]!r}")
        q = []
        for k, v in parse_qsl(p.query, keep_blank_values=True):
            if k in ("limit", "offset"):
                m = re.match(r"\d+", v)
                v = m.group(0) if m else "0"  # e.g. "20/" (junk after the query, NeuroVault #547) -> "20"
            q.append((k, v))
        path = p.path if p.path.endswith("/") else p.path + "/"
        return urlunsplit(
            (c.scheme if p.netloc.lower() == c.netloc.lower() else p.scheme, p.netloc, path, urlencode(q), "")
        )

    def iter_results(
        self,
        path: str,
        limit: int = MAX_LIMIT,
        log: logging.Logger | None = None,
        params: Mapping[str, Any] | None = None,
        max_pages: int | None = None,
        strict: bool = False,
    ) -> Iterator[dict]:
        """Yield the records of a paginated listing.

        Follows ``next`` (checked to stay on the same host and path) until it is null, de-duplicates
        by ``id``; a ``count`` below the records collected is logged as a warning (the listing is
        followed to its end, never cut at ``count``). An empty page before ``count`` is
        re-requested once, then the listing stops with a warning (no endless loop). A repeated
        ``next`` link or more than ``max_pages`` pages also stop it. Progress goes to ``log``.
        The summary (count, collected, pages, duplicates, complete) is in ``self.last_listing``.

        Parameters
        ----------
        path : str
            API path of the listing (``"collections/1425/images/"``).
        limit : int
            Page size asked for (capped at 1000, the server's maximum).
        log : callable or logging.Logger, optional
            Receives progress lines (default: the ``nvmeta.client`` logger).
        params : mapping, optional
            Extra query parameters for the first page.
        max_pages : int, optional
            Bound on pages fetched (default ``self.max_pages``).
        strict : bool
            Raise :class:`NeuroVaultError` instead of warning when the listing ends incomplete.
        """
        log = log or self.log
        limit = max(1, min(int(limit), MAX_LIMIT))
        max_pages = max_pages or self.max_pages
        url = self.api_url(path)
        query: dict[str, Any] | None = {**dict(params or {}), "limit": limit, "offset": 0}
        seen: set = set()
        visited: set[str] = set()
        count: int | None = None
        pages = dups = 0
        retried_empty = False
        stop_reason = None
        while True:
            if pages >= max_pages:
                stop_reason = f"stopped after {pages} pages (max_pages)"
                break
            page = self._fetch_json(url, query)
            pages += 1
            if not (isinstance(page, dict) and isinstance(page.get("results"), list)):
                raise NotJSON(f"unexpected listing page from {path} (no 'results' list)")
            c = page.get("count")
            if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
                count = c
            results = page["results"]
            if not results and (count is None or len(seen) < count):
                if not retried_empty and count:
                    retried_empty = True
                    log.warning(f"{path}: empty page at {len(seen)}/{count}; asking again")
                    continue
                stop_reason = f"empty page at {len(seen)}/{count}" if count else None
                break
            retried_empty = False
            for rec in results:
                key = rec.get("id", json.dumps(rec, sort_keys=True)) if isinstance(rec, dict) else repr(rec)
                if key in seen:
                    dups += 1
                    continue
                seen.add(key)
                yield rec
            log.info(f"{path}: page {pages}, {len(results)} records, {len(seen)}/{count} collected")
            # ``next`` is followed to its end even past ``count``: a count that under-reports the
            # items (seen on real listings) must not truncate the listing silently.
            nxt = page.get("next")
            if not nxt:
                break
            visited.add(_page_key(url, query))
            url, query = self._next_url(nxt, url), None
            if _page_key(url, None) in visited:
                stop_reason = "pagination link repeats a page already fetched"
                break
        complete = count is None or len(seen) >= count
        if count is not None and len(seen) > count:
            log.warning(
                f"{path}: the listing's count ({count}) under-reports its items: {len(seen)} records "
                "collected by following its next links to the end"
            )
        self.last_listing = {
            "path": path,
            "count": count,
            "collected": len(seen),
            "pages": pages,
            "duplicates": dups,
            "complete": complete,
            "stop_reason": stop_reason,
        }
        if dups:
            log.warning(f"{path}: {dups} duplicate records across pages ignored")
        if not complete or stop_reason:
            msg = f"{path}: listing incomplete: {len(seen)} of {count} records" + (
                f" ({stop_reason})" if stop_reason else ""
            )
            if strict:
                raise NeuroVaultError(msg)
            log.warning(msg)

    # -- files ---------------------------------------------------------------------------------------
    def check_file_url(self, url: Any) -> str:
        """Return the canonical form of a record's ``file`` URL, or raise :class:`UnsafeInput`.

        Must be an absolute http(s) URL on the configured host (``http://neurovault.org`` becomes
        https; hosts the API redirected to are accepted), without credentials, control characters,
        backslashes or ``.``/``..`` path segments (also percent-encoded).
        """
        if not isinstance(url, str) or not url:
            raise UnsafeInput("record has no file URL")
        if any(ord(ch) < 32 or ch == "\\" for ch in url):
            raise UnsafeInput(f"unsafe file URL (control characters): {url[:80]!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UnsafeInput(f"unsafe file URL (not http/https): {url[:80]!r}")
        if parts.username or parts.password:
            raise UnsafeInput(f"unsafe file URL (credentials): {url[:80]!r}")
        url = canonical_url(url)
        parts = urlsplit(url)
        if parts.netloc.lower() not in self._allowed_netlocs():
            raise UnsafeInput(f"file URL on a foreign host: {parts.netloc[:60]!r}")
        segments = unquote(parts.path).split("/")
        if any(s in ("..", ".") for s in segments) or "\x00" in unquote(parts.path):
            raise UnsafeInput(f"unsafe file URL (path traversal): {url[:80]!r}")
        return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))

    def download(self, url: str, dest: str | os.PathLike, expected_size: int | None = None) -> dict:
        """Fetch a map, verify it and store it at ``dest`` (``.nii.gz``) atomically.

        ``.nii.gz`` sources are stored byte-identical to the served bytes. ``.nii`` sources are
        gzip-compressed as they are (decompressing gives back the served bytes). Analyze ``.hdr``
        sources get their sibling ``.img`` fetched too and are converted with nibabel.
        Verification: declared length, full gzip decompression (CRC), nibabel header load, data size
        against the header. A file failing verification is fetched once more unless the second copy
        has the same md5 (then the file itself is bad).

        Returns
        -------
        dict
            ``md5`` (of the served bytes; for an Analyze pair of .hdr then .img), ``bytes`` (served),
            ``map_md5`` (of the stored file), ``source_url``, ``source_format``, ``path``.

        Raises
        ------
        NeuroVaultError
            Subclass naming the reason; nothing is left at ``dest`` or next to it.
        """
        url = self.check_file_url(url)
        fmt = source_format(url)
        if fmt == "analyze" and urlsplit(url).path.lower().endswith(".img"):
            url = _sibling(url, ".hdr")
        if isinstance(expected_size, int) and expected_size > self.max_file_bytes:
            raise TooLarge(
                f"file too large: {expected_size} bytes (file_size) > max_file_bytes {self.max_file_bytes}"
            )
        if self.offline:
            raise OfflineError(f"offline mode: not downloading {url}")
        dest = Path(dest)
        with atomic_path(dest, suffix=".nii.gz") as tmp:
            if fmt == "nii.gz":
                md5, nbytes = self._fetch_checked(url, tmp, expected_size, self._verify_niigz)
            else:
                workdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
                try:
                    if fmt == "nii":
                        raw = workdir / "source.nii"
                        md5, nbytes = self._fetch_checked(url, raw, expected_size, self._verify_nii)
                        with (
                            open(raw, "rb") as src,
                            open(tmp, "wb") as fo,
                            gzip.GzipFile(filename="", mode="wb", fileobj=fo, mtime=0) as gz,
                        ):
                            shutil.copyfileobj(src, gz, 1 << 20)
                    else:
                        hdr, img = workdir / "source.hdr", workdir / "source.img"
                        _, n1 = self._fetch_checked(url, hdr, None, lambda p: _sniff(p, "Analyze header"))
                        img_url = _sibling(url, ".img")
                        _, n2 = self._fetch_checked(img_url, img, None, lambda p: None)
                        md5, nbytes = _md5_files(hdr, img), n1 + n2
                        _convert_analyze(hdr, tmp)
                    check_nifti(tmp)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
            map_md5 = md5 if fmt == "nii.gz" else file_md5(tmp)
        return {
            "md5": md5,
            "bytes": nbytes,
            "map_md5": map_md5,
            "source_url": url,
            "source_format": fmt,
            "path": str(dest),
        }

    def _verify_niigz(self, path: Path) -> None:
        raw = check_gzip(path, MAX_DECOMPRESSION_RATIO * self.max_file_bytes)
        check_nifti(path, raw)

    def _verify_nii(self, path: Path) -> None:
        head = _sniff(path, "NIfTI file")
        if head[:2] == b"\x1f\x8b":
            raise CorruptFile("a .nii file that is gzip-compressed")
        check_nifti(path, path.stat().st_size)

    def _fetch_checked(
        self, url: str, path: Path, expected_size: int | None, check: Callable[[Path], Any]
    ) -> tuple[str, int]:
        previous = None
        for attempt in range(1, self.verify_attempts + 1):
            md5, n = self._fetch_to(url, path, expected_size)
            try:
                check(path)
                return md5, n
            except CorruptFile as e:
                if md5 == previous or attempt == self.verify_attempts:
                    raise
                self.log.warning(f"{url}: {e}; fetching it once more")
                previous = md5
        raise AssertionError("unreachable")


def _convert_analyze(hdr: Path, out: Path) -> None:
    """Analyze/NIfTI pair (.hdr + .img) -> single-file .nii.gz with nibabel (scaling applied)."""
    import nibabel as nib

    img = check_nifti(hdr)
    nii = nib.Nifti1Image.from_image(img)
    nib.save(nii, str(out))


# ------------------------------------------------------------------------------------------------
# HTTP client
# ------------------------------------------------------------------------------------------------
class HTTPClient(BaseClient):
    """Client of the real API (or the fixture server) on a ``requests.Session``.

    Parameters
    ----------
    url : str
        API root (``https://neurovault.org/api/``).
    timeout : float or (float, float)
        Connect and read timeouts in seconds.
    retries : int
        urllib3 ``Retry(total=retries)``: connection errors, read timeouts, 429/500/502/503/504
        (``Retry-After`` honoured, capped at :data:`RETRY_AFTER_MAX` s).
    backoff : float
        urllib3 ``backoff_factor``; also the base of the body re-attempt pause.
    max_connections : int
        Connections kept and used at once by this process (pool blocks beyond it).
    max_file_bytes, max_json_bytes : int
        Size bounds.
    user_agent : str, optional
    offline : bool
        Refuse every network call (:class:`OfflineError`).
    download_attempts : int
        Attempts of a file whose body is cut short or reset (urllib3 does not retry those).
    log : callable or Logger, optional
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float | tuple[float, float],
        retries: int,
        backoff: float,
        max_connections: int,
        max_file_bytes: int,
        max_json_bytes: int,
        user_agent: str,
        download_attempts: int,
        mode: str = "download_new",
        offline: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        super().__init__()
        url = canonical_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"neurovault.url must be an http(s) URL or a snapshot directory, got {url!r}")
        self.base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
        self.timeout = (
            (float(timeout[0]), float(timeout[1]))
            if isinstance(timeout, list | tuple)
            else (float(timeout), float(timeout))
        )
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_file_bytes = int(max_file_bytes)
        self.max_json_bytes = int(max_json_bytes)
        self.offline = bool(offline) or mode == "offline"
        self.mode = mode
        self.download_attempts = max(1, int(download_attempts))
        self.log = log or logger
        self._netlocs = {parts.netloc.lower()}
        if (parts.hostname or "").lower() in NEUROVAULT_HOSTS:
            self._netlocs |= set(NEUROVAULT_HOSTS)
        retry_kw: dict[str, Any] = {
            "total": self.retries,
            "backoff_factor": self.backoff,
            "status_forcelist": (429, 500, 502, 503, 504),
            "allowed_methods": frozenset({"GET", "HEAD"}),
            "respect_retry_after_header": True,
            "raise_on_status": False,
        }
        if "retry_after_max" in inspect.signature(Retry).parameters:
            retry_kw["retry_after_max"] = RETRY_AFTER_MAX
        n = max(1, int(max_connections))
        adapter = HTTPAdapter(
            max_retries=Retry(**retry_kw), pool_connections=n, pool_maxsize=n, pool_block=True
        )
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.max_redirects = 10
        self.session.headers["User-Agent"] = user_agent
        self._requests = requests

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _allowed_netlocs(self) -> set[str]:
        return self._netlocs

    # -- one request (urllib3 retries inside) -------------------------------------------------------
    def _open(self, url: str, params: Mapping[str, Any] | None, accept: str) -> Any:
        if self.offline:
            raise OfflineError(f"offline mode: not fetching {url}", url)
        rq = self._requests.exceptions
        self.n_requests += 1
        try:
            r = self.session.get(
                url,
                params=params,
                timeout=self.timeout,
                stream=True,
                headers={
                    "Accept": accept,
                    "Accept-Encoding": "identity" if accept != "application/json" else "gzip, deflate",
                },
            )
        except rq.TooManyRedirects:
            raise ServerError(f"too many redirects (redirect loop?) for {_short(url)}", url) from None
        except rq.InvalidSchema:
            raise UnsafeInput(f"redirected to a non-http(s) URL from {_short(url)}", url) from None
        except rq.RetryError as e:
            raise ServerError(f"server error after {self.retries} retries ({_reason_of(e)})", url) from None
        except (rq.Timeout, rq.ConnectionError) as e:
            why = _reason_of(e)
            what = "timed out" if why == "timed out" else f"connection failed ({why})"
            raise ServerError(f"{what} after {self.retries} retries: {_short(url)}", url) from None
        except rq.RequestException as e:
            raise ServerError(f"request failed ({type(e).__name__})", url) from None
        if r.history and urlsplit(url).netloc.lower() in self._netlocs:
            final = urlsplit(r.url)
            if final.scheme in ("http", "https"):
                self._netlocs.add(final.netloc.lower())  # a host the configured one redirected to
        code = r.status_code
        if code == 200:
            return r
        r.close()
        if code == 404:
            raise NotFound(f"not found (HTTP 404): {_short(url)}", url)
        if code == 403:
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {_short(url)}", url)
        if code == 429 or code >= 500:
            raise ServerError(f"HTTP {code} after {self.retries} retries: {_short(url)}", url)
        raise NeuroVaultError(f"HTTP {code}: {_short(url)}", url)

    def _body_errors(self) -> tuple[type[BaseException], ...]:
        import urllib3

        rq = self._requests.exceptions
        return (
            rq.ChunkedEncodingError,
            rq.ConnectionError,
            rq.ContentDecodingError,
            rq.Timeout,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
        )

    def _fetch_json(self, url: str, params: Mapping[str, Any] | None) -> Any:
        # The request itself is retried by urllib3; a reply whose body is cut short after the headers
        # is not, so re-ask a bounded number of times.
        errors = self._body_errors()
        for attempt in range(1, self.download_attempts + 1):
            r = self._open(url, params, "application/json")
            try:
                with r:
                    ctype = r.headers.get("Content-Type", "")
                    declared = _int(r.headers.get("Content-Length"))
                    if declared is not None and declared > self.max_json_bytes:
                        raise TooLarge(
                            f"JSON reply too large: {declared} bytes > max_json_bytes {self.max_json_bytes}"
                        )
                    body = bytearray()
                    for chunk in r.iter_content(1 << 16):
                        body += chunk
                        if len(body) > self.max_json_bytes:
                            raise TooLarge(f"JSON reply too large: > max_json_bytes {self.max_json_bytes}")
                break
            except errors as e:
                if attempt == self.download_attempts:
                    raise ServerError(f"reply cut short {attempt} times ({_reason_of(e)})", url) from None
                self.log.warning(f"{_short(url)}: reply cut short ({_reason_of(e)}); asking again")
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
        head = bytes(body[:256]).lstrip().lower()
        if "html" in ctype.lower() or head.startswith((b"<!doctype", b"<html", b"<")):
            raise NotJSON("server returned HTML instead of JSON", url)
        try:
            # NaN/Infinity are not JSON: read them as null (NeuroVault itself sends null)
            return json.loads(bytes(body), parse_constant=lambda _c: None)
        except ValueError:
            raise NotJSON(f"invalid JSON reply from {_short(url)}", url) from None

    def _fetch_to(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        # urllib3's Retry covers the request up to the response headers (connection errors, timeouts,
        # 429/5xx). A body cut short or a connection reset mid-stream surfaces later, while reading,
        # and is not retried by it: re-attempt the whole file a bounded number of times.
        for attempt in range(1, self.download_attempts + 1):
            try:
                return self._stream_once(url, path, expected_size)
            except _Truncated as e:
                if attempt == self.download_attempts:
                    raise CorruptFile(f"download incomplete after {attempt} attempts ({e})", url) from None
                self.log.warning(f"{_short(url)}: {e}; downloading again")
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
        raise AssertionError("unreachable")

    def _stream_once(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        errors = self._body_errors()
        r = self._open(url, None, "*/*")
        with r:
            declared = _int(r.headers.get("Content-Length"))
            encoded = r.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            if declared is not None and not encoded and declared > self.max_file_bytes:
                raise TooLarge(
                    f"file too large: {declared} bytes declared > max_file_bytes {self.max_file_bytes}", url
                )
            h = hashlib.md5()
            n = 0
            with open(path, "wb") as f:
                try:
                    for chunk in r.iter_content(1 << 20):
                        n += len(chunk)
                        if n > self.max_file_bytes:
                            raise TooLarge(
                                f"file too large: more than max_file_bytes {self.max_file_bytes}", url
                            )
                        h.update(chunk)
                        f.write(chunk)
                except errors as e:
                    raise _Truncated(f"connection broken mid-body: {_reason_of(e)}") from None
        if declared is not None and not encoded and n != declared:
            raise _Truncated(f"received {n} of {declared} bytes")
        if declared is None and isinstance(expected_size, int) and 0 < n < expected_size:
            raise _Truncated(f"received {n} of {expected_size} bytes (file_size)")
        return h.hexdigest(), n


def _page_key(url: str, query: Mapping[str, Any] | None) -> str:
    p = urlsplit(url)
    q = sorted(parse_qsl(p.query, keep_blank_values=True) + [(k, str(v)) for k, v in (query or {}).items()])
    return urlunsplit(("", p.netloc.lower(), p.path, urlencode(q), ""))


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _short(url: str) -> str:
    p = urlsplit(url)
    return p.path + (f"?{p.query}" if p.query else "")


def _reason_of(e: BaseException) -> str:
    """Innermost cause of a requests/urllib3 exception, short."""
    seen = e
    for _ in range(6):
        nxt = getattr(seen, "reason", None) or (
            seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        )
        if not isinstance(nxt, BaseException):
            break
        seen = nxt
    name = type(seen).__name__
    text = f"{e!r} {seen!r}".lower()
    if "timeout" in name.lower() or "timed out" in text:
        return "timed out"
    if "reset" in text:
        return "connection reset"
    if "refused" in text:
        return "connection refused"
    if "incompleteread" in text or "incomplete read" in text:
        return "body cut short"
    if "remotedisconnected" in text or "without response" in text:
        return "connection closed without reply"
    return name


# ------------------------------------------------------------------------------------------------
# snapshot client
# ------------------------------------------------------------------------------------------------
class SnapshotClient(BaseClient):
    """The client interface over a snapshot directory (no network).

    Listings are paginated exactly like the server's (``next`` links on ``https://neurovault.org``,
    resolved locally). ``file`` URLs are ``https://neurovault.org/media/...`` and are read from
    ``root/media/``. Neurosynth URLs (``.../decode/?neurovault=<id>``) read ``root/neurosynth/``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        max_file_bytes: int,
        max_json_bytes: int,
        mode: str = "download_new",
        log: logging.Logger | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        self.snapshot = Snapshot(root)
        self.root = self.snapshot.root
        self.base = PUBLIC_BASE + "/api/"
        self.mode = mode
        self.max_file_bytes = int(max_file_bytes)
        self.max_json_bytes = int(max_json_bytes)
        self.verify_attempts = 1
        self.log = log or logger

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> SnapshotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _allowed_netlocs(self) -> set[str]:
        return set(NEUROVAULT_HOSTS)

    def _fetch_json(self, url: str, params: Mapping[str, Any] | None) -> Any:
        self.n_requests += 1
        p = urlsplit(canonical_url(url))
        query = dict(parse_qsl(p.query, keep_blank_values=True))
        query.update({k: str(v) for k, v in (params or {}).items()})
        if p.path.endswith("/decode/") and "neurovault" in query:
            iid = check_image_id(query["neurovault"])
            reply = self.snapshot.neurosynth(iid)
            if reply is None:
                raise NotFound(f"no Neurosynth words for image {iid} in the snapshot", url)
            return reply
        if p.netloc.lower() not in NEUROVAULT_HOSTS or not p.path.startswith("/api/"):
            raise NotFound(f"not in the snapshot: {url[:80]}", url)
        status, obj = api_get(self.snapshot, p.path[len("/api/") :], query, base=PUBLIC_BASE)
        if status == 404:
            raise NotFound(f"not found (HTTP 404): {_short(url)}", url)
        if status == 403:
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {_short(url)}", url)
        return obj

    def _fetch_to(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        self.n_requests += 1
        try:
            local = self.snapshot.media_path(url)
            cid = self.snapshot.media_collection(url)
        except UnsafePath as e:
            raise UnsafeInput(str(e), url) from None
        if self.snapshot.is_private(cid):
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {_short(url)}", url)
        if not local.is_file():
            raise NotFound(f"not found (HTTP 404): {_short(url)}", url)
        size = local.stat().st_size
        if size > self.max_file_bytes:
            raise TooLarge(f"file too large: {size} bytes > max_file_bytes {self.max_file_bytes}", url)
        h = hashlib.md5()
        with open(local, "rb") as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
        return h.hexdigest(), size


# ------------------------------------------------------------------------------------------------
_NV_KEYS = frozenset(
    ("url", "mode", "timeout", "retries", "backoff", "max_connections", "max_file_bytes", "max_json_bytes")
    + ("user_agent", "download_attempts")
)


@functools.lru_cache(maxsize=1)
def _nv_defaults() -> dict[str, Any]:
    from nvmeta.config import defaults

    return defaults("neurovault")


def make_client(nv_cfg: Mapping[str, Any], log: logging.Logger | None = None) -> HTTPClient | SnapshotClient:
    """Client for a ``config["neurovault"]`` block.

    After :func:`nvmeta.config.check_config` the block holds every key; a partial block (tests,
    notebooks) is completed from the schema's defaults (:func:`nvmeta.config.defaults`), the one
    place they live.

    ``url`` that is an existing directory -> :class:`SnapshotClient`; an http(s) URL ->
    :class:`HTTPClient` (refusing all network access when ``mode`` is ``offline``).

    Raises
    ------
    nvmeta.errors.ConfigError
        Unknown mode, or a url that is neither http(s) nor an existing directory.
    """
    cfg = nv_cfg if _NV_KEYS <= nv_cfg.keys() else {**_nv_defaults(), **nv_cfg}
    mode = cfg["mode"]
    if mode not in MODES:
        raise ConfigError(f"neurovault.mode must be one of {MODES}, got {mode!r}")
    url = str(cfg["url"])
    if urlsplit(url).scheme in ("http", "https"):
        return HTTPClient(
            url,
            timeout=cfg["timeout"],
            retries=cfg["retries"],
            backoff=cfg["backoff"],
            max_connections=cfg["max_connections"],
            max_file_bytes=cfg["max_file_bytes"],
            max_json_bytes=cfg["max_json_bytes"],
            user_agent=cfg["user_agent"],
            download_attempts=cfg["download_attempts"],
            mode=mode,
            log=log,
        )
    path = Path(url).expanduser()
    if "://" not in url and path.is_dir():
        return SnapshotClient(
            path,
            mode=mode,
            max_file_bytes=cfg["max_file_bytes"],
            max_json_bytes=cfg["max_json_bytes"],
            log=log,
        )
    raise ConfigError(
        f"neurovault.url must be an http(s) URL or an existing snapshot directory, got {url!r}"
        + (" (directory not found)" if "://" not in url else "")
    )
