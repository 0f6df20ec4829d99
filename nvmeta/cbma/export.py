"""An analysis as a NiMARE dataset: a NIMADS studyset (JSON) and a pickled NiMARE ``Dataset``.

Layout of the studyset (NiMARE 0.22's NIMADS format: studies -> analyses -> images/points):

- one **study** per NeuroVault collection (``id`` = collection id; ``name`` and
  ``authors``/``publication`` from the collection record; metadata: DOI, collection URL);
- per included image, one **analysis** ``{image_id}`` holding its images and its positive
  peaks, and, when it has negative peaks, one analysis ``{image_id}_neg`` holding those
  (negative peaks are their own contrast; that analysis has no image, so an image-based
  estimator counts each map once). Analysis metadata: ``sample_sizes`` (``[n]`` from qc.json,
  the image's one resolved sample size), ``neurovault_image_id``, ``neurovault_collection_id``, ``contrast``,
  ``cognitive_atlas_task`` (+ ``_id``), ``cognitive_contrast``, ``doi``, ``map_type``, ``df``,
  ``sign``, ``neurovault_url``;
- **images** (paths relative to the results folder, which is the studyset's base path):
  ``z`` = the template-grid z-map; ``t`` = the downloaded map (native grid, MNI) when it is
  a T map; ``beta`` = Hedges' g and ``varcope`` = var(g) (``images/{id}/g.nii.gz``,
  ``varg.nii.gz``) when the z-map job wrote them, so that NiMARE's effect-size estimators
  (e.g. ``DerSimonianLaird``) run on them directly (image metadata says they are g / var(g));
- **points**: the peaks of ``peaks.tsv`` (MNI mm) with their z as ``z_stat`` value and their
  cluster size as a per-point metadata column (``coordinate_cluster_voxels``).

The ``Dataset`` is NiMARE's own conversion of that studyset
(:func:`nimare.io.convert_nimads_to_dataset`) with the template mask as masker and
``update_path`` to the results folder; ``Dataset.load`` works in a fresh process. When the
results folder moves, call ``dset.update_path(<new results folder>)`` (the relative paths
are kept in the ``*__relative`` columns).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from nvmeta.io import atomic_path, read_json, write_json
from nvmeta.workflow.quiet import Known, quiet

logger = logging.getLogger(__name__)

#: NiMARE logs this whenever a Dataset's masker is replaced by one on another grid; nvmeta replaces
#: the default one by the template mask on purpose, and NiMARE's own comment says it has no effect.
MASKER_NOTE = Known(
    "New masker does not match old masker",
    "nvmeta sets the template mask as the Dataset's masker on purpose (NiMARE: no effect)",
    logger_name="nimare.dataset",
)

__all__ = ["build_studyset", "studyset_to_dataset", "export"]

#: Space label of the template grid (NiMARE's name for nilearn's MNI152 2 mm grid).
SPACE = "mni152_2mm"


def _clean(value: Any) -> Any:
    if value is None:
        return None
    try:
        import math

        if isinstance(value, float) and math.isnan(value):
            return None
    except TypeError:
        pass
    return value


def _image_ref(results_dir: Path, image_id: int, name: str) -> str | None:
    path = results_dir / "images" / str(image_id) / name
    return f"images/{image_id}/{name}" if path.is_file() else None


def build_studyset(
    qc_tsv: str | os.PathLike,
    peaks_tsv: str | os.PathLike,
    results_dir: str | os.PathLike,
    analysis: str,
) -> dict:
    """The NIMADS studyset of an analysis' included images (see the module docstring).

    Parameters
    ----------
    qc_tsv : path-like
        ``results/analyses/{a}/qc.tsv`` (included rows).
    peaks_tsv : path-like
        ``results/analyses/{a}/cbma/peaks.tsv``.
    results_dir : path-like
        The results folder (``results/``): per-image ``metadata.json``, ``qc.json`` and maps
        are read under ``images/{id}/``; image references are relative to it.
    analysis : str
        The analysis name (studyset id ``nvmeta-{analysis}``).

    Returns
    -------
    dict
        A NIMADS studyset.
    """
    from nvmeta.cbma import read_included

    results_dir = Path(results_dir)
    rows = read_included(qc_tsv)
    peaks = pd.read_csv(peaks_tsv, sep="\t")
    by_image = {int(k): g for k, g in peaks.groupby("image_id")}
    studies: dict[str, dict] = {}
    for row in rows.itertuples(index=False):
        image_id = int(row.image_id)
        folder = results_dir / "images" / str(image_id)
        meta = read_json(folder / "metadata.json")
        qc = read_json(folder / "qc.json")
        collection = (meta.get("nvmeta") or {}).get("collection") or {}
        cid = str(qc.get("collection_id") or meta.get("collection_id") or row.collection_id)
        doi = _clean(collection.get("DOI") or collection.get("doi"))
        if cid not in studies:
            studies[cid] = _study(cid, collection, doi)
        base = {
            "neurovault_image_id": image_id,
            "neurovault_collection_id": int(cid) if cid.isdigit() else cid,
            "neurovault_url": meta.get("url") or f"https://neurovault.org/images/{image_id}/",
            "image_name": meta.get("name"),
            "contrast": meta.get("contrast_definition"),
            "cognitive_atlas_task": meta.get("cognitive_paradigm_cogatlas"),
            "cognitive_atlas_task_id": meta.get("cognitive_paradigm_cogatlas_id"),
            "cognitive_contrast": meta.get("cognitive_contrast_cogatlas"),
            "doi": doi,
            "map_type": qc.get("map_type"),
            "df": qc.get("df"),
        }
        if qc.get("n") is not None:
            base["sample_sizes"] = [int(qc["n"])]
        images = _images(results_dir, image_id, qc)
        group = by_image.get(image_id)
        for sign in ("positive", "negative"):
            pts = group[group["sign"] == sign] if group is not None else peaks.iloc[0:0]
            if sign == "negative" and pts.empty:
                continue
            studies[cid]["analyses"].append(_analysis(image_id, sign, meta, base, images, pts))
    return {
        "id": f"nvmeta-{analysis}",
        "name": f"nvmeta analysis {analysis}: {len(rows)} NeuroVault images",
        "studies": list(studies.values()),
    }


def _study(cid: str, collection: dict, doi: str | None) -> dict:
    """One NIMADS study: a NeuroVault collection, with its DOI and URL."""
    return {
        "id": cid,
        "name": collection.get("name") or f"NeuroVault collection {cid}",
        "authors": collection.get("authors") or "",
        "publication": collection.get("journal_name") or "",
        "metadata": {
            "doi": doi,
            "neurovault_collection_id": int(cid) if cid.isdigit() else cid,
            "collection_url": collection.get("url") or f"https://neurovault.org/collections/{cid}/",
        },
        "analyses": [],
    }


def _images(results_dir: Path, image_id: int, qc: dict) -> list[dict]:
    """The image entries of one map: its template-grid z, the downloaded t map, and g / var(g)
    when the z-map job wrote them (as NiMARE's ``beta`` / ``varcope``)."""
    images = [
        {
            "url": f"images/{image_id}/zmap.nii.gz",
            "filename": "zmap.nii.gz",
            "space": SPACE,
            "value_type": "Z map",
        }
    ]
    if qc.get("map_type") == "T map" and _image_ref(results_dir, image_id, "map.nii.gz"):
        images.append(
            {
                "url": f"images/{image_id}/map.nii.gz",
                "filename": "map.nii.gz",
                "space": "MNI",
                "value_type": "T map",
            }
        )
    for name, value_type, what in (
        ("g.nii.gz", "beta", "Hedges' g"),
        ("varg.nii.gz", "varcope", "var(g)"),
    ):
        ref = _image_ref(results_dir, image_id, name)
        if ref:
            images.append(
                {
                    "url": ref,
                    "filename": name,
                    "space": SPACE,
                    "value_type": value_type,
                    "metadata": {"statistic": what},
                }
            )
    return images


def _analysis(
    image_id: int, sign: str, meta: dict, base: dict, images: list[dict], pts: pd.DataFrame
) -> dict:
    """One NIMADS analysis: a map's peaks of one sign (its images only on the positive one)."""
    md = dict(base, sign=sign)
    if len(pts):
        md["coordinate_cluster_voxels"] = [int(v) for v in pts["cluster_voxels"]]
        md["coordinate_peak"] = [str(v) for v in pts["peak"]]
    positive = sign == "positive"
    return {
        "id": str(image_id) if positive else f"{image_id}_neg",
        "name": (meta.get("name") or str(image_id)) + ("" if positive else " (negative peaks)"),
        "conditions": [{"name": meta.get("contrast_definition") or "default", "description": ""}],
        "weights": [1.0],
        "images": images if positive else [],
        "points": [
            {
                "space": "MNI",
                "coordinates": [float(p.x), float(p.y), float(p.z)],
                "values": [{"kind": "z_stat", "value": float(p.z_value)}],
            }
            for p in pts.itertuples(index=False)
        ],
        "metadata": md,
    }


def studyset_to_dataset(studyset: dict, mask_img: nib.Nifti1Image, results_dir: str | os.PathLike):
    """NiMARE's conversion of the studyset into a ``Dataset`` on the template grid.

    Parameters
    ----------
    studyset : dict
        From :func:`build_studyset`.
    mask_img : nibabel.Nifti1Image
        The template mask (the Dataset's masker).
    results_dir : path-like
        Prepended to the relative image paths (``Dataset.update_path``).
    """
    from nimare.io import convert_nimads_to_dataset
    from nimare.nimads import Studyset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        dset = convert_nimads_to_dataset(studyset)
        with quiet(MASKER_NOTE, log=logger):
            dset.masker = mask_img
        dset.update_path(os.path.abspath(results_dir))
        # NiMARE 0.22.1's convert_nimads_to_dataset reads point values as a list of
        # {kind, value} but its Studyset gives them as a dict, so z_stat and the per-point
        # metadata are dropped; NiMARE's own Studyset coordinates frame has them: copy them.
        frame = Studyset(studyset).coordinates
    coords = dset.coordinates.copy()
    extra = [c for c in frame.columns if c not in coords.columns]
    if extra and len(frame):
        # the two order an analysis' points differently: match them by position in mm
        key = ["id", "_x", "_y", "_z"]
        for c in "xyz":
            coords[f"_{c}"] = coords[c].astype(float).round(3)
            frame[f"_{c}"] = frame[c].astype(float).round(3)
        merged = coords.merge(frame[[*key, *extra]], on=key, how="left", validate="one_to_one")
        if len(merged) != len(coords) or merged[extra[0]].isna().any():
            raise RuntimeError("NiMARE's Dataset and Studyset disagree on the points of the studyset")
        for col in ("z_stat", "cluster_voxels"):
            if col in merged:
                merged[col] = pd.to_numeric(merged[col])
        dset.coordinates = merged.drop(columns=["_x", "_y", "_z"])
    return dset


def export(
    qc_tsv: str | os.PathLike,
    peaks_tsv: str | os.PathLike,
    results_dir: str | os.PathLike,
    analysis: str,
    mask_img: nib.Nifti1Image,
    out_json: str | os.PathLike,
    out_pkl: str | os.PathLike,
    log: logging.Logger | None = None,
) -> tuple[dict, Any]:
    """Write ``nimare/studyset.json`` and ``nimare/dataset.pkl.gz`` for one analysis.

    Returns
    -------
    tuple
        ``(studyset dict, nimare.dataset.Dataset)``.
    """
    from nvmeta.images.download import remove_stale_temps

    remove_stale_temps(out_json, out_pkl)  # temporaries of a killed earlier attempt
    log = log or logger
    studyset = build_studyset(qc_tsv, peaks_tsv, results_dir, analysis)
    dset = studyset_to_dataset(studyset, mask_img, results_dir)
    write_json(out_json, studyset)
    with atomic_path(out_pkl) as tmp:
        dset.save(str(tmp), compress=True)
    n_analyses = sum(len(s["analyses"]) for s in studyset["studies"])
    log.info(
        "nimare export: %d studies, %d analyses, %d points, image types %s",
        len(studyset["studies"]),
        n_analyses,
        len(dset.coordinates),
        sorted(
            c
            for c in dset.images.columns
            if c not in ("id", "study_id", "contrast_id", "space") and "__" not in c
        ),
    )
    return studyset, dset
