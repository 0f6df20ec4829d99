"""Writing a method's outputs: maps (``.nii.gz``), cluster tables, the figure and ``summary.json``.

Every file is written through :func:`nvmeta.io.atomic_path` (a partial file never appears at an
output path); :func:`sweep` removes the temporaries a killed earlier attempt of the same job left.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)

#: Every file name a method may write into ``meta/{method}/`` (the sweep covers them all).
OUTPUT_NAMES = (
    "z.nii.gz", "p.nii.gz", "logp.nii.gz", "k.nii.gz", "q.nii.gz", "z_fdr.nii.gz", "z_bonf.nii.gz",
    "p_fwe.nii.gz", "z_fwe.nii.gz", "est.nii.gz", "se.nii.gz", "tau2.nii.gz", "Q.nii.gz", "I2.nii.gz",
    "clusters.tsv", "clusters_bonf.tsv", "clusters_fwe.tsv", "jackknife.tsv", "z.png", "summary.json",
)  # fmt: skip


def sweep(outdir: Path) -> list[Path]:
    """Remove stale temporaries (``.{name}.*.part*``) of this method's outputs in ``outdir``."""
    from nvmeta.images.download import remove_stale_temps

    removed = remove_stale_temps(*(outdir / name for name in OUTPUT_NAMES))
    if removed:
        logger.info("removed %d stale temporary file(s) of an interrupted run: %s",
                    len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Freeze the current heap for the garbage collector while nilearn runs.

    nilearn calls ``gc.collect()`` for every image it loads (``safe_get_data``); a full
    collection walks every live object (~0.2–0.5 s in a process that imported nilearn,
    matplotlib, scipy, pandas, more in a test session), which dominated the time of the
    cluster tables and figures. Objects alive before the block are moved to the permanent
    generation (``gc.freeze``) and given back afterwards (``gc.unfreeze``); objects created
    inside are still collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def to_img(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, fill: float = np.nan, dtype=np.float32):
    """A mask-voxel vector as a template-grid image (``fill`` outside the mask)."""
    out = np.full(mask.shape, fill, dtype=dtype)
    out[mask] = values.astype(dtype)
    img = nib.Nifti1Image(out, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    return img


def save_img(img: nib.Nifti1Image, dest: Path) -> None:
    """Save atomically."""
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


_CLUSTER_COLUMNS = [
    "Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)", "Cluster Size (voxels)",
    "Cluster-forming threshold", "Connectivity",
]  # fmt: skip
#: nilearn's get_clusters_table (and nvmeta.meta.clusters) label with scipy's 3-D rank-1 structure.
CONNECTIVITY = "faces (6-connected)"


def clusters_table(thresholded_img: nib.Nifti1Image, two_sided: bool, min_voxels: int = 0, forming: str = ""):
    """Cluster table of a thresholded map (0 or NaN = not significant).

    nilearn's :func:`~nilearn.reporting.get_clusters_table` (peaks and sub-peaks at least
    8 mm apart, MNI mm coordinates of the grid's affine, face-connected clusters, clusters
    under ``min_voxels`` left out), computed cluster by cluster (:func:`nvmeta.meta.clusters.peaks_table`:
    the same rows, without nilearn's whole-volume pass per cluster), plus a cluster size in
    voxels, the cluster-forming threshold (``forming``) and the connectivity. Clusters are
    numbered 1, 2, ... without gaps (positive ones first, then negative ones, each by
    decreasing ``|peak|``); sub-peaks carry their cluster's number and a letter (``3a``).
    Empty (header only) when no voxel survives.
    """
    import pandas as pd

    from nvmeta.meta.clusters import peaks_table

    data = np.asarray(thresholded_img.dataobj, dtype=np.float64).astype(np.float32)
    # every non-zero voxel of its sign forms the clusters (the map is thresholded already;
    # NaN counts as 0)
    table = peaks_table(data, thresholded_img.affine, lambda signed: signed > 0,
                        signs=(1.0, -1.0) if two_sided else (1.0,), min_voxels=int(min_voxels))  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=_CLUSTER_COLUMNS)
    table["Cluster-forming threshold"] = forming
    table["Connectivity"] = CONNECTIVITY
    return table[_CLUSTER_COLUMNS]


def n_clusters(table) -> int:
    """Clusters in a table (sub-peak rows have an empty cluster size)."""
    import pandas as pd

    return int(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").notna().sum()) if len(table) else 0


def z_title(label: str, n_maps: int, n_units: int, correction: str, threshold: float) -> str:
    """Title of a method's z mosaic: method, maps (collections), correction and display threshold."""
    maps = f"{n_maps} map{'s' * (n_maps != 1)}"
    if n_units != n_maps:
        maps += f" in {n_units} collection{'s' * (n_units != 1)}"
    return f"{label}, {maps}: z where {correction}, |z| > {threshold:g} shown"


def plot_z(z_img, out_png: Path, cfg: dict, title: str, empty_note: str | None = None) -> None:
    """The z mosaic (nilearn ``plot_stat_map``, axial cuts of ``cut_coords``), colour bar labelled z.

    The colour limit is ``meta.vmax`` when set, else the 99th percentile of \\|z\\| over the voxels
    shown (:func:`nvmeta.figures.maps.robust_scale`); the figure states it and what it clips.
    When no voxel is shown, ``empty_note`` (e.g. "no voxel survives FDR q < 0.05", or "not
    computed: 1 usable map") is written across the figure instead of leaving an empty brain to be
    read as a result.
    """
    import matplotlib.pyplot as plt

    from nvmeta.figures import maps

    data = np.nan_to_num(np.asarray(z_img.dataobj, dtype=np.float32), nan=0.0)
    thr = float(cfg["threshold"])
    scale = maps.robust_scale(data, thr, cfg.get("vmax"))
    with maps.pinned():
        fig = plt.figure(figsize=(14, 3.4))
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 1.0), nib.Nifti1Image(data, z_img.affine), cut_coords=cfg["cut_coords"],
            title=title, subtitle=scale.note(), vmin=-scale.vmax, vmax=scale.vmax, threshold=thr,
            cbar_label="z", empty_note=empty_note or "no voxel to show",
        )  # fmt: skip
        maps.save(fig, out_png)


