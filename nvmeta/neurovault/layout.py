"""A local directory laid out like the NeuroVault API (a "snapshot"), read and written.

Layout of a snapshot root ``R`` (see README, "Snapshot layout"):

- ``R/api/images/{id}.json``: image record as ``GET /api/images/{id}/`` returns it
  (``file`` = ``https://neurovault.org/media/images/{cid}/{stored name}``).
- ``R/api/collections/{cid}.json``: collection record.
- ``R/media/images/{cid}/...``: the file bytes, at the path of the ``file`` URL after ``/media/``.
- ``R/neurosynth/{image_id}.json``: optional Neurosynth decode reply.
- ``R/private_collections.txt``: optional, one collection id per line, served as 403.

:func:`api_get` implements the API semantics over a snapshot (DRF limit/offset pagination, 404/403),
shared by the fixture HTTP server and the offline snapshot client so both behave the same.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from nvmeta.neurovault.verify import loads_record

PUBLIC_BASE = "https://neurovault.org"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class UnsafePath(ValueError):
    """A requested path would escape the snapshot root."""


class Snapshot:
    """Read-only view of a snapshot directory.

    Records are parsed once and cached (thread-safe); every accessor returns a deep copy.

    Parameters
    ----------
    root : path-like
        Snapshot root directory (must exist).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"snapshot directory not found: {self.root}")
        self._lock = threading.Lock()
        self._images: dict[int, dict] | None = None
        self._collections: dict[int, dict] | None = None
        self._private: set[int] | None = None
        self._by_collection: dict[Any, list[dict]] | None = None

    # -- loading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        with self._lock:
            if self._images is not None:
                return
            images = _read_dir(self.root / "api" / "images")
            collections = _read_dir(self.root / "api" / "collections")
            private: set[int] = set()
            ptxt = self.root / "private_collections.txt"
            if ptxt.exists():
                for line in ptxt.read_text().split():
                    private.add(int(line))
            self._collections, self._private, self._images = collections, private, images

    @property
    def _imgs(self) -> dict[int, dict]:
        self._load()
        assert self._images is not None
        return self._images

    @property
    def _cols(self) -> dict[int, dict]:
        self._load()
        assert self._collections is not None
        return self._collections

    # -- records ---------------------------------------------------------------------------------
    def image(self, image_id: int) -> dict:
        """Image record by id (deep copy). Raises KeyError when absent."""
        return copy.deepcopy(self._imgs[int(image_id)])

    def collection(self, cid: int) -> dict:
        """Collection record by id (deep copy). Raises KeyError when absent."""
        return copy.deepcopy(self._cols[int(cid)])

    def has_image(self, image_id: int) -> bool:
        """Whether an image record exists (public or private)."""
        return int(image_id) in self._imgs

    def has_collection(self, cid: int) -> bool:
        """Whether a collection record exists (public or private)."""
        return int(cid) in self._cols

    def is_private(self, cid: int | None) -> bool:
        """Whether collection ``cid`` is listed in ``private_collections.txt``."""
        self._load()
        assert self._private is not None
        return cid is not None and int(cid) in self._private

    def images(self, include_private: bool = False) -> list[dict]:
        """All image records sorted by id (public collections only unless ``include_private``)."""
        return copy.deepcopy(self._image_refs(include_private))

    def collections(self, include_private: bool = False) -> list[dict]:
        """All collection records sorted by id (public only unless ``include_private``)."""
        return copy.deepcopy(self._collection_refs(include_private))

    def collection_images(self, cid: int) -> list[dict]:
        """Image records of collection ``cid``, sorted by id (privacy is the caller's business)."""
        return copy.deepcopy(self._collection_image_refs(cid))

    # uncopied, for paginating without copying the whole listing on every page
    def _image_refs(self, include_private: bool = False) -> list[dict]:
        return [
            r
            for i, r in sorted(self._imgs.items())
            if include_private or not self.is_private(r.get("collection_id"))
        ]

    def _collection_refs(self, include_private: bool = False) -> list[dict]:
        return [r for c, r in sorted(self._cols.items()) if include_private or not self.is_private(c)]

    def _collection_image_refs(self, cid: int) -> list[dict]:
        # Indexed once: scanning (and sorting) every image per listed collection would make a terms
        # query over a snapshot O(images x collections).
        if self._by_collection is None:
            by_collection: dict[Any, list[dict]] = {}
            for _, r in sorted(self._imgs.items()):
                try:  # keyed by the raw value: a lookup by int(cid) matches what == int(cid) matched
                    by_collection.setdefault(r.get("collection_id"), []).append(r)
                except TypeError:
                    continue  # unhashable: equal to no int
            with self._lock:
                if self._by_collection is None:
                    self._by_collection = by_collection
        return list(self._by_collection.get(int(cid), []))

    def neurosynth(self, image_id: int) -> dict | None:
        """Neurosynth decode reply for an image, or None when absent."""
        p = self.root / "neurosynth" / f"{int(image_id)}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    # -- media -----------------------------------------------------------------------------------
    def media_path(self, url_path: str) -> Path:
        """Local path of a media file.

        Parameters
        ----------
        url_path : str
            A full ``file`` URL, a URL path (``/media/images/1/a.nii.gz``) or the part after
            ``/media/`` (``images/1/a.nii.gz``). Percent-escapes are decoded.

        Returns
        -------
        pathlib.Path
            Path under ``root/media`` (it may not exist).

        Raises
        ------
        UnsafePath
            When the path is absolute after ``/media/``, contains ``..``, NUL or backslashes, or
            otherwise resolves outside ``root/media``.
        """
        path = urlsplit(url_path).path if "://" in url_path else url_path
        path = unquote(path)
        if "\x00" in path or "\\" in path:
            raise UnsafePath(f"unsafe media path: {url_path!r}")
        if path.startswith("/media/"):
            path = path[len("/media/") :]
        elif path.startswith("/"):
            raise UnsafePath(f"not a media path: {url_path!r}")
        parts = PurePosixPath(path).parts
        if not parts or any(p in ("..", ".") for p in parts) or path.startswith("/"):
            raise UnsafePath(f"unsafe media path: {url_path!r}")
        media = self.root / "media"
        local = (media / Path(*parts)).resolve()
        if not local.is_relative_to(media.resolve()):
            raise UnsafePath(f"media path escapes the snapshot: {url_path!r}")
        return local

    def media_collection(self, url_path: str) -> int | None:
        """Collection id encoded in a media path ``images/{cid}/...`` (None if not numeric)."""
        local = self.media_path(url_path)
        rel = local.relative_to((self.root / "media").resolve()).parts
        if len(rel) >= 2 and rel[0] == "images" and rel[1].isdigit():
            return int(rel[1])
        return None


