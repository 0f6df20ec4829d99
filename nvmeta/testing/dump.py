"""Write NeuroVault database exports (nv-data layout) for tests and benchmarks.

The layout is the one documented in ``docs/neurovault-dump.md``: one CSV file per ``statmaps``
table with a header row, database codes (``map_type`` ``T``, ``analysis_level`` ``G``), booleans as
``t``/``f``, an empty field for a missing value, fields quoted when they hold commas, quotes or
newlines (as PostgreSQL's ``COPY ... CSV HEADER`` writes them). Packed, the tables sit in a folder
of a ``.tar.gz`` as the published exports do.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nvmeta.neurovault.dump import TABLES

#: every column of the tables a selection reads, in a plausible export order (extra columns that
#: nvmeta does not read are included so that reading only the needed ones is exercised)
COLUMNS = {
    "collection": [
        "id", "name", "DOI", "authors", "paper_url", "description", "private", "private_token",
        "add_date", "modify_date", "owner_id", "journal_name", "software_package", "smoothing_fwhm",
        "type_of_design",
    ],
    "item": [
        "id", "name", "description", "add_date", "modify_date", "collection_id",
        "polymorphic_ctype_id", "is_valid",
    ],
    "image": [
        "basecollectionitem_ptr_id", "file", "data", "target_template_image", "subject_species",
        "data_origin", "thumbnail", "reduced_representation", "surface_left_file", "surface_right_file",
    ],
    "statmap": [
        "image_ptr_id", "map_type", "statistic_parameters", "smoothness_fwhm", "contrast_definition",
        "contrast_definition_cogatlas", "modality", "cognitive_paradigm_cogatlas_id",
        "cognitive_contrast_cogatlas_id", "is_thresholded", "not_mni", "brain_coverage", "perc_bad_voxels",
        "perc_voxels_outside", "analysis_level", "number_of_subjects", "ignore_file_warning",
        "cognitive_paradigm_description_url",
    ],
    "task": ["name", "cog_atlas_id"],
    "contrast": ["name", "cog_atlas_id", "task_id"],
}  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True:
        return "t"
    if value is False:
        return "f"
    return str(value)


def write_table(path: str | os.PathLike, table: str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one table's CSV (header = :data:`COLUMNS`; missing keys are empty fields)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLUMNS[table])
        for row in rows:
            w.writerow([_cell(row.get(c)) for c in COLUMNS[table]])
    return path


def write_dump(
    dest: str | os.PathLike,
    tables: Mapping[str, Iterable[Mapping[str, Any]]],
    packed: bool = True,
    folder: str = "neurovault_data",
) -> Path:
    """Write an export.

    Parameters
    ----------
    dest : path-like
        ``.tar.gz`` to write (``packed``) or the directory to hold the CSV files.
    tables : mapping
        ``{"collection": rows, "item": rows, "image": rows, "statmap": rows, "task": rows,
        "contrast": rows}``; rows are dicts keyed by column (``True``/``False`` become ``t``/``f``,
        ``None`` an empty field).
    packed : bool
        Write a ``.tar.gz`` with the tables under ``folder/`` (as nv-data's exports).
    folder : str
        Folder of the tables inside the archive.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    dest = Path(dest)
    if not packed:
        for name, rows in tables.items():
            write_table(dest / TABLES[name], name, rows)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for name, rows in tables.items():
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(COLUMNS[name])
            for row in rows:
                w.writerow([_cell(row.get(c)) for c in COLUMNS[name]])
            data = buf.getvalue().encode()
            info = tarfile.TarInfo(f"{folder}/{TABLES[name]}")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return dest


def snapshot_tables(root: str | os.PathLike, image_ids: Iterable[int]) -> dict[str, list[dict[str, Any]]]:
    """The tables of an export holding ``image_ids`` as the API records of a snapshot directory
    (``api/images/{id}.json``, ``api/collections/{cid}.json``) serve them: labels back to their
    database codes, ``file`` relative to the media root, a task row per task name (the snapshot's
    records name tasks without their Cognitive Atlas ids). The records a :class:`DumpSource` makes
    of these tables are the snapshot's, field for field, for the fields the dump holds."""
    import json

    from nvmeta.neurovault.dump import ANALYSIS_LEVELS, MAP_TYPES

    root = Path(root)
    codes = {label: code for code, label in MAP_TYPES.items()}
    levels = {label: code for code, label in ANALYSIS_LEVELS.items()}
    tables: dict[str, list[dict[str, Any]]] = {k: [] for k in TABLES}
    tasks: dict[str, str] = {}
    cids: list[int] = []
    for iid in image_ids:
        rec = json.loads((root / "api" / "images" / f"{iid}.json").read_text())
        task = rec.get("cognitive_paradigm_cogatlas")
        task_id = rec.get("cognitive_paradigm_cogatlas_id") or (
            tasks.setdefault(task, f"trm_{len(tasks) + 1}") if task else None
        )
        if task:
            tasks[task] = task_id
        if rec["collection_id"] not in cids:
            cids.append(rec["collection_id"])
        item = {k: rec.get(k) for k in COLUMNS["item"]}
        tables["item"].append({**item, "polymorphic_ctype_id": 30})
        image = {k: rec.get(k) for k in COLUMNS["image"] if k != "basecollectionitem_ptr_id"}
        image["file"] = rec["file"].split("/media/", 1)[1]
        tables["image"].append({**image, "basecollectionitem_ptr_id": iid, "data": "{}"})
        stat = {k: rec.get(k) for k in COLUMNS["statmap"] if k != "image_ptr_id"}
        stat.update(map_type=codes[rec["map_type"]], analysis_level=levels.get(rec.get("analysis_level")))
        tables["statmap"].append({**stat, "image_ptr_id": iid, "cognitive_paradigm_cogatlas_id": task_id})
    for cid in cids:
        col = json.loads((root / "api" / "collections" / f"{cid}.json").read_text())
        tables["collection"].append(
            {**{k: col.get(k) for k in COLUMNS["collection"]}, "owner_id": col["owner"]}
        )
    tables["task"] = [{"name": name, "cog_atlas_id": key} for name, key in tasks.items()]
    return tables
