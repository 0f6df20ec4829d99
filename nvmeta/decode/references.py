"""Leave-out references: the atlas as one analysis may decode against it, without its own maps.

No double dipping: an analysis' selected images, and by default every map of its collections
(``decode.leave_out: collections``), are taken out of every reference map before the analysis is
decoded. A term none of whose maps is left out keeps the atlas' own map; for the others the stored
sums (:class:`nvmeta.decode.sums.Sums`) minus the left-out maps' contributions give the reference
exactly, reading only the maps left out (never the whole atlas). A term left with fewer than
``atlas.min_maps`` maps or ``atlas.min_collections`` collections is not decodable for that analysis
(``decodable`` false, with the reason).

Outputs (``results/analyses/{a}/decode/``): ``references.tsv`` (:data:`REFERENCE_COLUMNS`; ``map`` is
the path of the map to decode against) and ``references/{slug}.nii.gz`` for the terms that lost maps.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REFERENCE_COLUMNS", "leave_out_sets", "read_references", "write_references"]

logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = [
    "slug", "term", "n_maps", "n_collections", "n_left_out", "decodable", "reason", "map",
]  # fmt: skip


def leave_out_sets(selection_tsv: str | os.PathLike, leave_out: str) -> tuple[set[int], set[int]]:
    """The analysis' selected image ids and (``leave_out: collections``) their collection ids."""
    images, collections = set(), set()
    with open(selection_tsv, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            images.add(int(row["image_id"]))
            if leave_out == "collections" and (row.get("collection_id") or "").isdigit():
                collections.add(int(row["collection_id"]))
    return images, collections


def _is_out(image_id: int, cid: int, images: set[int], collections: set[int]) -> bool:
    return image_id in images or cid in collections


def write_references(
    selection_tsv: str | os.PathLike,
    atlas_tsv: str | os.PathLike,
    members: Mapping[str, list[tuple[int, int, float | None]]],
    atlas_map_for: Callable[[str], Path],
    sums_path_for: Callable[[str], Path],
    zmap_path_for: Callable[[int], Path],
    mask_img: Any,
    atlas: Mapping[str, Any],
    leave_out: str,
    out_tsv: str | os.PathLike,
    out_dir: str | os.PathLike,
    log: logging.Logger | None = None,
) -> Any:
    """Rule ``decode_references``: the leave-out reference of every atlas term for one analysis.

    Parameters
    ----------
    selection_tsv : path-like
        The analysis' ``selection.tsv`` (what is left out).
    atlas_tsv : path-like
        ``results/atlas/atlas.tsv`` (the terms with a reference map).
    members : mapping
        ``{slug: [(image_id, collection_id, n)]}`` (:func:`nvmeta.decode.terms.read_members`).
    atlas_map_for, sums_path_for : callable
        ``slug -> Path`` of the term's ``z.nii.gz`` / ``sums.npz`` (the rule's inputs).
    zmap_path_for : callable
        ``image_id -> Path`` of the z-maps of the maps left out (the rule's inputs).
    mask_img : nibabel image
    atlas : mapping
        The validated ``atlas`` block (``min_maps``, ``min_collections``, ``min_fraction``).
    leave_out : {"collections", "images"}
    out_tsv, out_dir : path-like
        ``references.tsv`` and the folder of the recomputed maps.

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import nibabel as nib
    import pandas as pd

    from nvmeta.decode.sums import Sums
    from nvmeta.io import atomic_path, write_tsv
    from nvmeta.meta.units import load_vector, mask_data

    log = log or logger
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, collections = leave_out_sets(selection_tsv, leave_out)
    mask_img, mask = mask_data(mask_img)
    table = pd.read_csv(atlas_tsv, sep="\t", dtype={"term": str, "slug": str}, keep_default_na=False)
    rows = []
    for row in table.itertuples(index=False):
        out = [m for m in members.get(row.slug, []) if _is_out(m[0], m[1], images, collections)]
        base = {"slug": row.slug, "term": row.term, "n_left_out": 0, "decodable": True, "reason": ""}
        if not out:
            rows.append({**base, "n_maps": int(row.n_maps), "n_collections": int(row.n_collections),
                         "map": os.fspath(atlas_map_for(row.slug))})  # fmt: skip
            continue
        sums, extra = Sums.load(sums_path_for(row.slug))
        used = dict(zip(extra["image_ids"].tolist(), extra["weights"].tolist(), strict=True))
        cids = dict(zip(extra["image_ids"].tolist(), extra["collection_ids"].tolist(), strict=True))
        gone = [m for m in out if m[0] in used]
        kept = [i for i in used if not _is_out(i, cids[i], images, collections)]
        n_coll = len({cids[i] for i in kept})
        base["n_left_out"] = len(gone)
        rec = {**base, "n_maps": len(kept), "n_collections": n_coll, "map": ""}
        if len(kept) < int(atlas["min_maps"]) or n_coll < int(atlas["min_collections"]):
            rec.update(decodable=False, reason=(
                f"{len(kept)} map(s) from {n_coll} collection(s) after leaving out {len(gone)} of the "
                f"analysis' (decode.leave_out: {leave_out}); needs atlas.min_maps={atlas['min_maps']} and "
                f"atlas.min_collections={atlas['min_collections']}"))  # fmt: skip
            rows.append(rec)
            continue
        maps = [(load_vector(zmap_path_for(i), mask_img, mask), used[i]) for i, _, _ in gone]
        ref = sums.without(maps).reference(float(atlas["min_fraction"]))
        vol = np.full(mask.shape, np.nan, dtype=np.float32)
        vol[mask] = ref.astype(np.float32)
        img = nib.Nifti1Image(vol, mask_img.affine)
        img.header.set_data_dtype(np.float32)
        dest = out_dir / f"{row.slug}.nii.gz"
        with atomic_path(dest) as tmp:
            nib.save(img, tmp)
        rec["map"] = os.fspath(dest)
        rows.append(rec)
    df = pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
    write_tsv(out_tsv, df)
    n_ok = int(df["decodable"].sum()) if len(df) else 0
    changed = int((df["n_left_out"] > 0).sum()) if len(df) else 0
    log.info("references: %d of %d atlas term(s) decodable; %d recomputed without the analysis' maps "
             "(%d image(s), %d collection(s) left out)", n_ok, len(df), changed, len(images),
             len(collections))  # fmt: skip
    if len(df) and n_ok == 0:
        log.warning("references: no atlas term is left after leaving out the analysis' own maps: nothing "
                    "to decode against")  # fmt: skip
    return df


def read_references(path: str | os.PathLike) -> Any:
    """``references.tsv`` as a DataFrame (``decodable`` as bool)."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype={"term": str, "slug": str, "reason": str, "map": str},
                     keep_default_na=False)  # fmt: skip
    df["decodable"] = df["decodable"].astype(str).str.lower().isin(["true", "1"])
    return df
