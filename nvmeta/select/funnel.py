"""A query's account of itself (``query_funnel.json``): what it examined and why records were left out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nvmeta.errors import ConfigError

__all__ = ["EmptySelection", "Funnel", "describe_funnel"]

_FIELDS_SAMPLE = 1000  # the keys of this many first records name the known fields in messages


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
        # what the source (a dump) left out before any term, and values it kept as written
        self.by_source: dict[str, dict[str, int]] = {}

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
            "excluded_by_source": self.by_source.get("excluded", {}),
            "flagged_by_source": self.by_source.get("flagged", {}),
            "selected": n_selected,
            "max_images": max_images,
            "max_images_reached": full,
        }


def describe_funnel(funnel: Mapping[str, Any]) -> str:
    """Multi-line human summary of a funnel dict (for error messages)."""
    by_source, flagged = funnel.get("excluded_by_source") or {}, funnel.get("flagged_by_source") or {}
    lines = [
        *(["  left out by the source before any term:"] if by_source else []),
        *(f"    {k}: {v}" for k, v in by_source.items()),
        f"  collections examined: {funnel['collections_examined']}, passed: {funnel['collections_passed']}",
        *(f"    rejected by {k}: {v}" for k, v in funnel["collections_rejected_by_term"].items() if v),
        f"  images examined: {funnel['images_examined']}, matched: {funnel['images_matched']}",
        *(f"    rejected by {k}: {v}" for k, v in funnel["images_rejected_by_term"].items() if v),
        *(f"  excluded ({k}): {v}" for k, v in funnel["excluded"].items()),
        f"  selected: {funnel['selected']}",
        *(["  values the source kept as written (each image's QC judges them):"] if flagged else []),
        *(f"    {k}: {v}" for k, v in flagged.items()),
    ]
    return "\n".join(lines)


class EmptySelection(Exception):
    """An analysis selected no image (the message holds the query's funnel)."""
