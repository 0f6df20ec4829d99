"""Select the NeuroVault images of an analysis (the query checkpoint).

Two modes, with the semantics of nilearn's ``fetch_neurovault_ids`` / ``fetch_neurovault``:

* **explicit** (``image_ids`` and/or ``collection_ids`` non-empty): every filter term is ignored
  (as in nilearn; a warning is logged when terms are given). The selection is the image ids in
  the given order, then, for each collection id in the given order, that collection's images
  sorted by image id; duplicates keep their first position. An explicit image whose record is
  404/403 is kept as a stub ``{"id": image_id}`` so that the per-image download records the
  failure (it shows up in the QC table instead of vanishing); a 404/403 collection is skipped
  with a warning (check that it is a collection id, not an image id, and that it is public).
* **terms** (no ids): page ``collections/``, keep the collections passing the collection filter,
  list each one's images (sorted by id) and keep those passing the image filter, all on the
  client (the server ignores image filters and probably collection ones). When the collection is
  pinned by a plain / ``eq`` / ``in`` term on ``collection_terms.id`` or
  ``image_terms.collection_id``, those collections are fetched directly instead of paging all
  collections (as nilearn does for an ``id`` term); the full filters are still applied.

``max_images``: an int >= 1 caps the selection (in both modes: explicit ids are truncated with
a warning); None means no limit. An analysis' null ``max_images`` is resolved before the query
(:func:`~nvmeta.select.spec.analysis_selection`): no limit in explicit mode, nilearn's default cap in
terms mode.

The selection config the query reads (:data:`~nvmeta.select.spec.SELECTION_KEYS`) comes from the
validated config: the query checks none of it again.

Record ids are validated once, here, where records enter, so that every later stage can trust them:
an integral float id (``5021.0``) becomes an int, any other id that is not a positive integer
excludes its record with a warning (:func:`nvmeta.neurovault.ids.record_id`). Images listed under a collection whose
``collection_id`` differs from that collection are skipped with a log line.

Every query accounts for itself (:class:`Funnel`, ``query_funnel.json``): records examined,
rejected per term, excluded and why. A term on a field that none of the examined records carry
fails the query (:class:`~nvmeta.errors.ConfigError`, naming the closest fields), and an analysis
that selects nothing fails with its funnel (:class:`EmptySelection`). :func:`query_job` also keeps
the selected records (``results/records/{id}.json``) so that downloads need only the files.

The source may be the API, a snapshot directory or a database dump
(:class:`nvmeta.neurovault.dump.DumpSource`): the query asks it for records the same way.

The parts live in their own modules, re-exported here: the config side (:mod:`.spec`, also the
query rule's params), the funnel (:mod:`.funnel`), listings and the selection being filled
(:mod:`.listing`), ``selection.tsv`` (:mod:`.selection`). None imports pandas or nilearn at import
time (the Snakefile imports them); they are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nvmeta.select.funnel import EmptySelection, Funnel, describe_funnel
from nvmeta.select.listing import (
    IncompleteListing,
    ListingPrefetch,
    Selection,
    collection_images,
    fetch_collections,
)
from nvmeta.select.selection import SELECTION_COLUMNS, read_selection_ids, write_selection
from nvmeta.select.spec import (
    QUERY_SPEC_VERSION,
    SELECTION_KEYS,
    analysis_query_spec,
    analysis_selection,
    is_explicit,
)

__all__ = [
    "QUERY_SPEC_VERSION",
    "SELECTION_COLUMNS",
    "SELECTION_KEYS",
    "EmptySelection",
    "Funnel",
    "IncompleteListing",
    "analysis_query_spec",
    "analysis_selection",
    "describe_funnel",
    "is_explicit",
    "query_job",
    "read_selection_ids",
    "failed_funnel_path",
    "query_rule",
    "run_query",
    "select",
    "write_selection",
]

_PROGRESS_EVERY = 500  # log a progress line every N collections scanned


def _missing_errors() -> tuple[type[BaseException], ...]:
    """The client's 404/403 exceptions (an item that cannot be had, not a failed run)."""
    from nvmeta.neurovault import Forbidden, NotFound

    return (NotFound, Forbidden)


