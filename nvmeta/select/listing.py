"""Records as a source lists them: a collection's images (complete or not at all), collections by id,
explicit ids' records taken from their collection's listing, and the ordered selection they fill."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvmeta.select.funnel import Funnel

__all__ = ["IncompleteListing", "ListingPrefetch", "Selection", "collection_images", "fetch_collections"]


class IncompleteListing(Exception):
    """A collection's image listing ended short of its ``count`` even when asked again."""


class Selection:
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
    raise IncompleteListing(msg)  # logged once, by the query rule


def collection_images(
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


def fetch_collections(
    client: Any,
    ids: Iterable[int],
    log: logging.Logger,
    sel: Selection,
    missing: tuple[type[BaseException], ...],
) -> Iterator[dict[str, Any]]:
    """The records of collections ``ids`` (one skipped with a warning when it raises ``missing``)."""
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


class ListingPrefetch:
    """Records of explicit image ids taken from their collection's listing.

    The API serves an image's record either alone (``images/{id}/``) or in its collection's
    listing (``collections/{cid}/images/``, up to 1,000 records per page), and which collection
    an id belongs to is known only from its record. So, once an explicit image's record names its
    collection, the ids still to come that lie within 1,000 of it (NeuroVault numbers the images
    of an upload consecutively) are likely in the same collection: when there are more of them
    than the listing has pages, the collection is listed once and their records come from it.
    The collection record, asked for to count those pages, is kept for the downloads (which
    would ask for it otherwise). An id that the listing does not hold is asked for on its own,
    as without the prefetch, so the selection is the same; only the requests differ: 200 ids from 18
    collections cost 18 records + 18 listings + 18 collection records instead of 200 records +
    18 collection records. Local sources (snapshot directory, dump) answer records for free and
    are not prefetched.
    """

    NEAR = 1000

    def __init__(self, client: Any, image_ids: list[int], sel: Selection, log: logging.Logger) -> None:
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
        # (an optimisation: whatever fails here, the ids are asked for one by one, as without it)
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
            listing = collection_images(self.client, cid, self.log, quiet=True)
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
