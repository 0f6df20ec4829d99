"""The snapshot source: a local directory laid out like the API (:mod:`nvmeta.neurovault.layout`), no network."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from nvmeta.neurovault.base import BaseClient, logger
from nvmeta.neurovault.errors import Forbidden, NotFound, TooLarge, UnsafeInput
from nvmeta.neurovault.ids import check_image_id
from nvmeta.neurovault.layout import PUBLIC_BASE, Snapshot, UnsafePath, api_get
from nvmeta.neurovault.urls import NEUROVAULT_HOSTS, canonical_url, short_url

__all__ = ["SnapshotClient"]


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

    def describe_source(self) -> dict[str, Any]:
        """The snapshot directory the records come from."""
        return {"kind": "snapshot", "path": str(self.root)}

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
            raise NotFound(f"not found (HTTP 404): {short_url(url)}", url)
        if status == 403:
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {short_url(url)}", url)
        return obj

    def _fetch_to(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        self.n_requests += 1
        try:
            local = self.snapshot.media_path(url)
            cid = self.snapshot.media_collection(url)
        except UnsafePath as e:
            raise UnsafeInput(str(e), url) from None
        if self.snapshot.is_private(cid):
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {short_url(url)}", url)
        if not local.is_file():
            raise NotFound(f"not found (HTTP 404): {short_url(url)}", url)
        size = local.stat().st_size
        if size > self.max_file_bytes:
            raise TooLarge(f"file too large: {size} bytes > max_file_bytes {self.max_file_bytes}", url)
        h = hashlib.md5()
        with open(local, "rb") as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
        return h.hexdigest(), size
