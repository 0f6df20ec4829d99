"""Writing a method's outputs: maps (``.nii.gz``), cluster tables, the figure and ``summary.json``.

Every file is written through :func:`nvmeta.io.atomic_path` (a partial file never appears at an
output path); :func:`sweep` removes the temporaries a killed earlier attempt of the same job left.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
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
    from nvmeta.download import remove_stale_temps

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


_CLUSTER_COLUMNS = ["Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)", "Cluster Size (voxels)"]


def clusters_table(thresholded_img: nib.Nifti1Image, two_sided: bool, min_voxels: int = 0):
    """Cluster table of a thresholded map (0 or NaN = not significant).

    nilearn's :func:`~nilearn.reporting.get_clusters_table` (peaks and sub-peaks at least
    8 mm apart, MNI mm coordinates of the grid's affine, face-connected clusters) plus a
    cluster size in voxels. Empty (header only) when no voxel survives.
    """
    import pandas as pd
    from nilearn.reporting import get_clusters_table

    data = np.nan_to_num(np.asarray(thresholded_img.dataobj, dtype=np.float64), nan=0.0)
    nz = np.abs(data[data != 0])
    if nz.size == 0:
        return pd.DataFrame(columns=_CLUSTER_COLUMNS)
    img = nib.Nifti1Image(data.astype(np.float32), thresholded_img.affine)
    thr = float(nz.min()) * (1 - 1e-6)
    with warnings.catch_warnings():
        # two-sided tables warn when one sign has no cluster: not worth a warning here
        warnings.filterwarnings("ignore", message="No clusters found", category=UserWarning)
        table = get_clusters_table(
            img, stat_threshold=thr, cluster_threshold=int(min_voxels), two_sided=two_sided
        )
    vox_mm3 = float(abs(np.linalg.det(thresholded_img.affine[:3, :3])))
    sizes = pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce")
    table["Cluster Size (voxels)"] = (sizes / vox_mm3).round().astype("Int64")
    return table[[c for c in _CLUSTER_COLUMNS if c in table.columns]]


def n_clusters(table) -> int:
    """Clusters in a table (sub-peak rows have an empty cluster size)."""
    import pandas as pd

    return int(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").notna().sum()) if len(table) else 0


def plot_z(z_img, out_png: Path, cfg: dict, title: str) -> None:
    """The z mosaic (nilearn ``plot_stat_map``, axial cuts of ``cut_coords``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = np.nan_to_num(np.asarray(z_img.dataobj, dtype=np.float32), nan=0.0)
    fig = plt.figure(figsize=(14, 3))
    try:
        display = plotting.plot_stat_map(
            nib.Nifti1Image(data, z_img.affine),
            display_mode="z",
            threshold=cfg["threshold"],
            cut_coords=list(cfg["cut_coords"]),
            vmax=cfg["vmax"],
            title=title,
            figure=fig,
        )
        with atomic_path(out_png) as tmp:
            display.savefig(str(tmp), dpi=100)
        display.close()
    finally:
        plt.close(fig)
