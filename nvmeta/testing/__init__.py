"""Test helpers: a fixture NeuroVault server (:mod:`nvmeta.testing.server`) and record builders.

The builders fill a *recorded* record (e.g. ``read_image.json`` from NeuroVault/pynv's cassettes,
as copied into ``tests/data/api_responses/``) with new ids, so synthetic records keep the real
field layout (key names and order, nulls, the polymorphic extras).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

BASE = "https://neurovault.org"


def load_recorded(path: str | os.PathLike) -> Any:
    """JSON body of a recorded exchange (``{"response": {"json": ...}}``) or of a plain JSON file."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict) and "response" in obj and "json" in obj["response"]:
        return obj["response"]["json"]
    return obj


def image_record(template: dict, image_id: int, collection_id: int, filename: str, **fields: Any) -> dict:
    """Image record in the layout of ``template`` with the ids, URLs and ``fields`` replaced.

    Parameters
    ----------
    template : dict
        A recorded image record (e.g. ``read_image.json``'s body).
    image_id, collection_id : int
    filename : str
        Stored file name (may contain a sub-folder, e.g. ``pain_01.nidm/TStatistic.nii.gz``).
    **fields
        Values to set (new keys are appended, as the server does for custom metadata).

    Returns
    -------
    dict
    """
    rec = copy.deepcopy(template)
    rec.update(
        url=f"{BASE}/images/{image_id}/",
        id=int(image_id),
        file=f"{BASE}/media/images/{collection_id}/{filename}",
        collection=f"{BASE}/collections/{collection_id}/",
        collection_id=int(collection_id),
    )
    for key in ("thumbnail", "reduced_representation"):
        if rec.get(key):
            rec[key] = (
                rec[key].rsplit("/", 1)[0].rsplit("/", 1)[0]
                + f"/{collection_id}/"
                + (f"glass_brain_{image_id}.jpg" if key == "thumbnail" else f"transform_4mm_{image_id}.npy")
            )
    for key in ("surface_left_file", "surface_right_file"):
        if key in rec:
            rec[key] = None
    rec.update(fields)
    return rec


def collection_record(template: dict, collection_id: int, **fields: Any) -> dict:
    """Collection record in the layout of ``template`` with id/URLs and ``fields`` replaced."""
    rec = copy.deepcopy(template)
    rec.update(
        id=int(collection_id),
        url=f"{BASE}/collections/{collection_id}/",
        download_url=f"{BASE}/collections/{collection_id}/download",
        name=f"collection {collection_id}",
    )
    rec.update(fields)
    return rec


def demo_pain_maps(snapshot: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """(t-map path, number of subjects) of the 21 pain maps of the bundled demo snapshot.

    Records 990001-990021 of ``tests/data/snapshot`` (collection 1425) hold the sample sizes;
    the list is in file order (pain_01 ... pain_21).
    """
    from nvmeta.testing.workdir import REPO

    root = Path(snapshot) if snapshot is not None else REPO / "tests" / "data" / "snapshot"
    out = []
    for rec_path in sorted((root / "api" / "images").glob("9900[0-2][0-9].json")):
        rec = json.loads(rec_path.read_text())
        if rec.get("collection_id") == 1425 and "pain_" in rec["file"]:
            rel = rec["file"].split("/media/", 1)[1]
            out.append((root / "media" / rel, int(rec["number_of_subjects"])))
    return sorted(out, key=lambda item: str(item[0]))
