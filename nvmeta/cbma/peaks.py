"""The peaks of each map for the CBMA: those of what survives the map's own corrected inference.

Authors report the peaks of the clusters that survive their inference (typically a dozen or so per
contrast), and ALE's kernels and null assume peaks of that kind, not every local maximum of an
unthresholded map. With ``cbma.peaks_from: corrected`` (the default) each map is tested on its own,
each sign one-sided as its own contrast (SPM and FSL test A > B and B > A), at ``cbma.peak_alpha``:

- ``cbma.peak_correction: cluster_fwe`` (default): cluster-level family-wise inference by random
  field theory, what most published maps went through (SPM, FSL): clusters of
  ``z > cbma.peak_threshold`` (3.1, p < 0.001) whose size is significant given the map's
  smoothness, estimated from the map itself (:mod:`nvmeta.cbma.rft`; NeuroVault's
  ``smoothness_fwhm`` is mostly missing).
- ``ari``: the clusters at the same threshold that hold at least one truly active voxel at
  family-wise level alpha by All-Resolution Inference (Rosenblatt et al. 2018; nilearn's public
  :func:`~nilearn.glm.cluster_level_inference`): no smoothness needed, valid for positively
  dependent fields, but powerless on maps whose strongest voxel is below z ~ 5 (on the demo's
  21 pain maps it finds no positive cluster in 5 maps where cluster_fwe finds 12-24 peaks).
- ``fdr`` / ``bonferroni``: voxel-level Benjamini-Hochberg FDR or Bonferroni FWE over the map's
  voxels, through nilearn's public :func:`~nilearn.glm.threshold_stats_img`.

The map's degrees of freedom entered when its t was converted to z (``qc.json`` ``df``), so the
p values of its z are exact. Peaks are then taken from nilearn's
:func:`~nilearn.reporting.get_clusters_table` rows of each surviving cluster of at least
``cbma.min_cluster_voxels`` voxels (:func:`nvmeta.meta.clusters.peaks_table`): its maximum and
sub-peaks at least ``cbma.peak_distance`` mm apart, at most ``cbma.max_peaks_per_cluster``
(SPM's results table: 3 maxima, 8 mm apart). ``peaks_from: unthresholded`` takes every cluster of
``|z| >= cbma.peak_threshold`` (one threshold for every map, no correction).

Per map and sign, ``peak_thresholds.tsv`` records the threshold, the surviving voxels, clusters
and peaks.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.io import read_json, write_tsv

logger = logging.getLogger(__name__)

#: Columns of ``peaks.tsv``.
PEAK_COLUMNS = [
    "image_id",
    "collection_id",
    "sign",
    "peak",
    "x",
    "y",
    "z",
    "z_value",
    "cluster_voxels",
    "sample_size",
]
#: Columns of ``peak_thresholds.tsv`` (one row per map and sign).
THRESHOLD_COLUMNS = [
    "image_id",
    "sign",
    "peaks_from",
    "correction",
    "alpha",
    "z_threshold",
    "cluster_k",
    "fwhm_mm",
    "n_voxels",
    "n_clusters",
    "n_peaks",
]
_PEAK_FIELDS = ["sign", "peak", "x", "y", "z", "z_value", "cluster_voxels"]
SIGNS = {"positive": 1.0, "negative": -1.0}


def surviving(data: np.ndarray, valid: np.ndarray, affine: np.ndarray, sign: float, cfg: dict) -> dict:
    """The voxels of one sign that survive the map's inference, and the thresholds used.

    Parameters
    ----------
    data : ndarray, float32, (I, J, K)
        The z-map with no data as 0.
    valid : ndarray of bool
        The voxels with data (the tests run over these).
    affine : ndarray
        The grid's affine.
    sign : float
        1.0 for the positive contrast, -1.0 for the negative one (tested one-sided on ``-z``).
    cfg : dict
        The analysis' ``cbma`` block.

    Returns
    -------
    dict
        ``above`` (bool array: ``sign * z`` above the threshold, in surviving clusters),
        ``z_threshold`` (``inf`` when no voxel can pass; the cluster-forming threshold for
        cluster_fwe and ari), ``cluster_k`` (cluster_fwe: the critical size, voxels) and
        ``fwhm_mm`` (cluster_fwe: the map's smoothness, geometric mean over the axes).
    """
    signed = data * np.float32(sign)
    out = {
        "above": np.zeros(data.shape, dtype=bool),
        "z_threshold": float("inf"),
        "cluster_k": None,
        "fwhm_mm": None,
    }
    if cfg["peaks_from"] == "unthresholded":
        thr = float(cfg["peak_threshold"])
        return {**out, "above": valid & (signed >= np.float32(thr)), "z_threshold": thr}
    if not valid.any():
        return out
    alpha = float(cfg["peak_alpha"])
    method = cfg["peak_correction"]
    if method == "cluster_fwe":
        return {**out, **_cluster_fwe(signed, valid, affine, float(cfg["peak_threshold"]), alpha)}
    # float64: nilearn compares the map with its float64 threshold in the map's dtype, and in
    # float32 the voxel that sets the Benjamini-Hochberg threshold would fall below it
    img = nib.Nifti1Image(signed.astype(np.float64), affine)
    mask = nib.Nifti1Image(valid.astype(np.uint8), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # nilearn's notes on masks and dtypes
        if method == "ari":
            from nilearn.glm import cluster_level_inference

            thr = float(cfg["peak_threshold"])
            tdp = cluster_level_inference(img, mask_img=mask, threshold=thr, alpha=alpha)
            return {**out, "above": valid & (np.asarray(tdp.dataobj) > 0), "z_threshold": thr}
        from nilearn.glm import threshold_stats_img

        img_thr, thr = threshold_stats_img(
            img, mask_img=mask, alpha=alpha, height_control=method, cluster_threshold=0, two_sided=False
        )
    return {**out, "above": valid & (np.asarray(img_thr.dataobj) > 0), "z_threshold": float(thr)}


def _cluster_fwe(signed: np.ndarray, valid: np.ndarray, affine: np.ndarray, u: float, alpha: float) -> dict:
    """Clusters of ``signed > u`` at least as large as random field theory's critical size (:mod:`nvmeta.cbma.rft`)."""
    from scipy import ndimage

    from nvmeta.cbma.rft import critical_cluster_size, smoothness_fwhm

    fwhm = smoothness_fwhm(signed, valid)
    voxel_mm = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(fwhm)):
        logger.warning(
            "cluster_fwe: the map's smoothness cannot be estimated (FWHM %s voxels): no peaks", fwhm
        )
        return {"z_threshold": u}
    k = critical_cluster_size(int(valid.sum()), fwhm, u, alpha)
    # face connectivity, as the cluster tables (nvmeta.meta.clusters): never larger than SPM's 18
    labels, n = ndimage.label(valid & (signed > np.float32(u)))
    sizes = np.bincount(labels.ravel())
    keep = np.flatnonzero(sizes >= k)
    keep = keep[keep > 0]
    return {
        "above": np.isin(labels, keep) if n else np.zeros(signed.shape, dtype=bool),
        "z_threshold": u,
        "cluster_k": int(k),
        "fwhm_mm": float(np.prod(fwhm * voxel_mm) ** (1 / 3)),
    }


