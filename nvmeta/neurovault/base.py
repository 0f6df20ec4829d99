"""What every NeuroVault source shares: API paths, records by id, pagination, file download.

A *source* answers the API's reads (``get_json``, ``image``, ``collection``, ``iter_results``) and
fetches files (``download``). :class:`BaseClient` holds the logic; a source implements three hooks:
``_fetch_json(url, params)``, ``_fetch_to(url, path, expected_size)`` and ``_allowed_netlocs()``.
The query and the download ask a source for records and files without caring where they come from
(:mod:`~nvmeta.neurovault.http`, :mod:`~nvmeta.neurovault.snapshot`, :mod:`~nvmeta.neurovault.dump`).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from nvmeta.io import atomic_path
from nvmeta.neurovault.errors import (
    CorruptFile,
    NeuroVaultError,
    NotJSON,
    OfflineError,
    TooLarge,
    UnsafeInput,
)
from nvmeta.neurovault.ids import check_image_id, checked_record
from nvmeta.neurovault.retry import retry
from nvmeta.neurovault.urls import canonical_url, page_key, sibling, source_format
from nvmeta.neurovault.verify import (
    MAX_DECOMPRESSION_RATIO,
    check_gzip,
    check_nifti,
    convert_analyze,
    file_md5,
    md5_files,
    sniff,
)

logger = logging.getLogger("nvmeta.neurovault")

MAX_LIMIT = 1000
MODES = ("download_new", "overwrite", "offline")

__all__ = ["MAX_LIMIT", "MODES", "BaseClient"]


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
    #: set by :func:`nvmeta.neurovault.make_client` when ``neurovault.dump`` is set: records then come
    #: only from the records the query kept (results/records), never from the API
    dump: str | None = None

    def describe_source(self) -> dict[str, Any]:
        """Where this source's records come from (recorded with the selection)."""
        return {"kind": "api", "url": self.base}

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
        rec = checked_record(self.get_json(f"images/{iid}/"), "image", iid)
        if rec.get("id") != iid:
            raise UnsafeInput(f"server returned a record with id {str(rec.get('id'))[:20]!r} for image {iid}")
        return rec

    def collection(self, cid: int | str) -> dict:
        """Collection record (``GET collections/{cid}/``)."""
        c = check_image_id(cid)
        rec = checked_record(self.get_json(f"collections/{c}/"), "collection", c)
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
            Receives progress lines (default: the ``nvmeta.neurovault`` logger).
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
            visited.add(page_key(url, query))
            url, query = self._next_url(nxt, url), None
            if page_key(url, None) in visited:
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
            url = sibling(url, ".hdr")
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
                        _, n1 = self._fetch_checked(url, hdr, None, lambda p: sniff(p, "Analyze header"))
                        img_url = sibling(url, ".img")
                        _, n2 = self._fetch_checked(img_url, img, None, lambda p: None)
                        md5, nbytes = md5_files(hdr, img), n1 + n2
                        convert_analyze(hdr, tmp)
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
        head = sniff(path, "NIfTI file")
        if head[:2] == b"\x1f\x8b":
            raise CorruptFile("a .nii file that is gzip-compressed")
        check_nifti(path, path.stat().st_size)

    def _fetch_checked(
        self, url: str, path: Path, expected_size: int | None, check: Callable[[Path], Any]
    ) -> tuple[str, int]:
        state: dict[str, Any] = {"md5": None, "previous": None}

        def once(_attempt: int) -> tuple[str, int]:
            state["previous"] = state["md5"]
            md5, n = self._fetch_to(url, path, expected_size)
            state["md5"] = md5
            check(path)
            return md5, n

        # fetched once more unless the second copy has the same md5 (then the file itself is bad)
        return retry(
            once,
            attempts=self.verify_attempts,
            retry_on=CorruptFile,
            what=url,
            again="fetching it once more",
            log=self.log,
            stop=lambda _e: state["md5"] == state["previous"],
        )
