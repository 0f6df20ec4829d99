"""Planted truth for the QC rules: a selection of good maps and of bad maps of every kind the rules catch.

:func:`write_qc_selection` writes, under a results folder, the per-image files the QC job reads (the
download's ``metadata.json`` and ``map.nii.gz``, converted by the real per-image job
:func:`nvmeta.images.zmap.make_zmap`) and the analysis' ``selection.tsv``, and returns which kind each
image was planted as (:data:`BAD_KINDS`, or ``"good"``).

Good maps share one pattern (three positive foci and one negative, placed relative to the mask's
bounding box, jittered by a voxel) at a random strength, plus smooth noise; their names include words
that a substring test mistakes for the excluded terms ("lexical", "physical", "musical"). Bad maps:

- ``name``: a good-looking map whose name says ICA component, PPI, seed or connectivity, correlation;
- ``file``: a cope (parameter estimates, small values), a TFCE map (1 - p), a BIDS single-subject file;
- ``single_subject``: labelled group with ``number_of_subjects = 1``;
- ``weak``: |z| < 1.96 everywhere (an effect-size map);
- ``huge``: a map stored scaled (max |z| 60-80);
- ``low_coverage``: data on a quarter of the mask;
- ``duplicate`` / ``flipped_copy``: an exact or a negated copy of an earlier good map;
- ``inverted``: the pattern with the opposite sign (B > A) and its own noise;
- ``outlier``: another task's pattern (foci elsewhere) with its own noise;
- ``noise`` (not planted by default): smooth noise only, no pattern (an unrelated or failed map).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from nvmeta.workflow.config import defaults

#: The bad kinds, with how many of each :func:`write_qc_selection` plants by default.
BAD_KINDS = {
    "name": 4,
    "file": 3,
    "single_subject": 2,
    "weak": 2,
    "huge": 2,
    "low_coverage": 2,
    "duplicate": 2,
    "flipped_copy": 2,
    "inverted": 3,
    "outlier": 3,
}
#: Names of the good maps (a substring test for "ica" drops the first three).
GOOD_NAMES = ["lexical decision > rest", "physical pain > warmth", "musical > silence", "2-back > 0-back"]
NAME_BAD = [
    "ICA component 7",
    "gPPI amygdala x faces",
    "Seed-based connectivity of PCC",
    "correlation with RT",
]
FILE_BAD = ["cope1.nii.gz", "tfce_corrp_tstat1.nii.gz", "sub-07_task-faces_zstat1.nii.gz"]
#: Foci of the shared pattern and of the other task, as fractions of the mask's bounding box.
FOCI = [(0.25, 0.45, 0.5, 1.0), (0.75, 0.45, 0.5, 1.0), (0.5, 0.65, 0.7, 1.0), (0.5, 0.2, 0.6, -1.0)]
OTHER_FOCI = [(0.3, 0.85, 0.3, 1.0), (0.7, 0.85, 0.3, 1.0), (0.5, 0.85, 0.85, 1.0)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.standard_normal(shape), sigma)
    return x / x.std()


def _pattern(mask: np.ndarray, foci, sigma: float, jitter: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    grid = np.indices(mask.shape).astype(np.float64)
    out = np.zeros(mask.shape)
    for fx, fy, fz, sign in foci:
        c = lo + np.array([fx, fy, fz]) * (hi - lo) + jitter
        d2 = sum((grid[a] - c[a]) ** 2 for a in range(3))
        out += sign * np.exp(-d2 / (2 * sigma**2))
    return out


def write_qc_selection(
    root: str | os.PathLike,
    mask_img: nib.Nifti1Image,
    n_good: int = 30,
    bad: dict[str, int] | None = None,
    *,
    seed: int = 0,
    analysis: str = "planted",
    sigma_vox: float = 3.0,
    noise_sigma_vox: float = 1.5,
    first_id: int = 5000,
) -> tuple[Path, dict[int, str]]:
    """Write a planted selection; return ``(selection.tsv, {image_id: kind})``.

    Parameters
    ----------
    root : path-like
        The results folder (``images/{id}/`` and ``analyses/{analysis}/selection.tsv``).
    mask_img : nibabel.Nifti1Image
        Template mask; maps are written on its grid (NaN outside it).
    n_good : int
        Number of good maps.
    bad : dict, optional
        ``kind -> count`` (default :data:`BAD_KINDS`).
    seed : int
        Random seed (strengths, jitter, noise, order).
    analysis : str
        Analysis name.
    sigma_vox, noise_sigma_vox : float
        Blob sd and noise smoothing sd, in voxels.
    first_id : int
        First image id.
    """
    import pandas as pd

    from nvmeta.images.zmap import make_zmap
    from nvmeta.select.query import SELECTION_COLUMNS

    root = Path(root)
    rng = np.random.default_rng(seed)
    mask = np.asarray(mask_img.dataobj) > 0
    bad = dict(BAD_KINDS if bad is None else bad)

    def pattern(foci=FOCI) -> np.ndarray:
        return _pattern(mask, foci, sigma_vox, rng.uniform(-1, 1, 3))

    def good_map() -> np.ndarray:
        return rng.uniform(3.0, 7.0) * pattern() + _smooth_noise(rng, mask.shape, noise_sigma_vox)

    plan: list[tuple[str, dict]] = [("good", {}) for _ in range(n_good)]
    for kind, count in bad.items():
        plan += [(kind, {"k": k}) for k in range(count)]
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    first_good = next(i for i, (kind, _) in enumerate(plan) if kind == "good")
    plan.insert(0, plan.pop(first_good))  # every copy has an original before it
    # copies come after the map they copy: the first good maps are the originals
    goods = [i for i, (kind, _) in enumerate(plan) if kind == "good"]
    rows, truth, made = [], {}, {}
    for pos, (kind, extra) in enumerate(plan):
        image_id = first_id + pos
        k = extra.get("k", 0)
        rec = {"name": GOOD_NAMES[pos % len(GOOD_NAMES)], "file": f"zstat{pos}.nii.gz", "n": 20 + pos % 30}
        if kind in ("good", "name", "file", "single_subject"):
            z = good_map()
        elif kind == "weak":
            z = 0.3 * good_map() / 7.0
        elif kind == "huge":  # max |z| 60-80: above qc.max_abs_z, below the per-image effect-size bound
            z = good_map()
            z *= rng.uniform(60.0, 80.0) / np.abs(z[mask]).max()
        elif kind == "low_coverage":
            z = good_map()
            z[:, :, int(0.25 * mask.shape[2]) :] = np.nan
        elif kind in ("duplicate", "flipped_copy"):
            src = max(g for g in goods if g < pos)  # the latest good map before this one
            z = made[src].copy() if kind == "duplicate" else -made[src]
        elif kind == "inverted":
            z = -good_map()
        elif kind == "outlier":
            z = rng.uniform(3.0, 7.0) * pattern(OTHER_FOCI) + _smooth_noise(rng, mask.shape, noise_sigma_vox)
        elif kind == "noise":
            z = 1.3 * _smooth_noise(rng, mask.shape, noise_sigma_vox)
        else:
            raise ValueError(f"unknown planted kind {kind!r}")
        z = np.where(mask, _label(kind, k, rec, z), np.nan).astype(np.float32)
        made[pos] = z
        truth[image_id] = kind
        rows.append(_write_image(root, image_id, z, mask_img, rec, make_zmap))
    sel = pd.DataFrame(rows).reindex(columns=list(SELECTION_COLUMNS))
    sel_path = root / "analyses" / analysis / "selection.tsv"
    sel_path.parent.mkdir(parents=True, exist_ok=True)
    sel.to_csv(sel_path, sep="\t", index=False)
    return sel_path, truth


def _label(kind: str, k: int, rec: dict, z: np.ndarray) -> np.ndarray:
    """The name, file name or sample size of a bad map of the record rules (``rec`` in place)."""
    if kind == "name":
        rec["name"] = NAME_BAD[k % len(NAME_BAD)]
    elif kind == "file":
        rec["file"] = FILE_BAD[k % len(FILE_BAD)]
        if rec["file"].startswith("cope"):
            return z / 5.0  # parameter estimates: a few percent signal change
    elif kind == "single_subject":
        rec["n"] = 1
    return z


def _write_image(root: Path, image_id: int, z: np.ndarray, mask_img, rec: dict, make_zmap) -> dict:
    """The download's files of one image, converted by the per-image job; its selection row."""
    d = root / "images" / str(image_id)
    d.mkdir(parents=True, exist_ok=True)
    url = f"https://neurovault.org/media/images/77/{rec['file']}"
    meta = {
        "id": image_id,
        "collection_id": 77,
        "name": rec["name"],
        "map_type": "Z map",
        "analysis_level": "group",
        "number_of_subjects": rec["n"],
        "file": url,
        "nvmeta": {"status": "ok", "reason": None},
    }
    (d / "metadata.json").write_text(json.dumps(meta))
    nib.save(nib.Nifti1Image(z, mask_img.affine), d / "map.nii.gz")
    make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        mask_img,
        {**defaults("conversion"), "df": "n-1"},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
    )
    return {
        "image_id": image_id,
        "collection_id": 77,
        "name": rec["name"],
        "map_type": "Z map",
        "analysis_level": "group",
        "number_of_subjects": rec["n"],
        "file": url,
    }