def cluster_labels(thr: np.ndarray, mask: np.ndarray, affine: np.ndarray, min_voxels: int = 0):
    """Clusters of a thresholded mask-voxel vector (0 / NaN = not significant).

    Face-connected components (6-neighbourhood, :func:`scipy.ndimage.label`), positive and
    negative values separately, clusters under ``min_voxels`` dropped, numbered 1, 2, ... by
    decreasing size.

    Returns
    -------
    labels : ndarray of int, (n_vox,)
        Cluster number per mask voxel (0 = none).
    info : dict
        ``number -> {"size", "x", "y", "z", "peak"}`` (peak |value| and its mm coordinates).
    """
    from scipy import ndimage

    vol = np.zeros(mask.shape)
    vol[mask] = np.nan_to_num(thr, nan=0.0)
    comps = []
    for sign in (1.0, -1.0):
        lab, n = ndimage.label(vol * sign > 0)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for c in range(1, n + 1):
            if sizes[c] >= max(int(min_voxels), 1):
                comps.append((int(sizes[c]), sign, lab == c))
    comps.sort(key=lambda t: -t[0])
    labels3 = np.zeros(mask.shape, dtype=np.int32)
    info = {}
    for number, (size, _sign, sel) in enumerate(comps, start=1):
        labels3[sel] = number
        vals = np.where(sel, np.abs(vol), -1.0)
        ijk = np.unravel_index(int(np.argmax(vals)), mask.shape)
        xyz = affine[:3, :3] @ np.asarray(ijk, dtype=float) + affine[:3, 3]
        info[number] = {"size": size, "x": float(xyz[0]), "y": float(xyz[1]), "z": float(xyz[2]),
                        "peak": float(vol[ijk])}  # fmt: skip
    return labels3[mask], info


def plot_effect(g_img, i2_img, out_png: Path, cfg: dict, title: str) -> None:
    """Pooled g mosaic (colour bar in g) above the I² mosaic (a fraction, 0–1, as ``I2.nii.gz``).

    g: signed, colour limit :func:`nvmeta.figures.maps.robust_scale` (stated on the figure).
    I²: every voxel with a value is coloured, I² = 0 included (it is drawn as a layer of the colour
    of 0 under the map, since nilearn leaves a value equal to its threshold undrawn); voxels without
    a value (fewer than ``meta.min_maps`` maps) stay uncoloured.
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from nvmeta.figures import maps

    g = np.asarray(g_img.dataobj, dtype=np.float32)
    i2 = np.asarray(i2_img.dataobj, dtype=np.float32)
    has = np.isfinite(i2)
    scale = maps.robust_scale(g, 0.0)
    cuts = list(cfg["cut_coords"])
    zero = mpl.colormaps["viridis"](0.0)
    n_zero = int((has & (i2 == 0)).sum())
    with maps.pinned():
        fig = plt.figure(figsize=(14, 6.8))
        maps.mosaic_row(
            fig, (0.0, 0.5, 1.0, 0.5), nib.Nifti1Image(np.nan_to_num(g, nan=0.0), g_img.affine), cut_coords=cuts,
            title=title, subtitle=scale.note("|g|"), vmin=-scale.vmax, vmax=scale.vmax, threshold=0.0,
            cbar_label="Hedges' g (pooled)",
        )  # fmt: skip
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 0.5), nib.Nifti1Image(has.astype(np.float32), i2_img.affine), cut_coords=cuts,
            title="I² heterogeneity: share of the variation between maps beyond sampling error (fraction, 0–1)",
            subtitle=f"every voxel with a value is coloured; {n_zero:,} voxels have I² = 0 "
            f"({100 * n_zero / max(1, int(has.sum())):.0f} % of those with a value)",
            cmap=ListedColormap([zero]), vmin=0.0, vmax=1.0, threshold=0.5, cbar_label="I² (fraction)",
            cbar_map=("viridis", 0.0, 1.0), cbar_ticks=[0, 0.25, 0.5, 0.75, 1.0], cbar_fmt="{:.2g}",
            overlays=[{"img": nib.Nifti1Image(np.nan_to_num(i2, nan=0.0), i2_img.affine), "threshold": 0.0,
                       "cmap": "viridis", "vmin": 0.0, "vmax": 1.0}],
        )  # fmt: skip
        maps.save(fig, out_png)