def _record_errors() -> tuple[type[BaseException], ...]:
    """Errors that belong to one image record (kept as a stub whose download records the reason):
    404/403, a record that is too large or unsafe (e.g. its ``id`` is not the id asked for).
    Server-wide trouble (5xx after retries, timeouts, HTML instead of JSON) still fails the query,
    so that a transient outage does not leave stubs in a selection that later runs reuse."""
    from nvmeta.neurovault import TooLarge, UnsafeInput

    return (*_missing_errors(), TooLarge, UnsafeInput)


def _pinned_collection_ids(selection_cfg: Mapping[str, Any]) -> list[int] | None:
    """Collection ids fixed by a plain/eq/in term on collection ``id`` or image ``collection_id``."""
    from nvmeta.select.filters import parse_term

    candidates = [(selection_cfg["collection_terms"], "id"), (selection_cfg["image_terms"], "collection_id")]
    for terms, field in candidates:
        if field not in terms:
            continue
        op, args = parse_term(terms[field], field)
        if op == "eq":
            ids = list(args)
        elif op == "in":
            ids = list(args)
        else:
            continue
        if ids and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
            return list(dict.fromkeys(ids))
    return None


def _run_explicit(
    client: Any,
    selection_cfg: Mapping[str, Any],
    key_prefix: str,
    sel: Selection,
    log: logging.Logger,
    funnel: Funnel,
) -> None:
    from nvmeta.neurovault import UnsafeInput, normalize_record

    image_ids, collection_ids = selection_cfg["image_ids"], selection_cfg["collection_ids"]
    if selection_cfg["image_terms"] or selection_cfg["collection_terms"]:
        log.warning(
            "%s: explicit image_ids/collection_ids given, so image_terms and collection_terms are ignored "
            "(as in nilearn's fetch_neurovault_ids)",
            key_prefix,
        )
    log.info(
        "explicit selection: %d image id(s), %d collection id(s), max_images=%s",
        len(image_ids),
        len(collection_ids),
        sel.max_images,
    )
    record_errors = _record_errors()
    truncated = False  # something explicit was left out because of max_images
    prefetch = ListingPrefetch(client, image_ids, sel, log)
    for pos, image_id in enumerate(image_ids):
        if sel.full:
            truncated = image_id not in sel.seen
            break
        rec = prefetch.pop(image_id)
        if rec is not None:  # listed with its collection (already normalised and checked)
            funnel.counts["images_examined"] += 1
            funnel.counts["images_matched"] += 1
            sel.add(rec, None)
            continue
        try:
            rec = client.image(image_id)
        except Exception as exc:
            if not isinstance(exc, record_errors):
                raise
            log.warning(
                "image %s: %s; kept as a stub so that the download records the failure", image_id, exc
            )
            rec = {"id": image_id}
            sel.missing[image_id] = str(exc)
        if isinstance(rec, Mapping):
            try:
                rec = normalize_record(rec, "image")
            except UnsafeInput as exc:
                log.warning("image %s: %s; skipped", image_id, exc)
                funnel.exclude("invalid image id or collection_id")
                continue
        if not isinstance(rec, Mapping) or rec.get("id") != image_id:
            got = rec.get("id") if isinstance(rec, Mapping) else rec
            log.warning("image %s: server returned a record with id %r; skipped", image_id, got)
            funnel.exclude("record id differs from the id asked for")
            continue
        funnel.counts["images_examined"] += 1
        funnel.counts["images_matched"] += 1
        sel.add(rec, None)
        if image_id not in sel.missing:
            prefetch.after_record(rec, image_ids, pos)
    names: dict[int, str | None] = {}
    for col in fetch_collections(client, collection_ids, log, sel, _missing_errors()):
        if sel.full:  # (not reached: _fetch_collections stops first)
            break
        cid = col["id"]
        names[cid] = col.get("name")
        sel.collections[cid] = col
        funnel.counts["collections_examined"] += 1
        funnel.counts["collections_passed"] += 1
        images = collection_images(client, cid, log, funnel)
        funnel.counts["images_examined"] += len(images)
        funnel.counts["images_matched"] += len(images)
        added = 0
        for rec in images:
            if sel.full:
                truncated = truncated or any(r["id"] not in sel.seen for r in images)
                break
            added += sel.add(rec, col.get("name"))
        log.info(
            "collection %s (%s): %d image(s) listed, %d added; %d selected so far",
            cid,
            col.get("name"),
            len(images),
            added,
            len(sel.records),
        )
    # explicit images whose collection was fetched above get its name too
    for rec in sel.records:
        if rec.get("collection_name") is None and names.get(rec.get("collection_id")) is not None:
            rec["collection_name"] = names[rec["collection_id"]]
    if truncated or sel.collections_left_out:
        log.warning("max_images=%s reached: explicit selection truncated", sel.max_images)


