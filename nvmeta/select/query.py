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
a warning); ``null`` or absent means the mode's default: 100 in terms mode (nilearn's default),
no limit in explicit mode; the string ``all`` means no limit in either mode.

Record ids are validated once, here, where records enter (contract C5): an integral float id
(``5021.0``) becomes an int, any other id that is not a positive integer excludes its record with
a warning (:func:`nvmeta.neurovault.ids.record_id`). Images listed under a collection whose
``collection_id`` differs from that collection are skipped with a log line.

Every query accounts for itself (:class:`Funnel`, ``query_funnel.json``): records examined,
rejected per term, excluded and why. A term on a field that none of the examined records carry
fails the query (:class:`~nvmeta.errors.ConfigError`, naming the closest fields), and an analysis
that selects nothing fails with its funnel (:class:`EmptySelection`). :func:`query_job` also keeps
the selected records (``results/records/{id}.json``) so that downloads need only the files.

The source may be the API, a snapshot directory or a database dump
(:class:`nvmeta.neurovault.dump.DumpSource`): the query asks it for records the same way.

This module imports neither pandas nor nilearn at import time (the Snakefile imports it to
build the query rule's params); they are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from nvmeta.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "QUERY_SPEC_VERSION",
    "SELECTION_COLUMNS",
    "analysis_query_spec",
    "is_explicit",
    "read_selection_ids",
    "resolve_max_images",
    "EmptySelection",
    "Funnel",
    "query_job",
    "run_query",
    "select",
    "validate_query",
    "write_selection",
]

#: Columns of ``selection.tsv``, in order (see README, "Outputs").
SELECTION_COLUMNS: tuple[str, ...] = (
    "image_id",
    "collection_id",
    "name",
    "map_type",
    "image_type",
    "analysis_level",
    "number_of_subjects",
    "statistic_parameters",
    "modality",
    "contrast_definition",
    "cognitive_paradigm_cogatlas",
    "cognitive_contrast_cogatlas",
    "description",
    "file",
    "file_size",
    "modify_date",
    "collection_name",
    "record_source",
)

#: nilearn's default ``max_images`` for filtered queries.
DEFAULT_MAX_IMAGES = 100

#: Bumped when the selection semantics change, so that existing selections are re-queried.
QUERY_SPEC_VERSION = 1

_PROGRESS_EVERY = 500  # log a progress line every N collections scanned
_FIELDS_SAMPLE = 1000  # the keys of this many first records name the known fields in messages


# ----------------------------------------------------------------------------- config helpers


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ids(analysis_cfg: Mapping[str, Any], key: str, key_prefix: str) -> list[int]:
    raw = analysis_cfg.get(key)
    if raw is None:
        return []
    if _is_pos_int(raw):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"{key_prefix}.{key}: must be a list of positive integer ids, got {raw!r}.")
    out: list[int] = []
    for i, value in enumerate(raw):
        if not _is_pos_int(value):
            raise ConfigError(
                f"{key_prefix}.{key}[{i}]: ids must be positive integers (e.g. `{key}: [151, 3041]`), "
                f"got {value!r}."
            )
        if value not in out:
            out.append(value)
    return out


def is_explicit(analysis_cfg: Mapping[str, Any], key_prefix: str = "analysis") -> bool:
    """True when the analysis names images or collections by id (filters are then ignored)."""
    return bool(
        _ids(analysis_cfg, "image_ids", key_prefix) or _ids(analysis_cfg, "collection_ids", key_prefix)
    )


def resolve_max_images(analysis_cfg: Mapping[str, Any], key_prefix: str = "analysis") -> int | None:
    """Effective ``max_images`` (None = no limit).

    Parameters
    ----------
    analysis_cfg : mapping
        One ``config["analyses"][name]`` block.
    key_prefix : str
        Its key path, for error messages.

    Returns
    -------
    int or None
        The int given; for ``null``/absent 100 in terms mode and None in explicit mode;
        None for ``"all"``.
    """
    value = analysis_cfg.get("max_images")
    if value is None:
        return None if is_explicit(analysis_cfg, key_prefix) else DEFAULT_MAX_IMAGES
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if not _is_pos_int(value):
        raise ConfigError(
            f"{key_prefix}.max_images: must be a positive integer, null (default: {DEFAULT_MAX_IMAGES} when "
            f"selecting by terms, no limit with explicit ids) or `all` (no limit), got {value!r}."
        )
    return value


