"""NeuroVault sources: where the query gets records and the download gets files.

``make_client(config["neurovault"])`` returns a source with one interface::

    client.get_json("images/151/")              # trailing slash always added
    client.iter_results("collections/1425/images/", limit=1000)
    client.image(151); client.collection(1425)
    client.get_json_url(url, params)            # absolute URL (Neurosynth)
    client.download(url, dest, expected_size)   # stream to temp, verify, atomic rename

Sources: :class:`~nvmeta.neurovault.http.HTTPClient` (the REST API),
:class:`~nvmeta.neurovault.snapshot.SnapshotClient` (a local directory laid out like the API).
Modules: :mod:`~nvmeta.neurovault.errors` (``str(exc)`` is a short reason for the QC table),
:mod:`~nvmeta.neurovault.ids` (ids validated once, C5), :mod:`~nvmeta.neurovault.urls` (URL
safety), :mod:`~nvmeta.neurovault.verify` (file checks and conversion),
:mod:`~nvmeta.neurovault.retry` (the one re-attempt loop), :mod:`~nvmeta.neurovault.base`
(pagination, records by id, download).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nvmeta.errors import ConfigError
from nvmeta.neurovault.base import MAX_LIMIT, MODES, BaseClient
from nvmeta.neurovault.errors import (
    CorruptFile,
    Forbidden,
    NeuroVaultError,
    NotFound,
    NotJSON,
    OfflineError,
    ServerError,
    TooLarge,
    UnsafeInput,
)
from nvmeta.neurovault.http import RETRY_AFTER_MAX, HTTPClient
from nvmeta.neurovault.ids import MAX_ID, check_image_id, normalize_record, record_id
from nvmeta.neurovault.snapshot import SnapshotClient
from nvmeta.neurovault.urls import NEUROVAULT_HOSTS, canonical_url, source_format
from nvmeta.neurovault.verify import MAX_DECOMPRESSION_RATIO, check_gzip, check_nifti, file_md5

__all__ = [
    "MAX_DECOMPRESSION_RATIO",
    "MAX_ID",
    "MAX_LIMIT",
    "MODES",
    "NEUROVAULT_HOSTS",
    "RETRY_AFTER_MAX",
    "BaseClient",
    "CorruptFile",
    "Forbidden",
    "HTTPClient",
    "NeuroVaultError",
    "NotFound",
    "NotJSON",
    "OfflineError",
    "ServerError",
    "SnapshotClient",
    "TooLarge",
    "UnsafeInput",
    "canonical_url",
    "check_gzip",
    "check_image_id",
    "check_nifti",
    "file_md5",
    "make_client",
    "normalize_record",
    "record_id",
    "source_format",
]


def make_client(nv_cfg: Mapping[str, Any], log: logging.Logger | None = None) -> HTTPClient | SnapshotClient:
    """Client for a ``config["neurovault"]`` block.

    ``nv_cfg`` is the validated block, holding every key (tests and notebooks build one as
    ``{**nvmeta.workflow.config.defaults("neurovault"), "url": ...}``).

    ``url`` that is an existing directory -> :class:`SnapshotClient`; an http(s) URL ->
    :class:`HTTPClient` (refusing all network access when ``mode`` is ``offline``). With
    ``neurovault.dump`` set the client only fetches files: the query selects from the dump
    (:class:`nvmeta.neurovault.dump.DumpSource`) and image records come from the selection.

    Raises
    ------
    nvmeta.errors.ConfigError
        Unknown mode, or a url that is neither http(s) nor an existing directory.
    """
    cfg = nv_cfg
    mode = cfg["mode"]
    if mode not in MODES:
        raise ConfigError(f"neurovault.mode must be one of {MODES}, got {mode!r}")
    url = str(cfg["url"])
    client = _make(cfg, mode, url, log)
    client.dump = cfg["dump"] or None
    return client


def _make(
    cfg: Mapping[str, Any], mode: str, url: str, log: logging.Logger | None
) -> HTTPClient | SnapshotClient:
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