def _run_terms(
    client: Any,
    selection_cfg: Mapping[str, Any],
    key_prefix: str,
    sel: Selection,
    log: logging.Logger,
    funnel: Funnel,
) -> None:
    from nvmeta.neurovault import UnsafeInput, record_id
    from nvmeta.select.filters import describe_terms

    log.info(
        "selection by terms (max_images=%s): %s", sel.max_images, describe_terms(selection_cfg, key_prefix)
    )
    pinned = _pinned_collection_ids(selection_cfg)
    if pinned is not None:
        log.info("collections pinned by an id term: %s (fetched directly)", pinned)
        collections: Iterable[Any] = fetch_collections(client, pinned, log, sel, _missing_errors())
    else:
        collections = client.iter_results("collections/", log=log)
    n_scanned = n_passed = n_listed = 0
    for col in collections:
        if sel.full:
            break
        n_scanned += 1
        if n_scanned % _PROGRESS_EVERY == 0:
            log.info(
                "progress: %d collections scanned, %d passed the collection filter, %d images listed, "
                "%d selected",
                n_scanned,
                n_passed,
                n_listed,
                len(sel.records),
            )
        raw_id = col.get("id") if isinstance(col, Mapping) else None
        try:
            cid = record_id(raw_id, "collection id")
        except UnsafeInput as exc:
            log.warning("collection listing: record with invalid id %r skipped (%s)", raw_id, exc)
            funnel.exclude("invalid collection id")
            continue
        col = {**col, "id": cid}
        if not funnel.collection(col):
            continue
        sel.collections[cid] = col
        n_passed += 1
        images = collection_images(client, cid, log, funnel)
        n_listed += len(images)
        matched = 0
        for rec in images:
            if sel.full:
                break
            if funnel.image(rec):
                matched += sel.add(rec, col.get("name"))
        log.info(
            "collection %s (%s): %d image(s) listed, %d matched; %d selected so far",
            cid,
            col.get("name"),
            len(images),
            matched,
            len(sel.records),
        )
    log.info(
        "done: %d collections scanned, %d passed the collection filter, %d images listed, %d selected%s",
        n_scanned,
        n_passed,
        n_listed,
        len(sel.records),
        f" (max_images={sel.max_images} reached)" if sel.full else "",
    )
    if sel.full:
        # a capped selection is a smaller analysis than the filters describe: say so loudly
        log.warning(
            "selection stopped at max_images=%d: more images may pass the filters; raise "
            "analyses.<name>.max_images to select them (nilearn's default cap is 100)",
            sel.max_images,
        )
    funnel.check_fields()