def _truncate(table: Any, max_peaks: int) -> Any:
    """At most ``max_peaks`` rows per cluster (its maximum ``3``, then ``3a``, ``3b``, ...)."""
    sub = table["Cluster ID"].str.replace(r"^[0-9]+", "", regex=True)
    rank = sub.map(lambda s: 0 if not s else ord(s) - ord("a") + 1)
    return table[rank < max_peaks]


def map_peaks(z_img: nib.Nifti1Image, cfg: dict) -> tuple[Any, list[dict]]:
    """Peaks of one z-map (both signs) and, per sign, what survived.

    Parameters
    ----------
    z_img : nibabel.Nifti1Image
        A template-grid z-map (NaN = no data).
    cfg : dict
        The analysis' ``cbma`` block.

    Returns
    -------
    peaks : pandas.DataFrame
        Columns ``sign``, ``peak`` (nilearn's cluster id, clusters numbered positive first),
        ``x, y, z`` (mm), ``z_value``, ``cluster_voxels``; empty when nothing survives.
    summary : list of dict
        Per sign: ``sign``, ``z_threshold``, ``cluster_k``, ``fwhm_mm`` (:func:`surviving`),
        ``n_voxels``, ``n_clusters``, ``n_peaks``.
    """
    import nilearn.glm  # noqa: F401 - imported before the heap is frozen
    import nilearn.reporting  # noqa: F401

    from nvmeta.cbma import _frozen_gc

    # nilearn collects garbage for every image it loads, i.e. every cluster of every map
    with _frozen_gc():
        return _map_peaks(z_img, cfg)


