"""Per-image download: ``results/images/{id}/metadata.json`` (+ ``map.nii.gz`` iff status ok).

An image that cannot be had (404, 403, corrupt after re-attempts, ``file_size`` 0, too large, unsafe
URL, not a NIfTI, offline and not on disk) gets ``nvmeta.status == "failed"`` with a specific reason,
and :func:`fetch_image` returns normally so the run goes on. Configuration and programming errors
raise. The map is written first and ``metadata.json`` last, both atomically, so a job killed at any
point leaves either nothing or a complete pair at the output paths; the temporaries a killed job left
next to them are removed by the next attempt (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nvmeta.io import write_json
from nvmeta.neurovault import (
    MODES,
    NeuroVaultError,
    TooLarge,
    UnsafeInput,
    check_image_id,
    check_nifti,
    file_md5,
)

logger = logging.getLogger("nvmeta.images.download")

OFFLINE_MISSING = "not on disk (offline mode)"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _nvmeta_block(**kw: Any) -> dict:
    block = {
        "status": "failed",
        "reason": None,
        "collection": None,
        "md5": None,
        "bytes": None,
        "source_url": None,
        "source_format": None,
        "fetched_at": _now(),
    }
    block.update(kw)
    return block


_TEMP_RE = r"\.{name}\.[A-Za-z0-9_]{{8}}\.part.*"


def remove_stale_temps(*dests: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories a killed job left next to its outputs.

    :func:`nvmeta.io.atomic_path` writes ``dest`` through ``.{name}.XXXXXXXX.part{suffix}`` next to it
    (and a download of a ``.nii``/Analyze source works in a ``.{name}.XXXXXXXX.part`` directory); a
    SIGKILL (batch system, out of memory) leaves them behind. Call this at the start of the job that
    owns ``dest`` (Snakemake runs one job per output at a time), never for files several jobs write.

    Parameters
    ----------
    *dests : path-like
        Output paths.

    Returns
    -------
    list of Path
        What was removed.
    """
    removed = []
    for dest in dests:
        dest = Path(dest)
        rx = re.compile(_TEMP_RE.format(name=re.escape(dest.name)))
        try:
            entries = list(os.scandir(dest.parent))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not rx.fullmatch(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def map_is_valid(map_path: Path, md5: str | None = None) -> bool:
    """Whether a stored map exists, matches ``md5`` (when given) and has a loadable NIfTI header."""
    if not map_path.is_file():
        return False
    if md5 is not None and file_md5(map_path) != md5:
        return False
    try:
        check_nifti(map_path)
    except NeuroVaultError:
        return False
    return True


def _kept_record(path: Path, iid: int) -> tuple[dict, dict] | None:
    """``(record, source)`` from the record file the query kept for image ``iid``, if valid."""
    kept = _read_json(path)
    if not isinstance(kept, dict):
        return None
    record, source = kept.get("record"), kept.get("source")
    if not (isinstance(record, dict) and isinstance(source, dict) and record.get("id") == iid):
        return None
    extra = {"missing": str(kept["missing"])} if kept.get("missing") else {}
    return record, {**source, "kept_by": "query", **extra}


def _collection(
    client: Any, cid: Any, cache_dir: Path | None, mode: str, fetch: bool = True
) -> tuple[dict | None, str | None]:
    """Collection record from the cache (``{cache_dir}/{cid}.json``) or the server (then cached).

    ``fetch=False`` (a selection from the dump): the cache only, in every mode."""
    if cid is None:
        return None, None
    try:
        cid = check_image_id(cid)
    except UnsafeInput as e:
        return None, f"invalid collection_id: {e}"
    cache = cache_dir / f"{cid}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file() and (mode != "overwrite" or not fetch):
        rec = _read_json(cache)
        if isinstance(rec, dict) and rec.get("id") == cid:
            return rec, None
    if not fetch:
        return None, "collection record not on disk (selection from the dump)"
    if mode == "offline":
        return None, "collection not on disk (offline mode)"
    try:
        rec = client.collection(cid)
    except NeuroVaultError as e:
        return None, str(e)
    if cache is not None:
        write_json(cache, rec)
    return rec, None


def fetch_image(
    client: Any,
    image_id: int | str,
    out_dir: str | os.PathLike,
    mode: str | None = None,
    collections_cache_dir: str | os.PathLike | None = None,
    *,
    collections_cache: str | os.PathLike | None = None,
    records_dir: str | os.PathLike | None = None,
    log: logging.Logger | None = None,
) -> dict:
    """Fetch one image's record and map into ``out_dir``.

    Writes ``out_dir/map.nii.gz`` (only when the map could be had and verified) and then
    ``out_dir/metadata.json``: the server's image record plus an ``"nvmeta"`` block
    ``{status, reason, collection, md5, bytes, source_url, source_format, fetched_at}`` (plus
    ``map_md5``: md5 of the stored map, ``record_source``: where the record came from (the query's
    listing or the dump, kept in ``results/records/{id}.json``, or ``images/{id}/`` of the API), and
    ``collection_error`` when the collection record could not be had). For an image whose record could not be fetched the record is ``{"id": image_id}``.

    Parameters
    ----------
    client : HTTPClient or SnapshotClient
        From :func:`nvmeta.neurovault.make_client`.
    image_id : int or str
        Positive integer (a Snakemake wildcard string is accepted).
    out_dir : path-like
        ``results/images/{image_id}``.
    mode : {"download_new", "overwrite", "offline"}, optional
        Defaults to ``client.mode``. ``download_new`` reuses a verified map already on disk (a
        ``.nii.gz`` source's map is reused even when metadata.json is missing); ``overwrite`` fetches
        again; ``offline`` uses only the disk (an image not there fails with "not on disk (offline mode)").
    collections_cache_dir : path-like, optional
        Directory of cached collection records ``{cid}.json`` (fetched once, written atomically);
        ``collections_cache`` is an alias.
    records_dir : path-like, optional
        Where the query kept the selected images' full records (``{id}.json``); default
        ``out_dir/../../records`` (``results/records``). A kept record is used instead of asking the
        API (except in ``overwrite`` mode), so the download costs one request, the file. A kept record
        that differs from the one in ``metadata.json`` (the query read a new dump, or the server's
        record changed) is written anew, with the map already on disk when its file is the same.
    log : logging.Logger, optional

    Returns
    -------
    dict
        The ``nvmeta`` block with ``image_id`` added.

    Raises
    ------
    UnsafeInput
        ``image_id`` is not a positive integer (a caller error).
    ValueError
        Unknown mode.
    """
    log = log or logger
    iid = check_image_id(image_id)
    mode = mode or getattr(client, "mode", "download_new")
    if mode not in MODES:
        raise ValueError(f"neurovault.mode must be one of {MODES}, got {mode!r}")
    cache_arg = collections_cache_dir if collections_cache_dir is not None else collections_cache
    cache_dir = Path(cache_arg) if cache_arg is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, map_path = out_dir / "metadata.json", out_dir / "map.nii.gz"
    for stale in remove_stale_temps(map_path, meta_path):
        log.info("image %s: removed %s left by an interrupted run", iid, stale.name)
    finish = _Finish(iid, out_dir, log)
    from_dump = getattr(client, "dump", None) is not None

    # The record the query kept from its listing or the dump (results/records/{id}.json): used instead
    # of asking the API (a download then costs one request, the file); mode overwrite asks again.
    records = Path(records_dir) if records_dir is not None else out_dir.parent.parent / "records"
    kept = _kept_record(records / f"{iid}.json", iid)
    if kept is not None and kept[1].get("missing"):  # the dump has no such public statistic map
        return finish({"id": iid}, _nvmeta_block(reason=f"image record: {kept[1]['missing']}"))

    def collection(rec: dict) -> tuple[dict | None, str | None]:
        return _collection(client, rec.get("collection_id"), cache_dir, mode, fetch=not from_dump)

    existing = finish.existing(mode)
    done = _reuse(existing, kept, finish, collection, mode) if existing is not None else None
    if done is not None:
        return done
    if mode == "offline":
        old = {k: v for k, v in existing.items() if k != "nvmeta"} if existing else {"id": iid}
        return finish(kept[0] if kept is not None else old, _nvmeta_block(reason=OFFLINE_MISSING))
    got = _record(client, iid, kept, mode, from_dump)
    if isinstance(got, str):
        return finish({"id": iid}, _nvmeta_block(reason=got))
    record, record_source = got
    return _fetch_map(client, record, record_source, finish, mode, existing is None, collection(record))


def _record(
    client: Any, iid: int, kept: tuple[dict, dict] | None, mode: str, from_dump: bool
) -> tuple[dict, dict] | str:
    """``(record, record_source)``: the kept one, else (not from the dump) the API's; or why none."""
    if kept is not None and (mode != "overwrite" or from_dump or kept[1].get("kind") == "dump"):
        return kept
    if from_dump:
        return "image record: not in the query's selection from the dump (no kept record; rerun the query)"
    try:
        record = client.image(iid)
    except NeuroVaultError as e:
        return f"image record: {e}"
    describe = getattr(client, "describe_source", None)
    return record, {**(describe() if callable(describe) else {"kind": "api"}), "request": f"images/{iid}/"}


class _Finish:
    """Writes an image's outputs: ``map.nii.gz`` exists iff the status is ok, ``metadata.json`` last.

    ``metadata.cache.json`` is a copy of the last good ``metadata.json``: Snakemake deletes a job's
    declared outputs before it reruns it (a forced rerun, a changed record), and what was downloaded
    must then come from disk, not the server, in offline and download_new modes.
    """

    def __init__(self, iid: int, out_dir: Path, log: logging.Logger) -> None:
        self.iid, self.log = iid, log
        self.meta_path, self.map_path = out_dir / "metadata.json", out_dir / "map.nii.gz"
        self.cache_path = out_dir / "metadata.cache.json"
        self.from_cache = False

    def __call__(self, record: dict, block: dict) -> dict:
        if block["status"] != "ok":
            for path in (self.map_path, self.cache_path):
                if path.exists():
                    path.unlink()
        record = {**record, "nvmeta": block}
        if block["status"] == "ok":
            write_json(self.cache_path, record)
        write_json(self.meta_path, record)  # last, atomically
        level = logging.INFO if block["status"] == "ok" else logging.WARNING
        reason = f" ({block['reason']})" if block["reason"] else ""
        self.log.log(level, "image %s: %s%s", self.iid, block["status"], reason)
        return {"image_id": self.iid, **block}

    def existing(self, mode: str) -> dict | None:
        """The image's last ``metadata.json`` (or its copy), None in overwrite mode or when unusable."""
        if mode == "overwrite":
            return None
        for path, cached in ((self.meta_path, False), (self.cache_path, True)):
            obj = _read_json(path)
            if isinstance(obj, dict) and isinstance(obj.get("nvmeta"), dict) and obj.get("id") == self.iid:
                self.from_cache = cached
                return obj
        return None


def _reuse(
    existing: dict, kept: tuple[dict, dict] | None, finish: _Finish, collection: Any, mode: str
) -> dict | None:
    """The outputs from what is on disk when they are still right (None: fetch as usual).

    A record that changed since the download (the query kept a new one, e.g. another
    ``number_of_subjects`` in a new dump) is written with the map already on disk when its file is
    the same, so that every consumer of ``metadata.json`` reads the new record.
    """
    iid, block = finish.iid, existing["nvmeta"]
    ok = block.get("status") == "ok" and map_is_valid(finish.map_path, block.get("map_md5"))
    old = {k: v for k, v in existing.items() if k != "nvmeta"}
    if kept is None or kept[0] == old:
        if ok:
            if finish.from_cache:
                write_json(finish.meta_path, existing)  # restored as it was: byte-identical output
            finish.log.info("image %s: already on disk, reused", iid)
            return {"image_id": iid, **block}
        if mode == "offline" and block.get("status") == "failed":
            return {"image_id": iid, **block}
        return None
    record, source = kept
    changed = sorted(k for k in old.keys() | record.keys() if old.get(k) != record.get(k))
    finish.log.info("image %s: record changed since the download (%s)", iid, ", ".join(changed))
    if not ok or record.get("file") != old.get("file"):
        return None  # the map is fetched again (offline: not on disk)
    col, col_error = collection(record)
    new = {k: v for k, v in block.items() if k != "collection_error"}
    new.update(collection=col, record_source=source, **({"collection_error": col_error} if col_error else {}))
    finish.log.info("image %s: map on disk reused with the new record", iid)
    return finish(record, new)


def _fetch_map(
    client: Any, record: dict, record_source: dict, finish: _Finish, mode: str, fresh: bool, collection: tuple
) -> dict:
    """Download ``record``'s file to ``map.nii.gz`` and write ``metadata.json`` (whatever the outcome)."""
    iid, map_path = finish.iid, finish.map_path
    collection, collection_error = collection
    extra = {"collection_error": collection_error} if collection_error else {}
    url = record.get("file")
    block = _nvmeta_block(
        collection=collection,
        source_url=url if isinstance(url, str) else None,
        record_source=record_source,
        **extra,
    )

    file_size = record.get("file_size")
    if file_size == 0:
        block["reason"] = "file_size is 0 (the server cannot read the file)"
        return finish(record, block)
    max_bytes = getattr(client, "max_file_bytes", None)
    if isinstance(file_size, int) and max_bytes is not None and file_size > max_bytes:
        block["reason"] = str(
            TooLarge(f"file too large: {file_size} bytes (file_size) > max_file_bytes {max_bytes}")
        )
        return finish(record, block)

    # download_new: a map left by a run killed before metadata.json was written is reused when it is
    # the served bytes themselves (.nii.gz source) and still verifies.
    if mode == "download_new" and fresh and map_path.is_file() and isinstance(url, str):
        try:
            url_ok = client.check_file_url(url)
            reuse = url_ok.lower().split("?")[0].endswith(".nii.gz") and map_is_valid(map_path)
        except NeuroVaultError:
            reuse = False
        if reuse:
            md5 = file_md5(map_path)
            block.update(
                status="ok",
                md5=md5,
                map_md5=md5,
                bytes=map_path.stat().st_size,
                source_url=url_ok,
                source_format="nii.gz",
            )
            finish.log.info("image %s: map already on disk, reused", iid)
            return finish(record, block)

    try:
        info = client.download(url, map_path, expected_size=file_size if isinstance(file_size, int) else None)
    except NeuroVaultError as e:
        block["reason"] = str(e)
        return finish(record, block)
    block.update(
        status="ok",
        md5=info["md5"],
        map_md5=info["map_md5"],
        bytes=info["bytes"],
        source_url=info["source_url"],
        source_format=info["source_format"],
    )
    return finish(record, block)
