"""Offline mode: the already-downloaded results read as if they were the API.

With ``neurovault.mode: offline`` nothing may reach the network (nilearn's semantics: only what
is on disk). The query then runs against the records saved by earlier downloads
(``results/images/<id>/metadata.json``) and the cached collection records
(``results/collections/<cid>.json``), through the same client interface and the same filters.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from nvmeta.neurovault.layout import Snapshot


class CacheSnapshot(Snapshot):
    """A :class:`~nvmeta.neurovault.layout.Snapshot` over a results directory (records only, no files)."""

    def _load(self) -> None:
        with self._lock:
            if self._images is not None:
                return
            images: dict[int, dict] = {}
            for path in (self.root / "images").glob("*/metadata.json"):
                if not path.parent.name.isdigit():
                    continue
                record = json.loads(path.read_text())
                status = record.pop("nvmeta", {}) or {}
                if status.get("status") == "ok" or "file" in record:
                    images[int(path.parent.name)] = record
            collections: dict[int, dict] = {}
            for path in (self.root / "collections").glob("*.json"):
                if path.stem.isdigit():
                    collections[int(path.stem)] = json.loads(path.read_text())
            self._collections, self._private, self._images = collections, set(), images


def offline_client(results_dir: str | os.PathLike, nv_cfg: dict):
    """Client answering API reads from ``results_dir`` only (``neurovault.mode: offline``)."""
    from nvmeta.neurovault import SnapshotClient

    root = Path(results_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    client = SnapshotClient(
        root, mode="offline", max_file_bytes=nv_cfg["max_file_bytes"], max_json_bytes=nv_cfg["max_json_bytes"]
    )
    client.snapshot = CacheSnapshot(root)
    return client


def query_client(nv_cfg: dict, results_dir: str | os.PathLike, log=None, analysis_cfg: dict | None = None):
    """The source the query reads records from.

    ``neurovault.dump`` set: the database export (:class:`nvmeta.neurovault.dump.DumpSource`, no API
    request; the analysis' term fields are read too); offline mode with a server URL: the records of
    earlier downloads; otherwise ``make_client``.
    """
    from nvmeta.neurovault import make_client

    if nv_cfg.get("dump"):
        from nvmeta.neurovault.dump import DumpSource, dump_fields
        from nvmeta.neurovault.urls import media_base

        image_fields, collection_fields = dump_fields(analysis_cfg or {})
        return DumpSource(
            nv_cfg["dump"],
            media_base(nv_cfg["url"]),
            image_fields,
            collection_fields,
            log=log,
            max_field_bytes=nv_cfg["max_dump_field_bytes"],
        )
    if nv_cfg["mode"] == "offline" and nv_cfg["url"].startswith(("http://", "https://")):
        if analysis_cfg is not None and not (
            analysis_cfg.get("image_ids") or analysis_cfg.get("collection_ids")
        ):
            (log or logging.getLogger(__name__)).warning(
                "neurovault.mode is offline: the filters select among the images already downloaded "
                "to %s only, not among everything on %s",
                Path(results_dir) / "images",
                nv_cfg["url"],
            )
        return offline_client(results_dir, nv_cfg)
    return make_client(nv_cfg, log=log)
