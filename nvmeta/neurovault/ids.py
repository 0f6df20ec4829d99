"""Record ids: validated once, where records enter nvmeta, so that no later stage checks them again."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nvmeta.neurovault.errors import UnsafeInput

__all__ = ["MAX_ID", "check_image_id", "checked_record", "normalize_record", "record_id"]


def check_image_id(value: Any) -> int:
    """Return ``value`` as a positive int, or raise :class:`UnsafeInput`.

    Accepts ints and strings of decimal digits (Snakemake wildcards); rejects bools, floats,
    signs, whitespace, ``0``, negative values and anything else.
    """
    if isinstance(value, bool):
        raise UnsafeInput(f"invalid id (not a positive integer): {value!r}")
    if isinstance(value, int):
        iid = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        iid = int(value)
    else:
        raise UnsafeInput(f"invalid id (not a positive integer): {str(value)[:60]!r}")
    if iid <= 0:
        raise UnsafeInput(f"invalid id (not a positive integer): {value!r}")
    return iid


#: ids above this are refused (NeuroVault's are below 10**7; a 12-digit bound keeps paths sane)
MAX_ID = 10**12 - 1


def record_id(value: Any, what: str = "id") -> int:
    """A record id as the server sent it, validated once at the boundary.

    An int, or a float with an integral value (``5021.0``, as some JSON encoders write it), is
    returned as an int; anything else (``5021.5``, ``"5021"``, ``"abc"``, a bool, ``0``, a
    negative or a huge number, NaN, null) raises :class:`UnsafeInput` naming the value, so the
    record is excluded with that reason. Everything downstream may assume int ids.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsafeInput(f"invalid {what} {str(value)[:40]!r} (not a positive integer)")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise UnsafeInput(f"invalid {what} {value!r} (not a positive integer)")
        value = int(value)
    if not 0 < value <= MAX_ID:
        raise UnsafeInput(f"invalid {what} {str(value)[:40]} (not a positive integer up to {MAX_ID})")
    return value


def normalize_record(record: Any, kind: str = "image") -> dict:
    """A copy of a server record with its ``id`` (and an image's ``collection_id``) as ints.

    Raises
    ------
    UnsafeInput
        Not a JSON object, or an id that :func:`record_id` refuses (the reason names it).
    """
    if not isinstance(record, Mapping):
        raise UnsafeInput(f"{kind} record is not a JSON object ({type(record).__name__})")
    iid, cid = record.get("id"), record.get("collection_id")
    if (
        type(iid) is int
        and 0 < iid <= MAX_ID
        and (kind != "image" or cid is None or (type(cid) is int and 0 < cid <= MAX_ID))
    ):
        return dict(record)  # already normal (the common case): a plain copy
    rec = dict(record)
    rec["id"] = record_id(rec.get("id"), f"{kind} id")
    if kind == "image" and rec.get("collection_id") is not None:
        rec["collection_id"] = record_id(rec["collection_id"], "collection_id")
    return rec


def checked_record(obj: dict, kind: str, asked: int) -> dict:
    """``normalize_record`` of a record asked by id, the failure naming the id asked for."""
    try:
        return normalize_record(obj, kind)
    except UnsafeInput as exc:
        raise UnsafeInput(
            f"server returned a record with id {str(obj.get('id'))[:20]!r} for {kind} {asked} ({exc})"
        ) from None
