"""The part of an analysis' config that selects its images: the selection the query reads, the query rule's params.

The config check (:func:`nvmeta.workflow.config.check_config`) is the one validator: what arrives
here is a validated block, whose keys are indexed, not checked again.

Pure Python (no pandas, no nilearn at import time): the Snakefile imports it to build the query rule's
``params`` (:func:`analysis_query_spec`).
"""

from __future__ import annotations

import datetime
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "QUERY_SPEC_VERSION",
    "SELECTION_KEYS",
    "analysis_query_spec",
    "analysis_selection",
    "is_explicit",
    "terms_max_images",
]

#: Bumped when the selection semantics change, so that existing selections are re-queried.
QUERY_SPEC_VERSION = 1

#: The keys of a selection config, which the query reads: the analysis' keys of the same names, or the
#: atlas' (:func:`nvmeta.decode.atlas.selection_cfg`); ``max_images`` is the cap itself (None: no limit).
SELECTION_KEYS = (
    "image_ids",
    "collection_ids",
    "image_terms",
    "collection_terms",
    "default_terms",
    "max_images",
)


def is_explicit(selection_cfg: Mapping[str, Any]) -> bool:
    """True when the selection names images or collections by id (filters are then ignored)."""
    return bool(selection_cfg["image_ids"] or selection_cfg["collection_ids"])


@functools.lru_cache(maxsize=1)
def terms_max_images() -> int:
    """The cap of a selection by terms whose ``max_images`` is null: the schema's ``terms_default`` of
    ``analyses.<name>.max_images`` (nilearn's ``fetch_neurovault`` default)."""
    from nvmeta.workflow.config import schema_node

    return int(schema_node("analyses.<name>.max_images")["terms_default"])


def analysis_selection(analysis_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the query reads of one validated analysis block (:data:`SELECTION_KEYS`).

    Ids keep their first position when repeated; a null ``max_images`` becomes the cap it stands for
    (none with explicit ids, :func:`terms_max_images` with terms); with ``hygiene`` the atlas' hygiene
    terms go under the analysis' own (:func:`nvmeta.select.hygiene.with_hygiene`).
    """
    from nvmeta.select.hygiene import with_hygiene

    sel = {key: analysis_cfg[key] for key in SELECTION_KEYS}
    sel["image_ids"] = list(dict.fromkeys(sel["image_ids"]))
    sel["collection_ids"] = list(dict.fromkeys(sel["collection_ids"]))
    if sel["max_images"] is None and not is_explicit(sel):
        sel["max_images"] = terms_max_images()
    return with_hygiene(sel) if analysis_cfg["hygiene"] else sel


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
    selection_cfg: Mapping[str, Any],
    nv_url: str | os.PathLike,
    dump: str | os.PathLike | None = None,
    dump_sha256: str | None = None,
) -> dict[str, Any]:
    """The part of an analysis' config that determines its selection.

    Used as the query rule's ``params``: when it changes the selection is re-queried; changes
    elsewhere (``meta``, ``ica``, ``neurovault.mode``/``timeout``...) leave it alone. In explicit
    mode the terms do not affect the selection and are left out.

    Parameters
    ----------
    selection_cfg : mapping
        What the query reads (:func:`analysis_selection` of an analysis, or the atlas'
        :func:`nvmeta.decode.atlas.selection_cfg`).
    nv_url : str or path-like
        ``config["neurovault"]["url"]``.
    dump : str or path-like, optional
        ``config["neurovault"]["dump"]`` (selecting from another dump re-queries; left out of the
        spec when unset, so specs of API selections are unchanged).
    dump_sha256 : str, optional
        The dump's content digest (:func:`nvmeta.neurovault.dump_files.dump_digest`), so that a dump
        whose content changed re-queries whatever its mtime; with ``dump`` only.

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
    explicit = is_explicit(selection_cfg)
    spec: dict[str, Any] = {
        "version": QUERY_SPEC_VERSION,
        "url": url,
        "selection_mode": "explicit" if explicit else "terms",
        "max_images": selection_cfg["max_images"],
    }
    if dump:
        spec["dump"] = os.fspath(dump)
        spec["dump_sha256"] = dump_sha256
    if explicit:
        spec["image_ids"] = selection_cfg["image_ids"]
        spec["collection_ids"] = selection_cfg["collection_ids"]
    else:
        spec["default_terms"] = selection_cfg["default_terms"]
        spec["image_terms"] = selection_cfg["image_terms"]
        spec["collection_terms"] = selection_cfg["collection_terms"]
    return _canonical(spec)
