"""``selection.tsv``: one row per selected image, in selection order (see README, "Outputs")."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SELECTION_COLUMNS", "read_selection_ids", "selection_rows", "source_label", "write_selection"]

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
