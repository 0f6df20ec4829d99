"""The part of an analysis' config that selects its images: ids, ``max_images``, the query rule's params.

Pure Python (no pandas, no nilearn at import time): the Snakefile imports it to build the query rule's
``params`` (:func:`analysis_query_spec`).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from typing import Any

from nvmeta.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "QUERY_SPEC_VERSION",
    "analysis_query_spec",
    "is_explicit",
    "resolve_max_images",
    "validate_query",
]

#: nilearn's default ``max_images`` for filtered queries.
DEFAULT_MAX_IMAGES = 100

#: Bumped when the selection semantics change, so that existing selections are re-queried.
QUERY_SPEC_VERSION = 1


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
    dump_sha256: str | None = None,
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
    explicit = is_explicit(analysis_cfg, key_prefix)
    spec: dict[str, Any] = {
        "version": QUERY_SPEC_VERSION,
        "url": url,
        "selection_mode": "explicit" if explicit else "terms",
        "max_images": resolve_max_images(analysis_cfg, key_prefix),
    }
    if dump:
        spec["dump"] = os.fspath(dump)
        spec["dump_sha256"] = dump_sha256
    if explicit:
        spec["image_ids"] = _ids(analysis_cfg, "image_ids", key_prefix)
        spec["collection_ids"] = _ids(analysis_cfg, "collection_ids", key_prefix)
    else:
        default_terms = analysis_cfg.get("default_terms", True)
        spec["default_terms"] = True if default_terms is None else default_terms
        spec["image_terms"] = analysis_cfg.get("image_terms") or {}
        spec["collection_terms"] = analysis_cfg.get("collection_terms") or {}
    return _canonical(spec)
