"""IBMA vs CBMA: where the image-based and the coordinate-based meta-analyses of an analysis agree.

:func:`overlap` is the ``cbma_overlap`` rule: voxel overlap (Dice) of every IBMA method's FDR map with
every CBMA method's FWE maps, and each CBMA cluster matched to an IBMA cluster with the distance
between their peaks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.cbma import _frozen_gc
from nvmeta.cbma.estimate import LEVEL_MAPS, significant_mask
from nvmeta.io import write_tsv

logger = logging.getLogger(__name__)

__all__ = ["CLUSTER_MATCH_COLUMNS", "OVERLAP_COLUMNS", "overlap"]

OVERLAP_COLUMNS = [
    "ibma_method",
    "cbma_method",
    "cbma_level",
    "sign",
    "n_ibma",
    "n_cbma",
    "n_both",
    "dice",
    "n_cbma_clusters",
    "n_matched_clusters",
    "peak_distance_median_mm",
    "peak_distance_max_mm",
]
CLUSTER_MATCH_COLUMNS = [
    "ibma_method",
    "cbma_method",
    "cbma_level",
    "cbma_cluster",
    "cbma_voxels",
    "cbma_x",
    "cbma_y",
    "cbma_z",
    "ibma_voxels",
    "ibma_peak_x",
    "ibma_peak_y",
    "ibma_peak_z",
    "n_both",
    "peak_distance_mm",
]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    # Face connectivity, as nilearn's cluster tables.
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))


def _peak_xyz(values: np.ndarray, labels: np.ndarray, k: int, affine: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(labels.ravel() == k)
    best = idx[np.argmax(values.ravel()[idx])]
    ijk = np.array(np.unravel_index(best, labels.shape), dtype=float)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _local_maxima(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Voxels of ``found`` not exceeded by any of their 26 neighbours (a boolean map)."""
    from scipy import ndimage

    v = np.where(found, values, -np.inf)
    return found & (v >= ndimage.maximum_filter(v, size=3, mode="constant", cval=-np.inf))


def overlap(
    ibma_dirs: dict[str, Path],
    cbma_dirs: dict[str, Path],
    mask_img: nib.Nifti1Image,
    cfg: dict,
    out_tsv: str | os.PathLike,
    out_clusters_tsv: str | os.PathLike,
    out_png: str | os.PathLike | None = None,
    log: logging.Logger | None = None,
) -> Any:
    """Compare every IBMA method's FDR map with every CBMA method's FWE maps.

    An IBMA voxel is "found" where ``meta/{method}/z_fdr.nii.gz`` is finite and of the sign
    ``cbma.sign`` (positive: ``> 0``); a CBMA voxel where NiMARE's cluster-level (by size)
    or voxel-level FWE p is below ``cbma.cluster_threshold``. Both are restricted to the
    template mask. Dice = ``2 |A ∩ B| / (|A| + |B|)`` (empty when both are empty).

    Clusters (face-connected) are matched CBMA -> IBMA: each CBMA cluster's match is the IBMA
    cluster sharing most voxels with it (none when it shares none). The peak distance is from
    the CBMA cluster's maximum z to the nearest local maximum of the IBMA (signed) z in the
    matched cluster (a voxel no 26-neighbour exceeds), in mm: IBMA clusters of many maps are
    often one large cluster spanning several regions, whose single maximum says nothing about
    a given CBMA cluster.

    Parameters
    ----------
    ibma_dirs, cbma_dirs : dict
        ``method -> results/analyses/{a}/meta/{method}/`` and ``-> .../cbma/{method}/``.
    mask_img : nibabel.Nifti1Image
        Template mask.
    cfg : dict
        The analysis' ``cbma`` block (``sign``, ``cluster_threshold``).
    out_tsv : path-like
        ``overlap.tsv``, columns :data:`OVERLAP_COLUMNS`, one row per (IBMA method, CBMA
        method, level).
    out_clusters_tsv : path-like
        One row per CBMA cluster and IBMA method (:data:`CLUSTER_MATCH_COLUMNS`).
    out_png : path-like, optional
        Figure: the first IBMA method's FDR map with each CBMA method's cluster-FWE outline.
    log : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    pandas.DataFrame
        The overlap table.
    """
    import pandas as pd

    from nvmeta.images.download import remove_stale_temps

    remove_stale_temps(*(p for p in (out_tsv, out_clusters_tsv, out_png) if p is not None))
    log = log or logger
    mask = np.asarray(mask_img.dataobj) > 0
    sgn = 1.0 if cfg["sign"] == "positive" else -1.0
    alpha = float(cfg["cluster_threshold"])
    ibma, cbma = _found(ibma_dirs, cbma_dirs, mask, sgn, alpha)

    rows, match_rows = [], []
    for iname, (iz, imask) in ibma.items():
        ilab, _ = _components(imask)
        imax = _local_maxima(iz, imask)
        for (cname, level), (cz, cmask) in cbma.items():
            n_i, n_c = int(imask.sum()), int(cmask.sum())
            n_both = int((imask & cmask).sum())
            dice = 2.0 * n_both / (n_i + n_c) if n_i + n_c else np.nan
            clab, n_cl = _components(cmask)
            matched = _match_clusters(ilab, imax, cz, clab, n_cl, mask_img.affine)
            keys = {"ibma_method": iname, "cbma_method": cname, "cbma_level": level}
            match_rows += [{**keys, **row} for row, _ in matched]
            dists = [dist for _, dist in matched if dist is not None]
            rows.append(
                {
                    "ibma_method": iname,
                    "cbma_method": cname,
                    "cbma_level": level,
                    "sign": cfg["sign"],
                    "n_ibma": n_i,
                    "n_cbma": n_c,
                    "n_both": n_both,
                    "dice": dice,
                    "n_cbma_clusters": int(n_cl),
                    "n_matched_clusters": len(dists),
                    "peak_distance_median_mm": float(np.median(dists)) if dists else np.nan,
                    "peak_distance_max_mm": float(np.max(dists)) if dists else np.nan,
                }
            )
            log.info(
                "overlap %s vs %s (%s FWE): Dice %.3f (%d IBMA, %d CBMA, %d shared voxels), "
                "%d/%d CBMA clusters matched",
                iname,
                cname,
                level,
                dice,
                n_i,
                n_c,
                n_both,
                len(dists),
                n_cl,
            )
    table = pd.DataFrame(rows, columns=OVERLAP_COLUMNS)
    write_tsv(out_tsv, table)
    write_tsv(out_clusters_tsv, pd.DataFrame(match_rows, columns=CLUSTER_MATCH_COLUMNS))
    if out_png is not None:
        first = next(iter(ibma_dirs))
        with _frozen_gc():
            from nvmeta.figures.cbma_maps import plot_overlap

            plot_overlap(ibma_dirs[first], first, cbma_dirs, table, mask_img, alpha, sgn, Path(out_png))
    return table