def select(
    client: Any,
    selection_cfg: Mapping[str, Any],
    log: logging.Logger,
    key_prefix: str = "analysis",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Select the images of one analysis and account for it.

    Parameters
    ----------
    client : object
        A NeuroVault source (``nvmeta.neurovault``) or anything with ``image(id)``,
        ``collection(cid)`` and ``iter_results(path, limit=..., log=None)``.
    selection_cfg : mapping
        What to select (:data:`~nvmeta.select.spec.SELECTION_KEYS`): an analysis'
        :func:`~nvmeta.select.spec.analysis_selection`, or the atlas'
        :func:`nvmeta.decode.atlas.selection_cfg`.
    log : logging.Logger
        Progress goes here (collections scanned, images listed/matched, skips).
    key_prefix : str
        Key path of the analysis (e.g. ``"analyses.pain"``) for messages.

    Returns
    -------
    (list of dict, dict)
        Image records in selection order (copies of the server's records with int ids; a
        ``collection_name`` key is added when the collection record was fetched), and the funnel
        (:meth:`Funnel.as_dict`).

    Raises
    ------
    ConfigError
        A term on a field no examined record carries.
    """
    sel = Selection(selection_cfg["max_images"], log)
    explicit = is_explicit(selection_cfg)
    funnel = Funnel(selection_cfg, key_prefix, "explicit" if explicit else "terms")
    if explicit:
        _run_explicit(client, selection_cfg, key_prefix, sel, log, funnel)
    else:
        _run_terms(client, selection_cfg, key_prefix, sel, log, funnel)
    log.info("%s: %d image(s) selected", key_prefix, len(sel.records))
    describe = getattr(client, "describe_source", None)
    funnel.source = describe() if callable(describe) else None
    counts = getattr(client, "source_counts", None)
    if callable(counts):  # what the source left out before any term, and values it kept as written
        funnel.by_source = counts()
    funnel.collection_records = sel.collections
    funnel.missing_records = sel.missing
    return sel.records, funnel.as_dict(len(sel.records), sel.max_images, sel.full)


def run_query(
    client: Any,
    selection_cfg: Mapping[str, Any],
    log: logging.Logger,
    key_prefix: str = "analysis",
) -> list[dict[str, Any]]:
    """The records :func:`select` selects (without the funnel)."""
    return select(client, selection_cfg, log, key_prefix)[0]


def query_job(
    client: Any,
    selection_cfg: Mapping[str, Any],
    selection_path: str | os.PathLike,
    funnel_path: str | os.PathLike,
    log: logging.Logger,
    key_prefix: str = "analysis",
    records_dir: str | os.PathLike | None = None,
    collections_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Rule ``query``: ``selection.tsv`` and ``query_funnel.json`` of one analysis.

    With ``records_dir`` (``results/records``), each selected image's full record is kept as
    ``{records_dir}/{id}.json`` (``{"record", "source"}``) and, with ``collections_dir``
    (``results/collections``), the records of the collections it was listed under as
    ``{cid}.json``: the per-image download then needs only the file (one request per map). A kept
    file is rewritten only when the record in it changed (not when only its source did): it is
    the download rule's input, so a changed record reruns that image's download and z-map, and an
    unchanged one reruns nothing.

    Raises
    ------
    EmptySelection
        No image selected; the message holds the funnel, which is kept at
        ``query_funnel.failed.json`` beside ``funnel_path`` (Snakemake removes a failed job's
        outputs). Nothing is written at ``selection_path``, so no later run reuses an empty selection.
    ConfigError
        As :func:`select`.
    """
    from pathlib import Path

    from nvmeta.io import write_json

    records, funnel = select(client, selection_cfg, log, key_prefix)
    collections = funnel.pop("_collections", {})
    missing = funnel.pop("_missing", {})
    failed = failed_funnel_path(funnel_path)
    if not records:
        write_json(failed, funnel)
        raise EmptySelection(
            f"{key_prefix}: the query selected no image. Funnel (kept in {failed}):\n"
            + describe_funnel(funnel)
            + "\n"
            + _empty_fix(funnel)
        )
    failed.unlink(missing_ok=True)
    write_json(funnel_path, funnel)
    source = funnel.get("source") or {"kind": "api"}
    if records_dir is not None:
        kept = 0
        for rec in records:
            path = Path(records_dir) / f"{rec['id']}.json"
            if "file" not in rec:
                # a stub: its download asks the API for the record again and records the failure;
                # from the dump there is nothing to ask, so the reason is kept for the download
                if source.get("kind") == "dump" and rec["id"] in missing:
                    payload = {"record": {"id": rec["id"]}, "source": source, "missing": missing[rec["id"]]}
                    _keep(path, payload, ("record", "missing"))
                else:  # a record kept earlier is no longer what the source serves
                    path.unlink(missing_ok=True)
                continue
            # as the source served it (``collection_name`` is the query's addition): the same bytes
            # whichever analysis selecting the image writes it
            api = {k: v for k, v in rec.items() if k != "collection_name"}
            kept += _keep(path, {"record": api, "source": source}, ("record", "missing"))
        log.info("kept the full records of the selected images for their downloads (%d new or changed)", kept)
    if collections_dir is not None:
        cids = {r.get("collection_id") for r in records} - {None}
        if source.get("kind") == "dump":  # free to look up: every collection record, for the downloads
            for cid in cids - set(collections):
                collections[cid] = client.collection(cid)
        for cid in sorted(cids & set(collections)):
            _keep(Path(collections_dir) / f"{cid}.json", collections[cid], None)
    write_selection(records, selection_path, source=source)
    return records


def failed_funnel_path(funnel_path: str | os.PathLike) -> Any:
    """Where the funnel of a query that selected nothing is kept (not an output of the rule)."""
    from pathlib import Path

    path = Path(funnel_path)
    return path.with_name(f"{path.stem}.failed.json")


def _empty_fix(funnel: Mapping[str, Any]) -> str:
    """The fix an empty selection calls for, from what its funnel says."""
    if funnel.get("selection_mode") == "terms" and not funnel["collections_examined"]:
        if funnel.get("excluded_by_source"):
            return (
                "Fix: the source left out every collection before any term (see above); with "
                "neurovault.dump, check that it is an unmodified export (its private column)."
            )
        return "Fix: the source lists no collection: check neurovault.url / neurovault.dump."
    return "Fix: loosen image_terms/collection_terms (or set default_terms: false), or check the ids."


def _keep(path: Any, payload: Mapping[str, Any], compare: tuple[str, ...] | None) -> bool:
    """Write ``payload`` at ``path`` unless the file already holds it (on the ``compare`` keys; None:
    all of it); return whether it was written. An unchanged file keeps its mtime and bytes."""
    import json

    from nvmeta.io import write_json

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    # as it reads back once written (tuples as lists, numpy scalars as numbers, as nvmeta.io writes them)
    new = json.loads(json.dumps(payload, default=lambda o: o.item() if hasattr(o, "item") else os.fspath(o)))
    if isinstance(old, dict):
        if compare is None and old == new:
            return False
        if compare is not None and all(old.get(k) == new.get(k) for k in compare):
            return False
    write_json(path, payload)
    return True


def query_rule(
    config: Mapping[str, Any],
    analysis: str | None,
    selection_path: str | os.PathLike,
    funnel_path: str | os.PathLike,
    log_path: str | os.PathLike,
    selection_cfg: Mapping[str, Any] | None = None,
    on_records: Callable[[list[dict], logging.Logger], None] | None = None,
) -> int:
    """Rules ``query`` and ``atlas_query``: select, and say once why when the query cannot.

    ``analysis`` names the analysis whose block selects (``selection_cfg`` None), or is None for the
    task atlas, whose ``selection_cfg`` is given; ``on_records`` then receives the selected records.

    An expected failure (nothing selected, a term no record carries, an unreadable dump, the
    server failing) is logged once, to the job's log only: Snakemake prints a failed job's log
    (``show-failed-logs`` in the default profile), so the message reaches the terminal once, without
    a traceback. Anything else (a bug) keeps its traceback in the log.

    Returns
    -------
    int
        The script's exit status: 0, or 1 after such a failure.
    """
    from pathlib import Path

    from nvmeta.errors import ConfigError
    from nvmeta.neurovault import NeuroVaultError
    from nvmeta.neurovault.cache import query_client
    from nvmeta.workflow.logs import job_logger

    log = job_logger("nvmeta.select.query", log_path)
    # results/analyses/{a}/selection.tsv, results/atlas/selection.tsv
    results = Path(selection_path).parents[1 if analysis is None else 2]
    if analysis is None:
        key_prefix = "atlas"
    else:
        selection_cfg, key_prefix = analysis_selection(config["analyses"][analysis]), f"analyses.{analysis}"
    try:
        # The dump when neurovault.dump is set; in offline mode with a server URL, the records of
        # earlier downloads; else the API (or a snapshot directory).
        client = query_client(config["neurovault"], results, log, selection_cfg)
        records = query_job(
            client,
            selection_cfg,
            selection_path,
            funnel_path,
            log,
            key_prefix=key_prefix,
            records_dir=results / "records",
            collections_dir=results / "collections",
        )
        if on_records is not None:
            on_records(records, log)
    except (EmptySelection, ConfigError, IncompleteListing, NeuroVaultError) as exc:
        root = logging.getLogger("nvmeta")
        for handler in list(root.handlers):
            if not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        log.error("%s", exc)
        return 1
    log.info("selected %d images", len(records))
    return 0