def _read_dir(d: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        if p.stem.isdigit():
            out[int(p.stem)] = loads_record(p.read_text())
    return out


# ------------------------------------------------------------------------------------------------
# API semantics over a snapshot
# ------------------------------------------------------------------------------------------------
def _positive_int(value: str | None, strict: bool, cutoff: int | None = None) -> int:
    # DRF rest_framework.pagination._positive_int
    ret = int(value)  # type: ignore[arg-type]
    if ret < 0 or (ret == 0 and strict):
        raise ValueError(value)
    if cutoff:
        return min(ret, cutoff)
    return ret


def _replace_query(url: str, **params: Any) -> str:
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query, keep_blank_values=True))
    for k, v in params.items():
        if v is None:
            q.pop(k, None)
        else:
            q[k] = str(v)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(sorted(q.items())), ""))


def paginate(items: list, query: Mapping[str, str], url: str, max_limit: int = MAX_LIMIT) -> dict:
    """DRF ``LimitOffsetPagination`` (default 100, max 1000) over ``items``.

    Parameters
    ----------
    items : list
        The full, ordered listing.
    query : mapping
        Query parameters of the request (``limit``, ``offset``; others are kept in the links).
    url : str
        Absolute URL of the request (used to build ``next``/``previous``).
    max_limit : int
        Page size cap (DRF ``max_limit``; NeuroVault's is 1000).

    Returns
    -------
    dict
        ``{"count", "next", "previous", "results"}``.
    """
    try:
        limit = _positive_int(query.get("limit"), strict=True, cutoff=max_limit)
    except (TypeError, ValueError):
        limit = min(DEFAULT_LIMIT, max_limit)
    try:
        offset = _positive_int(query.get("offset"), strict=False)
    except (TypeError, ValueError):
        offset = 0
    count = len(items)
    nxt = None if offset + limit >= count else _replace_query(url, limit=limit, offset=offset + limit)
    if offset <= 0:
        prev = None
    elif offset - limit <= 0:
        prev = _replace_query(url, limit=limit, offset=None)
    else:
        prev = _replace_query(url, limit=limit, offset=offset - limit)
    return {
        "count": count,
        "next": nxt,
        "previous": prev,
        "results": copy.deepcopy(items[offset : offset + limit]),
    }