def _found(ibma_dirs, cbma_dirs, mask, sgn, alpha) -> tuple[dict, dict]:
    """The "found" voxels of every map compared, with the z they are ranked by (sign applied for IBMA).

    Returns ``({ibma method: (z, found)}, {(cbma method, level): (z, found)})``.
    """
    ibma: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, d in ibma_dirs.items():
        z = np.asarray(nib.load(Path(d) / "z_fdr.nii.gz").dataobj, dtype=np.float64)
        z = np.nan_to_num(z, nan=0.0) * sgn
        ibma[name] = (z, (z > 0) & mask)
    cbma: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for name, d in cbma_dirs.items():
        z = np.nan_to_num(np.asarray(nib.load(Path(d) / "z.nii.gz").dataobj, dtype=np.float64), nan=0.0)
        for level, map_name in LEVEL_MAPS.items():
            logp = np.asarray(nib.load(Path(d) / f"{map_name}.nii.gz").dataobj)
            cbma[(name, level)] = (z, significant_mask(logp, alpha) & mask)
    return ibma, cbma


def _match_clusters(ilab, imax, cz, clab, n_cl, affine) -> list[tuple[dict[str, Any], float | None]]:
    """Each CBMA cluster matched to the IBMA cluster sharing most voxels with it (see :func:`overlap`).

    Returns one ``(row, distance)`` per CBMA cluster: the row's :data:`CLUSTER_MATCH_COLUMNS` after the
    method and level, and the unrounded peak distance in mm (None when no IBMA cluster shares a voxel).
    """
    out = []
    for k in range(1, n_cl + 1):
        in_k = clab == k
        shared = ilab[in_k & (ilab > 0)]
        cxyz = _peak_xyz(cz, clab, k, affine)
        row = {
            "cbma_cluster": k,
            "cbma_voxels": int(in_k.sum()),
            "cbma_x": cxyz[0],
            "cbma_y": cxyz[1],
            "cbma_z": cxyz[2],
            "ibma_voxels": None,
            "ibma_peak_x": None,
            "ibma_peak_y": None,
            "ibma_peak_z": None,
            "n_both": int(shared.size),
            "peak_distance_mm": None,
        }
        dist = None
        if shared.size:
            best = int(np.bincount(shared).argmax())
            cand = np.argwhere(imax & (ilab == best)).astype(float)
            cand_xyz = cand @ affine[:3, :3].T + affine[:3, 3]
            ixyz = cand_xyz[np.argmin(np.linalg.norm(cand_xyz - cxyz, axis=1))]
            dist = float(np.linalg.norm(cxyz - ixyz))
            row.update(
                ibma_voxels=int((ilab == best).sum()),
                ibma_peak_x=ixyz[0],
                ibma_peak_y=ixyz[1],
                ibma_peak_z=ixyz[2],
                peak_distance_mm=round(dist, 3),
            )
        out.append((row, dist))
    return out