def validate_query(analysis_cfg: Mapping[str, Any], key_prefix: str) -> None:
    """Check the query part of an analysis (ids, max_images, terms); raise ConfigError."""
    from nvmeta.select.filters import validate_terms

    _ids(analysis_cfg, "image_ids", key_prefix)
    _ids(analysis_cfg, "collection_ids", key_prefix)
    resolve_max_images(analysis_cfg, key_prefix)
    validate_terms(analysis_cfg, key_prefix)


def _canonical(value: Any) -> Any:
    """JSON-like canonical form: sorted mapping keys, dates as ISO strings, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


def analysis_query_spec(
    analysis_cfg: Mapping[str, Any],
    nv_url: str | os.PathLike,
    key_prefix: str = "analysis",
    dump: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The part of an analysis' config that determines its selection.

    Used as the query rule's ``params``: when it changes the selection is re-queried; changes
    elsewhere (``meta``, ``ica``, ``neurovault.mode``/``timeout``...) leave it alone. In explicit
    mode the terms do not affect the selection and are left out.

    Parameters
    ----------
    analysis_cfg : mapping
        One ``config["analyses"][name]`` block.
    nv_url : str or path-like
        ``config["neurovault"]["url"]``.
    key_prefix : str
        Key path of the analysis, for error messages.
    dump : str or path-like, optional
        ``config["neurovault"]["dump"]`` (selecting from another dump re-queries; left out of the
        spec when unset, so specs of API selections are unchanged).

    Returns
    -------
    dict
        Canonical (sorted keys, JSON-serialisable) dict.
    """
    url = os.fspath(nv_url)
    if re.match(r"https?://", url, re.IGNORECASE):
        url = url.rstrip("/") + "/"
    elif len(url) > 1:
        url = url.rstrip("/")
    explicit = is_explicit(analysis_cfg, key_prefix)
    spec: dict[str, Any] = {
        "version": QUERY_SPEC_VERSION,
        "url": url,
        "selection_mode": "explicit" if explicit else "terms",
        "max_images": resolve_max_images(analysis_cfg, key_prefix),
    }
    if dump:
        spec["dump"] = os.fspath(dump)
    if explicit:
        spec["image_ids"] = _ids(analysis_cfg, "image_ids", key_prefix)
        spec["collection_ids"] = _ids(analysis_cfg, "collection_ids", key_prefix)
    else:
        default_terms = analysis_cfg.get("default_terms", True)
        spec["default_terms"] = True if default_terms is None else default_terms
        spec["image_terms"] = analysis_cfg.get("image_terms") or {}
        spec["collection_terms"] = analysis_cfg.get("collection_terms") or {}
    return _canonical(spec)


# ----------------------------------------------------------------------------- querying


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


class IncompleteListing(Exception):
    """A collection's image listing ended short of its ``count`` even when asked again."""


def _pinned_collection_ids(analysis_cfg: Mapping[str, Any]) -> list[int] | None:
    """Collection ids fixed by a plain/eq/in term on collection ``id`` or image ``collection_id``."""
    from nvmeta.select.filters import parse_term

    candidates = [
        ((analysis_cfg.get("collection_terms") or {}), "id"),
        ((analysis_cfg.get("image_terms") or {}), "collection_id"),
    ]
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
        if ids and all(_is_pos_int(i) for i in ids):
            return list(dict.fromkeys(ids))
    return None


