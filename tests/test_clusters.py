"""nvmeta.meta.clusters: nilearn's cluster table computed cluster by cluster is nilearn's table.

Reference: nilearn's own :func:`~nilearn.reporting.get_clusters_table` on the full volume, row for
row (coordinates, peak values and their dtype, sizes, order); its cluster numbers are compared after
closing their gaps (nilearn starts the negative clusters' numbers after the positive *rows*).
"""

from __future__ import annotations

import re
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.reporting import get_clusters_table
from scipy import ndimage

from nvmeta import cbma
from nvmeta.meta import clusters, outputs
from nvmeta.workflow.config import defaults

# x flipped, as the MNI grids
AFFINE = np.array([[-2.0, 0, 0, 48], [0, 2, 0, -60], [0, 0, 2, -40], [0, 0, 0, 1]])
PEAK = ["X", "Y", "Z", "Peak Stat"]


def _nilearn(img, stat_threshold, cluster_threshold, two_sided):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No clusters found", category=UserWarning)
        return get_clusters_table(
            img, stat_threshold=stat_threshold, cluster_threshold=cluster_threshold, two_sided=two_sided
        )


def _contiguous(ids) -> list[str]:
    """nilearn's cluster ids with the gaps closed (order of appearance), letters kept."""
    numbers: dict[str, int] = {}
    out = []
    for cid in map(str, ids):
        m = re.fullmatch(r"(\d+)([a-z]*)", cid)
        out.append(f"{numbers.setdefault(m.group(1), len(numbers) + 1)}{m.group(2)}")
    return out


def _thresholded_noise() -> np.ndarray:
    """Smooth noise (many clusters of both signs, with sub-peaks) and one very large positive
    cluster, thresholded at |z| >= 2.3; a NaN slab (no data)."""
    rng = np.random.default_rng(14)
    shape = (48, 56, 44)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    ijk = np.indices(shape)
    blob = np.exp(-(((ijk - np.array([22, 30, 20])[:, None, None, None]) ** 2).sum(0)) / (2 * 12.0**2))
    z = noise / noise.std() + 4.0 * blob
    z = np.where(np.abs(z) >= 2.3, z, 0.0).astype(np.float32)
    z[:, :, 40:] = np.nan
    return z


@pytest.mark.parametrize("two_sided", [True, False])
def test_clusters_table_equals_nilearn_full_volume(two_sided):
    z = _thresholded_noise()
    ours = outputs.clusters_table(nib.Nifti1Image(z, AFFINE), two_sided, min_voxels=5, forming="|z| >= 2.3")
    ref = _nilearn(nib.Nifti1Image(np.nan_to_num(z), AFFINE), 2.0, 5, two_sided)

    sizes = pd.to_numeric(ref["Cluster Size (mm3)"], errors="coerce")
    assert sizes.notna().sum() > 15 and (ref["Cluster ID"].astype(str).str.contains("[a-c]$")).any()
    assert sizes.max() / 8 > 5000  # the very large cluster
    assert (ref["Peak Stat"] < 0).any() == two_sided
    assert sizes.min() / 8 >= 5 and ((np.abs(np.nan_to_num(z)) > 0).sum() > sizes.sum() / 8)  # some dropped

    pd.testing.assert_frame_equal(ours[PEAK], ref[PEAK])  # values, order and dtypes
    assert ours["Cluster Size (mm3)"].astype(str).tolist() == ref["Cluster Size (mm3)"].astype(str).tolist()
    assert ours["Cluster Size (voxels)"].tolist() == [pd.NA if np.isnan(s) else int(s) // 8 for s in sizes]
    assert ours["Cluster ID"].tolist() == _contiguous(ref["Cluster ID"])
    assert (ours["Cluster-forming threshold"] == "|z| >= 2.3").all()


def test_plateaus_and_tied_peaks_as_nilearn():
    """Binary and plateau clusters whose centre of mass falls half-way between voxels (nilearn
    rounds it half to even) at odd box corners, and tied peaks (nilearn's argsort order).

    The cropped extraction before ``nvmeta.meta.clusters`` reported these plateaus one voxel off
    (its box corner was odd) and kept tied clusters in label order.
    """
    z = np.zeros((40, 44, 36), np.float32)
    values = [5, 4, 5, 5, 3.5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, -5, -5, -4]
    for n, v in enumerate(values):
        i, j = 4 + 6 * (n % 6), 4 + 8 * (n // 6)
        z[i : i + 2, j : j + 2, 10] = v  # binary 2 x 2 x 1: centre at (i + .5, j + .5)
    # a non-binary cluster whose maximum is a 2-voxel plateau (x: 30.5)
    z[28:34, 36:40, 20:24] = 3.5
    z[30:32, 38, 22] = 6.0
    z[3, 2, 30] = 3.5  # touches a volume edge once grown
    img = nib.Nifti1Image(z, AFFINE)

    ref = _nilearn(img, float(np.nextafter(np.float32(3.1), np.float32(0))), 0, True)
    cfg = {**defaults("cbma"), "peaks_from": "unthresholded", "min_cluster_voxels": 1}
    cfg.update(max_peaks_per_cluster=4, peak_distance=8)  # nilearn get_clusters_table's defaults
    ours = cbma.extract_peaks(img, cfg)
    np.testing.assert_array_equal(ours[["x", "y", "z", "z_value"]].to_numpy(), ref[PEAK].to_numpy())
    assert ours["peak"].tolist() == _contiguous(ref["Cluster ID"])

    table = outputs.clusters_table(img, True)
    pd.testing.assert_frame_equal(table[PEAK], ref[PEAK])


def test_cluster_peaks_needs_positive_values_above():
    signed = np.zeros((6, 6, 6), np.float32)
    signed[2, 2, 2] = 4.0
    with pytest.raises(ValueError, match="> 0"):
        clusters.cluster_peaks(signed, signed >= 0, np.eye(4))
    (only,) = clusters.cluster_peaks(signed, signed > 0, np.eye(4))
    assert (only.peak, only.n_voxels) == (4.0, 1) and only.table[["X", "Y", "Z"]].iloc[0].tolist() == [
        2,
        2,
        2,
    ]
    assert clusters.peaks_table(np.zeros((4, 4, 4), np.float32), np.eye(4), lambda s: s > 0).empty
