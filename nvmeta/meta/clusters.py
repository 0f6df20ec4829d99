"""Cluster tables of a volume: nilearn's ``get_clusters_table``, computed one cluster at a time.

nilearn's :func:`~nilearn.reporting.get_clusters_table` finds the peaks of every cluster by
running ``maximum_filter``, ``minimum_filter`` and ``center_of_mass`` over the *whole*
volume once per cluster: on the MNI 2 mm grid that is ~0.1 s per cluster, seconds per table.
Here the clusters are labelled once (face connectivity, scipy's rank-1 structure, as nilearn)
and nilearn's own function is called on each cluster's bounding box, holding that cluster
alone. The box is grown by one voxel on every side (where the volume allows) and its low
corner is moved to even indices (a centre of mass that falls half-way between two voxels,
plateau or binary clusters, is rounded half to even by nilearn: an even offset keeps that
rounding); its affine is the grid's, shifted to the box corner. Every step of nilearn's peak
search depends on the cluster's voxels and their neighbours only, so the rows are nilearn's
full-volume rows (``tests/test_clusters.py`` compares them). Coordinates are exactly nilearn's
when the affine's products are exact in floating point (integer or dyadic entries, as every
MNI grid); otherwise they may differ in the last bit.

- :func:`cluster_peaks`: the clusters of one sign, each with its nilearn rows.
- :func:`peaks_table`: both signs in one table, numbered as nilearn's (positive clusters
  first, by decreasing peak, then negative ones by decreasing ``|peak|``), without gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from string import ascii_lowercase
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["NILEARN_COLUMNS", "ClusterPeaks", "cluster_peaks", "peaks_table"]

#: The columns of nilearn's volume table, in its order.
NILEARN_COLUMNS = ["Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)"]


class ClusterPeaks(NamedTuple):
    """One cluster of :func:`cluster_peaks`."""

    #: The cluster's maximum of ``signed`` (nilearn orders clusters by it).
    peak: float
    #: Its number of voxels.
    n_voxels: int
    #: nilearn's rows for the cluster (peak, then up to 3 sub-peaks), :data:`NILEARN_COLUMNS`,
    #: with nilearn's ``Cluster ID`` of a one-cluster table (``1``, ``1a``, ...).
    table: Any


def cluster_peaks(
    signed: np.ndarray,
    above: np.ndarray,
    affine: np.ndarray,
    *,
    min_voxels: int = 0,
    min_distance: float = 8.0,
) -> list[ClusterPeaks]:
    """The face-connected clusters of ``above`` with their peaks, as nilearn's table lists them.

    Parameters
    ----------
    signed : ndarray, (I, J, K)
        Finite values, positive where the peaks are searched (multiply a map by -1 for its
        negative clusters). nilearn works in this dtype (give float32 for nilearn's float32).
    above : ndarray of bool, (I, J, K)
        The voxels that pass the cluster-forming threshold; ``signed`` must be > 0 there.
    affine : ndarray, (4, 4)
        The grid's affine (coordinates in its mm space).
    min_voxels : int, default=0
        Clusters with fewer voxels are left out (nilearn's ``cluster_threshold``).
    min_distance : float, default=8.0
        nilearn's ``min_distance``: minimum distance (mm) between sub-peaks.

    Returns
    -------
    list of ClusterPeaks
        In nilearn's order (decreasing peak, ties as nilearn's ``argsort``).

    Raises
    ------
    ValueError
        When ``signed`` is not positive on every voxel of ``above``.
    """
    from nilearn.reporting import get_clusters_table
    from scipy import ndimage

    above = np.asarray(above, dtype=bool)
    if np.any(signed[above] <= 0) or not np.all(np.isfinite(signed[above])):
        raise ValueError("signed must be finite and > 0 on every voxel above the threshold")
    labels, n = ndimage.label(above, structure=ndimage.generate_binary_structure(3, 1))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    found = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if sizes[k] < int(min_voxels):
            continue
        starts = [max(s.start - 1, 0) for s in box]
        starts = [s - s % 2 for s in starts]  # even: keeps nilearn's round-half-to-even
        sl = tuple(
            slice(s, min(b.stop + 1, dim)) for s, b, dim in zip(starts, box, labels.shape, strict=True)
        )
        sub = np.where(labels[sl] == k, signed[sl], 0).astype(signed.dtype)
        sub_affine = np.array(affine, dtype=float)
        sub_affine[:3, 3] = sub_affine[:3, :3] @ np.array(starts, dtype=float) + sub_affine[:3, 3]
        # every voxel of the box is 0 or in the cluster (> 0): a threshold of 0 keeps the cluster
        table = get_clusters_table(
            nib.Nifti1Image(sub, sub_affine),
            stat_threshold=0.0,
            cluster_threshold=0,
            two_sided=False,
            min_distance=float(min_distance),
        )
        found.append(ClusterPeaks(sub.max(), int(sizes[k]), table))
    # nilearn's own ordering (numpy's default argsort of the negated float peaks)
    order = (-np.array([c.peak for c in found])).argsort()
    return [found[i]._replace(peak=float(found[i].peak)) for i in order]


def peaks_table(
    data: np.ndarray,
    affine: np.ndarray,
    above: Callable[[np.ndarray], np.ndarray],
    *,
    signs: Sequence[float] = (1.0, -1.0),
    min_voxels: int = 0,
    min_distance: float = 8.0,
) -> Any:
    """nilearn's (two-sided) cluster table of ``data``, clusters numbered 1, 2, ... without gaps.

    Parameters
    ----------
    data : ndarray, (I, J, K)
        The map; non-finite values count as 0, as in nilearn (which works in this dtype).
    affine : ndarray, (4, 4)
        The grid's affine.
    above : callable
        ``signed -> bool array``: the cluster-forming rule applied to ``data * sign``
        (e.g. ``lambda s: s >= 3.1``); it must select positive values only.
    signs : sequence of float, default=(1.0, -1.0)
        ``(1.0, -1.0)``: positive clusters, then negative ones (nilearn's ``two_sided``);
        ``(1.0,)``: positive only.
    min_voxels, min_distance
        See :func:`cluster_peaks`.

    Returns
    -------
    pandas.DataFrame
        :data:`NILEARN_COLUMNS` as nilearn gives them (``Peak Stat`` signed, in ``data``'s
        dtype; ``Cluster Size (mm3)`` on a cluster's first row only, ``""`` on its sub-peaks)
        with ``Cluster ID`` as text (``3``, then ``3a``, ``3b``, ...), plus
        ``Cluster Size (voxels)`` (Int64, missing on sub-peak rows). No row when no cluster.
    """
    import pandas as pd

    data = np.where(np.isfinite(data), data, 0)  # nilearn's safe_get_data(ensure_finite=True)
    parts, ids, voxels = [], [], []
    for sign in signs:
        signed = data * data.dtype.type(sign)
        for peaks in cluster_peaks(
            signed, above(signed), affine, min_voxels=min_voxels, min_distance=min_distance
        ):
            number = len(parts) + 1
            table = peaks.table.copy()
            if sign < 0:
                table["Peak Stat"] = -table["Peak Stat"]
            parts.append(table)
            ids += [f"{number}{ascii_lowercase[j - 1] if j else ''}" for j in range(len(table))]
            voxels += [peaks.n_voxels] + [pd.NA] * (len(table) - 1)
    if not parts:
        out = pd.DataFrame(columns=NILEARN_COLUMNS)
        out["Cluster Size (voxels)"] = pd.array([], dtype="Int64")
        return out
    out = pd.concat(parts, ignore_index=True)[NILEARN_COLUMNS]
    out["Cluster ID"] = ids
    out["Cluster Size (voxels)"] = pd.array(voxels, dtype="Int64")
    return out
