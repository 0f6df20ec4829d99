"""Planted truth for CBMA tests and benchmarks: a results folder of z-maps with known foci.

Every map is Gaussian blobs (peak z ``amplitude``, sd ``sigma`` mm) at :data:`FOCI` (positive)
and :data:`NEG_FOCUS` (negative) plus seeded white noise, on the template grid, with the
per-image files the fan-ins read (``zmap.nii.gz``, ``qc.json``, ``metadata.json``) and an
analysis ``qc.tsv``, laid out as the workflow writes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

#: Positive planted foci (MNI mm, voxel centres of the 2 mm grid).
FOCI = [(40.0, -20.0, 10.0), (-40.0, -20.0, 10.0), (2.0, 10.0, 40.0)]
#: Negative planted focus.
NEG_FOCUS = (0.0, -60.0, 30.0)


def write_planted(
    root: str | os.PathLike,
    mask_img: nib.Nifti1Image,
    n_images: int = 20,
    *,
    seed: int = 0,
    analysis: str = "planted",
    collection_of: Callable[[int], int] | None = None,
    sample_size_of: Callable[[int], int | None] | None = None,
    amplitude: float = 6.0,
    sigma: float = 5.0,
    noise: float = 0.3,
    first_id: int = 1000,
) -> Path:
    """Write ``n_images`` planted maps under ``root/images`` and ``root/analyses/{analysis}/qc.tsv``.

    Parameters
    ----------
    root : path-like
        The results folder to create.
    mask_img : nibabel.Nifti1Image
        Template mask (its grid is the maps' grid; NaN outside it).
    n_images : int
        Number of maps (image ids ``first_id, first_id + 1, ...``).
    seed : int
        Noise seed.
    analysis : str
        Analysis name.
    collection_of : callable, optional
        ``k -> collection id`` of the k-th map (default: one collection per map, ``500 + k``).
    sample_size_of : callable, optional
        ``k -> n`` written to qc.json (default ``20 + k``); the NeuroVault record gets a
        different number so that a consumer reading the record instead of qc.json is caught.
    amplitude, sigma, noise : float
        Blob peak z, blob sd (mm), noise sd.
    first_id : int
        First image id.

    Returns
    -------
    pathlib.Path
        ``root/analyses/{analysis}/qc.tsv``.
    """
    import pandas as pd

    root = Path(root)
    rng = np.random.default_rng(seed)
    mask = np.asarray(mask_img.dataobj) > 0
    affine = mask_img.affine
    ijk = np.indices(mask.shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk).T + affine[:3, 3]
    blobs = np.zeros(xyz.shape[0])
    for focus in FOCI:
        blobs += amplitude * np.exp(-((xyz - np.array(focus)) ** 2).sum(1) / (2 * sigma**2))
    blobs -= amplitude * np.exp(-((xyz - np.array(NEG_FOCUS)) ** 2).sum(1) / (2 * sigma**2))
    blobs = blobs.reshape(mask.shape)
    rows = []
    for k in range(n_images):
        image_id = first_id + k
        cid = collection_of(k) if collection_of else 500 + k
        n = sample_size_of(k) if sample_size_of else 20 + k
        z = (blobs + noise * rng.standard_normal(mask.shape)).astype(np.float32)
        z[~mask] = np.nan
        d = root / "images" / str(image_id)
        d.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(z, affine)
        img.header.set_data_dtype(np.float32)
        nib.save(img, d / "zmap.nii.gz")
        qc = {
            "image_id": image_id,
            "collection_id": cid,
            "status": "included",
            "n": n,
            "map_type": "Z map",
            "df": None,
        }
        (d / "qc.json").write_text(json.dumps(qc))
        record = {
            "id": image_id,
            "url": f"https://neurovault.org/images/{image_id}/",
            "collection_id": cid,
            "name": f"planted map {image_id}",
            "map_type": "Z map",
            "number_of_subjects": 999,  # not the sample size: consumers read qc.json's resolved n
            "contrast_definition": "painful heat vs warm",
            "cognitive_paradigm_cogatlas": "pain monitor/discrimination task",
            "cognitive_paradigm_cogatlas_id": "trm_4da890594742a",
            "nvmeta": {
                "status": "ok",
                "collection": {
                    "id": cid,
                    "name": f"planted collection {cid}",
                    "DOI": f"10.9999/planted.{cid}",
                },
            },
        }
        (d / "metadata.json").write_text(json.dumps(record))
        rows.append(
            {"image_id": image_id, "collection_id": cid, "status": "included", "number_of_subjects": 999}
        )
    qc_tsv = root / "analyses" / analysis / "qc.tsv"
    qc_tsv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(qc_tsv, sep="\t", index=False)
    return qc_tsv