class Funnel:
    """What a query examined and why records were left out (``query_funnel.json``).

    Terms are applied one by one in the order of the effective terms (nilearn's defaults first,
    the user's in their place); a record is counted under the first term it fails, so the counts
    of a block add up to the records it rejected (a sequential funnel, like the QC funnel). The
    conjunction is the very filter :func:`nvmeta.select.filters.build_filters` builds.
    """

    def __init__(self, analysis_cfg: Mapping[str, Any], key_prefix: str, mode: str) -> None:
        self.analysis_cfg, self.key_prefix, self.mode = analysis_cfg, key_prefix, mode
        self.image_terms: dict[str, tuple[str, Any]] = {}
        self.collection_terms: dict[str, tuple[str, Any]] = {}
        if mode == "terms":
            from nvmeta.select.filters import term_filters

            self.image_terms, self.collection_terms = term_filters(analysis_cfg, key_prefix)
        self.counts: dict[str, int] = dict.fromkeys(
            ("collections_examined", "collections_passed", "images_examined", "images_matched"), 0
        )
        self.collections_rejected: dict[str, int] = dict.fromkeys(self.collection_terms, 0)
        self.images_rejected: dict[str, int] = dict.fromkeys(self.image_terms, 0)
        self.excluded: dict[str, int] = {}
        # fields of the examined records: every key of the first records (for suggestions), and
        # for each term field whether any record carried it (cheap: term fields only)
        self.image_fields: set[str] = set()
        self.collection_fields: set[str] = set()
        self._unseen = {
            "images": {f for f, _ in self.image_terms.values()},
            "collections": {f for f, _ in self.collection_terms.values()},
        }
        self.source: dict[str, Any] | None = None

    def exclude(self, reason: str) -> None:
        """Count a record left out for a reason other than a term (invalid id, wrong collection)."""
        self.excluded[reason] = self.excluded.get(reason, 0) + 1

    def _apply(self, rec: Mapping[str, Any], terms: dict, rejected: dict, fields: set, what: str) -> bool:
        n = self.counts[f"{what}_examined"] = self.counts[f"{what}_examined"] + 1
        if n <= _FIELDS_SAMPLE:
            fields.update(rec.keys())
        unseen = self._unseen[what]
        if unseen:
            unseen.difference_update([f for f in unseen if f in rec])
        for label, (_field, flt) in terms.items():
            if not flt(rec):
                rejected[label] += 1
                return False
        return True

    def collection(self, col: Mapping[str, Any]) -> bool:
        """Whether a collection record passes the collection terms (counted)."""
        ok = self._apply(
            col, self.collection_terms, self.collections_rejected, self.collection_fields, "collections"
        )
        self.counts["collections_passed"] += ok
        return ok

    def image(self, rec: Mapping[str, Any]) -> bool:
        """Whether an image record passes the image terms (counted)."""
        ok = self._apply(rec, self.image_terms, self.images_rejected, self.image_fields, "images")
        self.counts["images_matched"] += ok
        return ok

    def check_fields(self) -> None:
        """Fail when a term names a field that none of the examined records carry.

        Raises
        ------
        ConfigError
            Naming the term and the closest fields the records do carry (``difflib``).
        """
        import difflib

        from nvmeta.select.filters import absent_field_ok

        problems = []
        for block, terms, fields in (
            ("image_terms", self.image_terms, self.image_fields),
            ("collection_terms", self.collection_terms, self.collection_fields),
        ):
            if not fields:  # no record of this kind examined: nothing to say
                continue
            unseen = self._unseen["images" if block == "image_terms" else "collections"]
            for label, (field, _flt) in terms.items():
                if field not in unseen or absent_field_ok(self.analysis_cfg, block, field, self.key_prefix):
                    continue
                close = difflib.get_close_matches(field, sorted(fields), n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                problems.append(
                    f"{self.key_prefix}.{label.split(' ')[0]}: no examined record has a field {field!r} "
                    f"({self.counts[block.split('_')[0] + 's_examined']} {block.split('_')[0]} records "
                    f"examined), so this term selects nothing.{hint} (`{{null: true}}` is the way to ask "
                    "for records without a field.)"
                )
        if problems:
            raise ConfigError("; ".join(problems))

    def as_dict(self, n_selected: int, max_images: int | None, full: bool) -> dict[str, Any]:
        """The funnel as a JSON-serialisable dict (the listed collections' records under the
        private key ``_collections``, not written to the funnel file)."""
        return {
            "_collections": getattr(self, "collection_records", {}),
            "_missing": getattr(self, "missing_records", {}),
            "analysis": self.key_prefix,
            "selection_mode": self.mode,
            "source": self.source,
            **self.counts,
            "collections_rejected_by_term": self.collections_rejected,
            "images_rejected_by_term": self.images_rejected,
            "excluded": self.excluded,
            "selected": n_selected,
            "max_images": max_images,
            "max_images_reached": full,
        }


def describe_funnel(funnel: Mapping[str, Any]) -> str:
    """Multi-line human summary of a funnel dict (for error messages)."""
    lines = [
        f"  collections examined: {funnel['collections_examined']}, passed: {funnel['collections_passed']}",
        *(f"    rejected by {k}: {v}" for k, v in funnel["collections_rejected_by_term"].items() if v),
        f"  images examined: {funnel['images_examined']}, matched: {funnel['images_matched']}",
        *(f"    rejected by {k}: {v}" for k, v in funnel["images_rejected_by_term"].items() if v),
        *(f"  excluded ({k}): {v}" for k, v in funnel["excluded"].items()),
        f"  selected: {funnel['selected']}",
    ]
    return "\n".join(lines)


class EmptySelection(Exception):
    """An analysis selected no image (the message holds the query's funnel)."""


class _Selection:
    """Ordered, de-duplicated list of selected image records with a cap."""

    def __init__(self, max_images: int | None, log: logging.Logger) -> None:
        self.records: list[dict[str, Any]] = []
        self.seen: set[int] = set()
        self.max_images = max_images
        self.log = log
        self.collections: dict[int, dict[str, Any]] = {}  # records of the collections listed
        self.missing: dict[int, str] = {}  # explicit image id -> why its record could not be had
        self.collections_left_out = False  # collections not examined because the cap was reached

    @property
    def full(self) -> bool:
        return self.max_images is not None and len(self.records) >= self.max_images

    def add(self, record: Mapping[str, Any], collection_name: str | None) -> bool:
        """Add a record (copy); return False when it was a duplicate."""
        image_id = record["id"]
        if image_id in self.seen:
            self.log.debug("image %s: already selected, duplicate skipped", image_id)
            return False
        rec = dict(record)
        if collection_name is not None and rec.get("collection_name") is None:
            rec["collection_name"] = collection_name
        self.records.append(rec)
        self.seen.add(image_id)
        return True


def _list_collection_images(client: Any, cid: int, log: logging.Logger, quiet: bool = False) -> list[Any]:
    """Every record listed under ``collections/{cid}/images/``.

    The listing is ordered by id on the server, so fewer records than its ``count`` (a page that
    stays empty, an item lost to a duplicate) is a fault, not drift: the collection is listed once
    more, and if it is still incomplete :class:`IncompleteListing` is raised rather than writing a
    selection that silently lacks images (a selection is reused by later runs). ``quiet``: nothing
    is logged above DEBUG (the listing prefetch of explicit ids, which falls back on records).
    """
    path = f"collections/{cid}/images/"
    for attempt in (1, 2):
        records = list(client.iter_results(path, log=log))
        info = getattr(client, "last_listing", None)
        if not isinstance(info, dict) or info.get("path") != path or info.get("complete", True):
            return records
        msg = (
            f"collection {cid}: image listing incomplete: {info.get('collected')} of {info.get('count')} "
            f"records" + (f" ({info['stop_reason']})" if info.get("stop_reason") else "")
        )
        if attempt == 1:
            log.log(logging.DEBUG if quiet else logging.WARNING, "%s; listing it again", msg)
    msg = (
        f"{msg} after listing it twice; no selection written (a partial one would be reused by "
        "later runs). Rerun later."
    )
    if not quiet:
        log.error("%s", msg)
    raise IncompleteListing(msg)


def _collection_images(
    client: Any, cid: int, log: logging.Logger, funnel: Funnel | None = None, quiet: bool = False
) -> list[dict[str, Any]]:
    """All image records listed under collection ``cid``, ids validated (C5), sorted by id
    (``quiet``: skipped records logged at DEBUG, as :func:`_list_collection_images`)."""
    from nvmeta.neurovault import UnsafeInput, normalize_record

    warn = log.debug if quiet else log.warning
    good: list[dict[str, Any]] = []
    for raw in _list_collection_images(client, cid, log, quiet):
        try:
            rec = normalize_record(raw, "image")
        except UnsafeInput as exc:
            image_id = raw.get("id") if isinstance(raw, Mapping) else None
            warn("collection %s: listed image with invalid id %r skipped (%s)", cid, image_id, exc)
            if funnel is not None:
                funnel.exclude("invalid image id or collection_id")
            continue
        image_id, rec_cid = rec["id"], rec.get("collection_id")
        if rec_cid != cid:
            warn(
                "collection %s: image %s has collection_id %r (listed under %s); skipped",
                cid,
                image_id,
                rec_cid,
                cid,
            )
            if funnel is not None:
                funnel.exclude("collection_id differs from the collection it is listed under")
            continue
        good.append(rec)
    good.sort(key=lambda r: r["id"])
    return good


def _fetch_collections(
    client: Any, ids: Iterable[int], log: logging.Logger, sel: _Selection
) -> Iterator[dict[str, Any]]:
    missing = _missing_errors()
    for cid in ids:
        if sel.full:
            sel.collections_left_out = True
            return
        try:
            col = client.collection(cid)
        except Exception as exc:
            if not isinstance(exc, missing):
                raise
            log.warning(
                "collection %s: %s; skipped (is it a collection id rather than an image id? is it private?)",
                cid,
                exc,
            )
            continue
        if not isinstance(col, Mapping) or col.get("id") != cid:
            got = col.get("id") if isinstance(col, Mapping) else col
            log.warning("collection %s: server returned a record with id %r; skipped", cid, got)
            continue
        yield {**col, "id": cid}


class _ListingPrefetch:
    """Records of explicit image ids taken from their collection's listing (issue 12).

    The API serves an image's record either alone (``images/{id}/``) or in its collection's
    listing (``collections/{cid}/images/``, up to 1,000 records per page), and which collection
    an id belongs to is known only from its record. So, once an explicit image's record names its
    collection, the ids still to come that lie within 1,000 of it (NeuroVault numbers the images
    of an upload consecutively) are likely in the same collection: when there are more of them
    than the listing has pages, the collection is listed once and their records come from it.
    The collection record, asked for to count those pages, is kept for the downloads (which
    would ask for it otherwise). An id that the listing does not hold is asked for on its own,
    as before, so the selection is the same; only the requests differ: 200 ids from 18
    collections cost 18 records + 18 listings + 18 collection records instead of 200 records +
    18 collection records. Local sources (snapshot directory, dump) answer records for free and
    are not prefetched.
    """

    NEAR = 1000

    def __init__(self, client: Any, image_ids: list[int], sel: _Selection, log: logging.Logger) -> None:
        describe = getattr(client, "describe_source", None)
        kind = (describe() or {}).get("kind") if callable(describe) else None
        self.active = kind not in ("snapshot", "dump")
        self.client, self.sel, self.log = client, sel, log
        self.wanted = set(image_ids)
        self.records: dict[int, dict[str, Any]] = {}
        self.tried: set[int] = set()  # collections considered

    def pop(self, image_id: int) -> dict[str, Any] | None:
        return self.records.pop(image_id, None)

    def after_record(self, rec: Mapping[str, Any], image_ids: list[int], pos: int) -> None:
        """Consider listing the collection of ``rec`` for the ids after position ``pos``."""
        from nvmeta.neurovault.base import MAX_LIMIT

        cid = rec.get("collection_id")
        if not self.active or not isinstance(cid, int) or cid in self.tried or self.sel.full:
            return
        image_id = rec["id"]
        seen, pending = self.sel.seen, self.records
        near = [
            i
            for i in image_ids[pos + 1 :]
            if abs(i - image_id) <= self.NEAR and i not in seen and i not in pending
        ]
        if self.sel.max_images is not None:  # no more than the selection still has room for
            near = near[: max(0, self.sel.max_images - len(self.sel.records) - len(pending))]
        if len(near) < 2:  # a listing has at least one page: it cannot save anything
            return
        self.tried.add(cid)
        # (an optimisation: whatever fails here, the ids are asked for one by one as before)
        try:
            col = self.client.collection(cid)
        except Exception as exc:  # noqa: BLE001
            self.log.info(
                "collection %s: record not had (%s); its images' records are asked one by one", cid, exc
            )
            return  # the download asks again and records what it gets
        if not isinstance(col, Mapping) or col.get("id") != cid:
            return
        self.sel.collections.setdefault(cid, dict(col))
        n = col.get("number_of_images")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return
        pages = -(-n // MAX_LIMIT)
        if pages >= len(near):
            return
        try:
            listing = _collection_images(self.client, cid, self.log, quiet=True)
        except Exception as exc:  # noqa: BLE001
            self.log.info(
                "collection %s: listing failed (%s); its images' records are asked one by one", cid, exc
            )
            return
        got = 0
        for listed in listing:
            if listed["id"] in self.wanted and listed["id"] not in self.sel.seen:
                self.records.setdefault(listed["id"], listed)
                got += 1
        self.log.info(
            "image %s: collection %s listed (%d page(s)) for %d later explicit id(s) near it: %d record(s) "
            "taken from the listing",
            image_id,
            cid,
            pages,
            len(near),
            got,
        )


def _run_explicit(
    client: Any,
    analysis_cfg: Mapping[str, Any],
    key_prefix: str,
    sel: _Selection,
    log: logging.Logger,
    funnel: Funnel,
) -> None:
    from nvmeta.neurovault import UnsafeInput, normalize_record

    image_ids = _ids(analysis_cfg, "image_ids", key_prefix)
    collection_ids = _ids(analysis_cfg, "collection_ids", key_prefix)
    if analysis_cfg.get("image_terms") or analysis_cfg.get("collection_terms"):
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
    prefetch = _ListingPrefetch(client, image_ids, sel, log)
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
    for col in _fetch_collections(client, collection_ids, log, sel):
        if sel.full:  # (not reached: _fetch_collections stops first)
            break
        cid = col["id"]
        names[cid] = col.get("name")
        sel.collections[cid] = col
        funnel.counts["collections_examined"] += 1
        funnel.counts["collections_passed"] += 1
        images = _collection_images(client, cid, log, funnel)
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
    analysis_cfg: Mapping[str, Any],
    key_prefix: str,
    sel: _Selection,
    log: logging.Logger,
    funnel: Funnel,
) -> None:
    from nvmeta.neurovault import UnsafeInput, record_id
    from nvmeta.select.filters import describe_terms

    log.info(
        "selection by terms (max_images=%s): %s", sel.max_images, describe_terms(analysis_cfg, key_prefix)
    )
    pinned = _pinned_collection_ids(analysis_cfg)
    if pinned is not None:
        log.info("collections pinned by an id term: %s (fetched directly)", pinned)
        collections: Iterable[Any] = _fetch_collections(client, pinned, log, sel)
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
        images = _collection_images(client, cid, log, funnel)
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
    analysis_cfg: Mapping[str, Any],
    log: logging.Logger,
    key_prefix: str = "analysis",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Select the images of one analysis and account for it.

    Parameters
    ----------
    client : object
        A NeuroVault source (``nvmeta.neurovault``) or anything with ``image(id)``,
        ``collection(cid)`` and ``iter_results(path, limit=..., log=None)``.
    analysis_cfg : mapping
        One ``config["analyses"][name]`` block.
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
        Invalid ids, terms or ``max_images``; a term on a field no examined record carries.
    """
    validate_query(analysis_cfg, key_prefix)
    sel = _Selection(resolve_max_images(analysis_cfg, key_prefix), log)
    explicit = is_explicit(analysis_cfg, key_prefix)
    funnel = Funnel(analysis_cfg, key_prefix, "explicit" if explicit else "terms")
    if explicit:
        _run_explicit(client, analysis_cfg, key_prefix, sel, log, funnel)
    else:
        _run_terms(client, analysis_cfg, key_prefix, sel, log, funnel)
    log.info("%s: %d image(s) selected", key_prefix, len(sel.records))
    describe = getattr(client, "describe_source", None)
    funnel.source = describe() if callable(describe) else None
    funnel.collection_records = sel.collections
    funnel.missing_records = sel.missing
    return sel.records, funnel.as_dict(len(sel.records), sel.max_images, sel.full)


def run_query(
    client: Any,
    analysis_cfg: Mapping[str, Any],
    log: logging.Logger,
    key_prefix: str = "analysis",
) -> list[dict[str, Any]]:
    """The records :func:`select` selects (without the funnel)."""
    return select(client, analysis_cfg, log, key_prefix)[0]


def query_job(
    client: Any,
    analysis_cfg: Mapping[str, Any],
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
    ``{cid}.json``: the per-image download then needs only the file (one request per map).

    Raises
    ------
    EmptySelection
        No image selected; the message holds the funnel (nothing is written at
        ``selection_path``, so no later run reuses an empty selection).
    ConfigError
        As :func:`select`.
    """
    from pathlib import Path

    from nvmeta.io import write_json

    records, funnel = select(client, analysis_cfg, log, key_prefix)
    collections = funnel.pop("_collections", {})
    missing = funnel.pop("_missing", {})
    write_json(funnel_path, funnel)
    if not records:
        msg = (
            f"{key_prefix}: the query selected no image. Funnel ({funnel_path}):\n"
            + describe_funnel(funnel)
            + "\nFix: loosen image_terms/collection_terms (or set default_terms: false), or check the ids."
        )
        log.error("%s", msg)
        raise EmptySelection(msg)
    source = funnel.get("source") or {"kind": "api"}
    if records_dir is not None:
        kept = 0
        for rec in records:
            if "file" not in rec:
                # a stub: its download asks the API for the record again and records the failure;
                # from the dump there is nothing to ask, so the reason is kept for the download
                if source.get("kind") == "dump" and rec["id"] in missing:
                    write_json(
                        Path(records_dir) / f"{rec['id']}.json",
                        {"record": {"id": rec["id"]}, "source": source, "missing": missing[rec["id"]]},
                    )
                continue
            # as the source served it (``collection_name`` is the query's addition): the same bytes
            # whichever analysis selecting the image writes it
            api = {k: v for k, v in rec.items() if k != "collection_name"}
            write_json(Path(records_dir) / f"{rec['id']}.json", {"record": api, "source": source})
            kept += 1
        log.info("kept the full records of %d selected image(s) for their downloads", kept)
    if collections_dir is not None:
        cids = {r.get("collection_id") for r in records} - {None}
        if source.get("kind") == "dump":  # free to look up: every collection record, for the downloads
            for cid in cids - set(collections):
                collections[cid] = client.collection(cid)
        for cid in sorted(cids & set(collections)):
            write_json(Path(collections_dir) / f"{cid}.json", collections[cid])
    write_selection(records, selection_path, source=source)
    return records


# ----------------------------------------------------------------------------- selection.tsv

_WS = re.compile(r"[\t\r\n]+")


def _cell(value: Any) -> Any:
    """One TSV cell: None stays missing; tabs/newlines become spaces (one line per image)."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str):
        return _WS.sub(" ", value)
    return value


def source_label(source: Mapping[str, Any] | None) -> str | None:
    """The ``record_source`` cell: ``api <url>``, ``snapshot <path>`` or
    ``dump <path> bytes=<n> sha256=<hex>``."""
    if not source:
        return None
    kind = source.get("kind", "api")
    if kind == "dump":
        return f"dump {source.get('path')} bytes={source.get('bytes')} sha256={source.get('sha256')}"
    where = source.get("url") or source.get("path")
    return f"{kind} {where}" if where else str(kind)


def selection_rows(
    records: Iterable[Mapping[str, Any]], source: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Rows of ``selection.tsv`` (dicts keyed by :data:`SELECTION_COLUMNS`)."""
    from nvmeta.neurovault import record_id

    label = source_label(source)
    rows = []
    for rec in records:
        row = {col: _cell(rec.get(col)) for col in SELECTION_COLUMNS}
        # ids reach here validated (C5); refuse to write anything else rather than a "5021.0"
        row["image_id"] = record_id(rec["id"], "image id")
        if row["collection_id"] is not None:
            row["collection_id"] = record_id(row["collection_id"], "collection_id")
        row["record_source"] = label
        rows.append(row)
    return rows


def write_selection(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    source: Mapping[str, Any] | None = None,
) -> None:
    """Write ``selection.tsv`` atomically (header + one row per record, in order).

    Columns are :data:`SELECTION_COLUMNS`; missing values are empty cells; tabs and newlines
    inside text fields are replaced by spaces so that every image is one line. ``source``
    (the source's ``describe_source()``) fills the ``record_source`` column: which API, snapshot or
    dump (path, size, sha256) the records came from.
    """
    import pandas as pd

    from nvmeta.images.download import remove_stale_temps
    from nvmeta.io import write_tsv

    remove_stale_temps(path)  # temporaries of a killed earlier attempt
    df = pd.DataFrame(selection_rows(records, source), columns=list(SELECTION_COLUMNS), dtype=object)
    write_tsv(path, df)


def read_selection_ids(path: str | os.PathLike) -> list[int]:
    """Image ids of a ``selection.tsv``, in order (lean: no pandas)."""
    import csv

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        return [int(row["image_id"]) for row in reader]