NOT_FOUND = {"detail": "Not found."}
FORBIDDEN = {"detail": "You do not have permission to perform this action."}


def api_get(
    snap: Snapshot,
    path: str,
    query: Mapping[str, str] | None = None,
    base: str = PUBLIC_BASE,
    private_image_status: int = 404,
    max_limit: int = MAX_LIMIT,
) -> tuple[int, dict]:
    """Answer an API GET from a snapshot, as the real server would.

    Parameters
    ----------
    snap : Snapshot
    path : str
        Path relative to ``/api/``, with trailing slash (``"images/12/"``, ``"collections/"``).
    query : mapping, optional
        Query parameters.
    base : str
        Scheme and host used for the ``next``/``previous`` links (``https://neurovault.org``).
    private_image_status : int
        Status for an image of a private collection asked by its public id (404 on the real server).
    max_limit : int
        Page size cap of listings.

    Returns
    -------
    (int, dict)
        HTTP status and JSON body. Records are returned as stored (``https://neurovault.org`` links);
        the caller rewrites hosts if it serves them elsewhere.
    """
    query = dict(query or {})
    url = _replace_query(f"{base}/api/{path}" + ("?" + urlencode(query) if query else ""))
    parts = [p for p in path.split("/") if p]
    if not parts:
        return 200, {
            "collections": f"{base}/api/collections/",
            "images": f"{base}/api/images/",
        }
    try:
        if parts == ["images"]:
            return 200, paginate(snap._image_refs(), query, url, max_limit)
        if parts == ["collections"]:
            return 200, paginate(snap._collection_refs(), query, url, max_limit)
        if len(parts) == 2 and parts[0] == "images" and parts[1].isdigit():
            rec = snap.image(int(parts[1]))
            if snap.is_private(rec.get("collection_id")):
                return private_image_status, NOT_FOUND if private_image_status == 404 else FORBIDDEN
            return 200, rec
        if len(parts) in (2, 3) and parts[0] == "collections" and parts[1].isdigit():
            cid = int(parts[1])
            if not snap.has_collection(cid):
                return 404, NOT_FOUND
            if snap.is_private(cid):
                return 403, FORBIDDEN
            if len(parts) == 2:
                return 200, snap.collection(cid)
            if parts[2] == "images":
                return 200, paginate(snap._collection_image_refs(cid), query, url, max_limit)
    except KeyError:
        return 404, NOT_FOUND
    return 404, NOT_FOUND


# ------------------------------------------------------------------------------------------------
# writer (tests, benchmarks, demo building)
# ------------------------------------------------------------------------------------------------
def write_snapshot(
    root: str | os.PathLike,
    images: list[dict],
    collections: list[dict],
    files: Mapping[str, bytes | os.PathLike] | None = None,
    private: list[int] | tuple[int, ...] = (),
    neurosynth: Mapping[int, dict] | None = None,
) -> Path:
    """Write a snapshot directory.

    Parameters
    ----------
    root : path-like
        Snapshot root (created).
    images, collections : list of dict
        Records, written to ``api/images/{id}.json`` and ``api/collections/{id}.json``.
    files : mapping, optional
        ``relative path under root`` (e.g. ``"media/images/12/a.nii.gz"``) -> bytes, or a source
        path whose bytes are copied.
    private : sequence of int
        Collection ids written to ``private_collections.txt``.
    neurosynth : mapping, optional
        image id -> Neurosynth decode reply.

    Returns
    -------
    pathlib.Path
        The root.
    """
    root = Path(root)
    (root / "api" / "images").mkdir(parents=True, exist_ok=True)
    (root / "api" / "collections").mkdir(parents=True, exist_ok=True)
    for rec in images:
        _dump(root / "api" / "images" / f"{int(rec['id'])}.json", rec)
    for rec in collections:
        _dump(root / "api" / "collections" / f"{int(rec['id'])}.json", rec)
    for rel, content in (files or {}).items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise UnsafePath(f"file path must be relative to the snapshot root: {rel!r}")
        dest = root.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = content if isinstance(content, bytes | bytearray) else Path(content).read_bytes()
        dest.write_bytes(bytes(data))
    if private:
        (root / "private_collections.txt").write_text("".join(f"{int(c)}\n" for c in private))
    for iid, reply in (neurosynth or {}).items():
        _dump(root / "neurosynth" / f"{int(iid)}.json", reply)
    return root


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
