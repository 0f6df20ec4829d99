"""The atlas' terms: which included maps form each term's reference, and a safe local name per term.

A term is a value of the atlas' ``group_by`` field (the Cognitive Atlas task by default) as the
server wrote it. Such a string never reaches a path: each term gets a *slug*, a lowercase
``[a-z0-9_]`` rendering of at most 40 characters followed by 8 hex digits of the sha256 of the exact
term (``pain_monitor_discrimination_task_5f0c4a2b``), validated by :data:`SLUG` before use; the
human-readable name is kept in the tables only.

Files (``results/atlas/``): ``groups.tsv`` (written with the selection: image id, collection id,
term of every selected image), ``terms.tsv`` (one row per term found among the included maps:
slug, term, ``n_maps``, ``n_collections``, ``eligible``, ``reason``) and ``members.tsv`` (one row per
included map of an eligible term: slug, image id, collection id, sample size ``n``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "GROUP_COLUMNS",
    "MEMBER_COLUMNS",
    "SLUG",
    "TERM_COLUMNS",
    "read_members",
    "read_terms",
    "slug",
    "write_groups",
    "write_terms",
]

logger = logging.getLogger(__name__)

#: What a term slug looks like (the ``{term}`` wildcard of the atlas rules).
SLUG = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*_[0-9a-f]{8}|term_[0-9a-f]{8}")
GROUP_COLUMNS = ["image_id", "collection_id", "term"]
TERM_COLUMNS = ["slug", "term", "n_maps", "n_collections", "eligible", "reason"]
MEMBER_COLUMNS = ["slug", "image_id", "collection_id", "n"]
_WS = re.compile(r"\s+")


def clean_term(value: Any) -> str | None:
    """The term of a record's ``group_by`` value: whitespace collapsed, None when empty."""
    if value is None:
        return None
    text = _WS.sub(" ", str(value)).strip()
    return text or None


def slug(term: str) -> str:
    """The local name of a term: ``[a-z0-9_]`` words (at most 40 characters) and 8 hex digits of its sha256.

    Raises
    ------
    ValueError
        If the result does not match :data:`SLUG` (cannot happen for a string; checked anyway because
        the slug becomes a folder name).
    """
    digest = hashlib.sha256(term.encode("utf-8")).hexdigest()[:8]
    words = re.sub(r"[^a-z0-9]+", "_", term.lower()).strip("_")[:40].strip("_")
    out = f"{words}_{digest}" if words else f"term_{digest}"
    if not SLUG.fullmatch(out):
        raise ValueError(f"term slug {out!r} is not a safe name")
    return out


def write_groups(records: Iterable[Mapping[str, Any]], group_by: str, path: str | os.PathLike) -> int:
    """``groups.tsv``: image id, collection id and term of every selected record (its ``group_by`` field).

    Returns the number of rows with a term.
    """
    import pandas as pd

    from nvmeta.io import write_tsv

    rows = [
        {
            "image_id": int(r["id"]),
            "collection_id": r.get("collection_id"),
            "term": clean_term(r.get(group_by)),
        }
        for r in records
    ]
    write_tsv(path, pd.DataFrame(rows, columns=GROUP_COLUMNS))
    return sum(1 for r in rows if r["term"] is not None)


def _included(qc_tsv: str | os.PathLike):
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    qc = qc[qc["status"].astype(str).str.strip() == "included"]
    out = {}
    for row in qc.itertuples(index=False):
        n = pd.to_numeric(getattr(row, "n", None), errors="coerce")
        out[int(row.image_id)] = None if pd.isna(n) else float(n)
    return out


def write_terms(
    groups_tsv: str | os.PathLike,
    qc_tsv: str | os.PathLike,
    min_maps: int,
    min_collections: int,
    terms_tsv: str | os.PathLike,
    members_tsv: str | os.PathLike,
    log: logging.Logger | None = None,
) -> tuple[Any, Any]:
    """Group the included maps by term and decide which terms get a reference map.

    A term is *eligible* when it has at least ``min_maps`` included maps from at least
    ``min_collections`` collections (a collection is one study's upload: its maps are not
    independent evidence for a task).

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        The ``terms.tsv`` and ``members.tsv`` tables (also written).
    """
    import pandas as pd

    from nvmeta.io import write_tsv

    log = log or logger
    groups = pd.read_csv(groups_tsv, sep="\t", dtype={"term": str}, keep_default_na=False)
    n_of = _included(qc_tsv)
    groups = groups[groups["term"].astype(str) != ""]
    groups = groups[groups["image_id"].astype(int).isin(list(n_of))]
    rows, members = [], []
    slugs: dict[str, str] = {}
    for term, part in groups.groupby("term", sort=True):
        s = slug(term)
        if s in slugs:  # two terms with the same slug would share a folder: refuse
            raise ValueError(f"terms {slugs[s]!r} and {term!r} have the same slug {s!r}")
        slugs[s] = term
        ids = sorted(int(i) for i in part["image_id"])
        cids = part.set_index("image_id")["collection_id"]
        n_coll = int(pd.to_numeric(cids, errors="coerce").dropna().nunique())
        eligible = len(ids) >= min_maps and n_coll >= min_collections
        reason = (
            ""
            if eligible
            else (
                f"{len(ids)} map(s) from {n_coll} collection(s); needs atlas.min_maps={min_maps} and "
                f"atlas.min_collections={min_collections}"
            )
        )
        rows.append({"slug": s, "term": term, "n_maps": len(ids), "n_collections": n_coll,
                     "eligible": eligible, "reason": reason})  # fmt: skip
        if eligible:
            members += [{"slug": s, "image_id": i, "collection_id": int(cids[i]), "n": n_of[i]} for i in ids]
    terms = pd.DataFrame(rows, columns=TERM_COLUMNS)
    members_df = pd.DataFrame(members, columns=MEMBER_COLUMNS)
    write_tsv(terms_tsv, terms)
    write_tsv(members_tsv, members_df)
    n_ok = int(terms["eligible"].sum()) if len(terms) else 0
    log.info(
        "atlas: %d term(s) among %d included map(s) with a term; %d eligible (>= %d maps from >= %d "
        "collections), %d map(s) in them",
        len(terms), len(groups), n_ok, min_maps, min_collections, len(members_df),
    )  # fmt: skip
    if n_ok == 0:
        log.warning("atlas: no term is eligible: the atlas has no reference map (lower atlas.min_maps / "
                    "atlas.min_collections, or select more maps)")  # fmt: skip
    return terms, members_df


def read_terms(path: str | os.PathLike):
    """``terms.tsv`` as a DataFrame (slugs validated)."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype={"term": str, "slug": str, "reason": str}, keep_default_na=False)
    bad = [s for s in df["slug"] if not SLUG.fullmatch(s)]
    if bad:
        raise ValueError(f"{path}: invalid term slug(s) {bad[:3]}")
    df["eligible"] = df["eligible"].astype(str).str.lower().isin(["true", "1"])
    return df


def read_members(path: str | os.PathLike) -> dict[str, list[tuple[int, int, float | None]]]:
    """``members.tsv`` as ``{slug: [(image_id, collection_id, n), ...]}`` in image-id order (no pandas)."""
    import csv
    import math

    out: dict[str, list[tuple[int, int, float | None]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            s = row["slug"]
            if not SLUG.fullmatch(s):
                raise ValueError(f"{path}: invalid term slug {s!r}")
            n = float(row["n"]) if row.get("n") not in (None, "") else None
            out.setdefault(s, []).append(
                (
                    int(row["image_id"]),
                    int(row["collection_id"]),
                    n if n is None or math.isfinite(n) else None,
                )
            )
    return out