def _map_peaks(z_img: nib.Nifti1Image, cfg: dict) -> tuple[Any, list[dict]]:
    import pandas as pd

    from nvmeta.meta.clusters import peaks_table

    data = np.asarray(z_img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    valid = np.isfinite(data)
    # NaN means "no data": it can never pass a threshold (0 is below every threshold)
    data = np.where(valid, data, 0.0).astype(np.float32)
    parts, summary, n_clusters = [], [], 0
    for name, sign in SIGNS.items():
        res = surviving(data, valid, z_img.affine, sign, cfg)
        above = res["above"]
        # per-cluster nilearn tables (peaks_table crops each cluster: same rows as the full volume)
        table = peaks_table(data, z_img.affine, lambda _signed, above=above: above, signs=(sign,),
                            min_voxels=int(cfg["min_cluster_voxels"]), min_distance=float(cfg["peak_distance"]))  # fmt: skip
        table = _truncate(table, int(cfg["max_peaks_per_cluster"]))
        clusters = int(table["Cluster ID"].str.fullmatch(r"[0-9]+").sum())
        if len(table):
            ids = table["Cluster ID"].str.extract(r"^([0-9]+)(.*)$")
            table = table.assign(**{"Cluster ID": (ids[0].astype(int) + n_clusters).astype(str) + ids[1]})
            parts.append(table)
        n_clusters += clusters
        summary.append(
            {"sign": name, "z_threshold": res["z_threshold"], "cluster_k": res["cluster_k"], "fwhm_mm": res["fwhm_mm"],
             "n_voxels": int(above.sum()), "n_clusters": clusters, "n_peaks": len(table)}
        )  # fmt: skip
    if not parts:
        return pd.DataFrame(columns=_PEAK_FIELDS), summary
    table = pd.concat(parts, ignore_index=True)
    z_value = table["Peak Stat"].astype(np.float64)
    peaks = pd.DataFrame(
        {
            "sign": np.where(z_value > 0, "positive", "negative"),
            "peak": table["Cluster ID"],
            "x": table["X"].astype(np.float64),
            "y": table["Y"].astype(np.float64),
            "z": table["Z"].astype(np.float64),
            "z_value": z_value,
            # the size of the peak's cluster on its sub-peak rows too
            "cluster_voxels": table["Cluster Size (voxels)"].ffill().astype(np.int64),
        }
    )[_PEAK_FIELDS]
    return peaks, summary


def extract_peaks(z_img: nib.Nifti1Image, cfg: dict) -> Any:
    """Peaks of one z-map (both signs): :func:`map_peaks` without the summary."""
    return map_peaks(z_img, cfg)[0]


def peaks_table(
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], Path],
    qc_json_for: Callable[[int], Path],
    cfg: dict,
    out_tsv: str | os.PathLike,
    log: logging.Logger | None = None,
    thresholds_tsv: str | os.PathLike | None = None,
) -> Any:
    """Extract the peaks of every included map of an analysis and write ``peaks.tsv``.

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' ``qc.tsv`` (rows with status ``included`` are used, in file order).
    zmap_path_for, qc_json_for : callable
        ``image_id -> Path`` of the image's template-grid ``zmap.nii.gz`` / its ``qc.json``
        (whose ``n`` is the image's one resolved sample size).
    cfg : dict
        The analysis' ``cbma`` block.
    out_tsv : path-like
        ``results/analyses/{a}/cbma/peaks.tsv`` (columns :data:`PEAK_COLUMNS`).
    log : logging.Logger, optional
        Defaults to the module logger.
    thresholds_tsv : path-like, optional
        ``cbma/peak_thresholds.tsv`` (columns :data:`THRESHOLD_COLUMNS`).

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import pandas as pd

    from nvmeta.cbma import read_included
    from nvmeta.images.download import remove_stale_temps

    remove_stale_temps(*(p for p in (out_tsv, thresholds_tsv) if p is not None))
    log = log or logger
    rows = read_included(qc_tsv)
    parts, sums, no_peaks = [], [], []
    t0 = time.perf_counter()
    for row in rows.itertuples(index=False):
        image_id = int(row.image_id)
        n = read_json(qc_json_for(image_id)).get("n")
        peaks, summary = map_peaks(nib.load(zmap_path_for(image_id)), cfg)
        correction = cfg["peak_correction"] if cfg["peaks_from"] == "corrected" else "none"
        alpha = cfg["peak_alpha"] if cfg["peaks_from"] == "corrected" else None
        sums += [{"image_id": image_id, "peaks_from": cfg["peaks_from"], "correction": correction,
                  "alpha": alpha, **s} for s in summary]  # fmt: skip
        if peaks.empty:
            no_peaks.append(image_id)
            continue
        peaks.insert(0, "collection_id", row.collection_id)
        peaks.insert(0, "image_id", image_id)
        peaks["sample_size"] = n
        parts.append(peaks)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PEAK_COLUMNS)
    table = table[PEAK_COLUMNS]
    table["collection_id"] = table["collection_id"].astype("Int64")
    table["sample_size"] = pd.to_numeric(table["sample_size"], errors="coerce").astype("Int64")
    seconds = time.perf_counter() - t0
    _log_summary(log, table, rows, sums, no_peaks, cfg, seconds)
    write_tsv(out_tsv, table)
    if thresholds_tsv is not None:
        write_tsv(thresholds_tsv, pd.DataFrame(sums, columns=THRESHOLD_COLUMNS))
    return table


def _log_summary(log, table, rows, sums, no_peaks, cfg, seconds) -> None:
    pos = [s["n_peaks"] for s in sums if s["sign"] == "positive"]
    how = (
        f"{cfg['peak_correction']} at {cfg['peak_alpha']:g}"
        if cfg["peaks_from"] == "corrected"
        else f"|z| >= {cfg['peak_threshold']:g}, uncorrected"
    )
    log.info(
        "peaks (%s, <= %d per cluster): %d peaks (%d positive, %d negative) from %d maps; positive peaks per map: "
        "median %s, range %s-%s; %.2f s (%.1f ms per map)",
        how, cfg["max_peaks_per_cluster"], len(table), int((table["sign"] == "positive").sum()),
        int((table["sign"] == "negative").sum()), len(rows), np.median(pos) if pos else "-",
        min(pos) if pos else "-", max(pos) if pos else "-", seconds, 1000 * seconds / max(len(rows), 1),
    )  # fmt: skip
    if no_peaks:
        log.warning(
            "peaks: %d map(s) have no surviving cluster of >= %d voxels (%s), so no peak "
            "(they cannot enter the CBMA): %s",
            len(no_peaks),
            cfg["min_cluster_voxels"],
            how,
            no_peaks,
        )
