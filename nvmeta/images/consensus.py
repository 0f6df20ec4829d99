"""The consensus of an analysis' maps, and the maps that disagree with it: inverted contrasts and outliers.

Peraza et al. 2025 (NBCLab/large-scale-ibma, ``outlier.py``) compare every map with a robust average of
the analysis, the voxelwise median, on its *signal* voxels (the 10 % most positive and the 10 % most
negative voxels of the median), and drop maps outside the IQR fences of that similarity. Here:

- **Consensus**: the voxelwise median of the maps' z values, at the voxels where at least half of the maps
  have data. z rather than Hedges' g: a map's correlation with the consensus does not depend on the map's
  own scale, z exists for every map (g only when the effect-size methods run), and the median of z gives
  larger studies more say, as the meta-analysis does.
- **Similarity**: Pearson r between a map and the consensus *of the other maps* (leave-one-out median) on
  that consensus' signal voxels where the map has data (at least :data:`MIN_SIGNAL_VOXELS`; NaN otherwise):
  no map is compared with a median it is part of, on voxels picked because it was extreme there.
  Peraza et al. use the regression slope of g on the median g; r is the scale-free version (a z-map's
  slope grows with its sample size).
- **Inverted contrast**: r below ``qc.inverted_r`` (a map of B > A among A > B maps correlates at about minus
  the typical r). Peraza et al.'s inverted-contrast test marks mirrored *pairs* only (r = -1 between two
  maps, see the duplicate search); a lone inverted upload falls below their lower fence and goes as an
  outlier. Here it has its own rule and is reported as what it is.
- **Outlier**: r below the lower Tukey fence ``Q1 - qc.outlier_iqr x IQR`` of the maps not inverted.

Memory: the maps are held as float32 on a fixed, evenly spaced subsample of the mask voxels of at most
:data:`CONSENSUS_BYTES` (all voxels up to 270 maps on the MNI 2 mm mask; at 20,000 maps one voxel in 74
of the flattened mask, 3,200 voxels of which 640 are signal voxels), filled while the duplicate search
reads each map once (:class:`ConsensusSample`). The leave-one-out medians need no copy per map: from
three order statistics around each voxel's middle (:class:`MedianStats`), every map's is O(voxels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Memory for the maps' consensus subsample (float32); bounded for the QC rule's ``mem_mb``.
CONSENSUS_BYTES = 256_000_000
#: Fraction of the consensus voxels taken as signal at each end (Peraza et al.: 10 % + 10 %).
SIGNAL_FRACTION = 0.1
#: A map needs data on at least this many signal voxels for its similarity to be defined.
MIN_SIGNAL_VOXELS = 100
#: Bytes of one block of the voxelwise median (float64, and its sorted copy): bounds its temporaries.
MEDIAN_BLOCK_BYTES = 64_000_000


class ConsensusSample:
    """The maps of an analysis on a fixed voxel subsample, filled as each map is read.

    Parameters
    ----------
    k : int
        Number of maps (rows).
    v : int
        Length of a map vector (mask voxels).
    memory_bytes : int
        Budget of the ``k x s`` float32 matrix; ``s = min(v, memory_bytes / (4 k))`` voxels,
        evenly spaced over the mask.
    """

    def __init__(self, k: int, v: int, memory_bytes: int = CONSENSUS_BYTES) -> None:
        s = int(min(v, max(1, memory_bytes // (4 * max(k, 1)))))
        self.idx = None if s >= v else np.unique(np.linspace(0, v - 1, s).round().astype(np.int64))
        self.n_voxels = v if self.idx is None else int(self.idx.size)
        self.data = np.full((k, self.n_voxels), np.nan, dtype=np.float32)

    @property
    def subsampled(self) -> bool:
        return self.idx is not None

    def store(self, m: int, x: np.ndarray) -> None:
        """Keep map ``m`` (a full mask vector; NaN = no data) on the subsample."""
        self.data[m] = x if self.idx is None else x[self.idx]


@dataclass
class Consensus:
    """Similarity of each map with the consensus, and the decisions of the two rules."""

    #: Pearson r of each row with the consensus on the signal voxels (NaN when undefined).
    r: np.ndarray
    #: Rows whose r is below ``inverted_r``.
    inverted: np.ndarray
    #: Rows not inverted whose r is below the lower fence.
    outlier: np.ndarray
    #: Everything the figure and the log need (JSON-ready).
    info: dict = field(default_factory=dict)


@dataclass
class MedianStats:
    """The voxelwise median of the member maps, and what every leave-one-out median needs."""

    #: Columns (voxels of the sample) with data in at least ``min_maps`` member maps.
    cols: np.ndarray
    #: The median at ``cols`` (float64).
    median: np.ndarray
    #: ``(3, n)`` order statistics ``s_a, s_a+1, s_a+2`` around the middle, ``a = (m - 2) // 2``
    #: for ``m`` maps with data at the voxel.
    around: np.ndarray
    #: ``m`` is odd.
    odd: np.ndarray

    def leave_one_out(self, x: np.ndarray) -> np.ndarray:
        """The median at ``cols`` of the members without the member whose values are ``x``.

        ``x`` is that member's row at ``cols`` (NaN where it has no data: the median is then
        the full one). Removing one value from the sorted column ``s`` shifts the order
        statistics at and above its position by one, so the middle of the remaining ones is
        ``s_j`` where ``s_j < x``, else ``s_j+1`` (ties give the same value whichever is removed).
        """
        sa, sa1, sa2 = self.around
        with np.errstate(invalid="ignore"):
            t0 = np.where(sa < x, sa, sa1)
            t1 = np.where(sa1 < x, sa1, sa2)
        loo = np.where(self.odd, 0.5 * (t0 + t1), t0)
        return np.where(np.isfinite(x), loo, self.median)


def median_stats(data: np.ndarray, min_maps: int) -> MedianStats:
    """:class:`MedianStats` of the rows of ``data`` at columns with at least ``min_maps`` (>= 2) finite values.

    Computed in blocks of :data:`MEDIAN_BLOCK_BYTES` (one sorted block at a time).
    """
    counts = np.isfinite(data).sum(axis=0)
    cols = np.flatnonzero(counts >= max(2, min_maps))
    around = np.empty((3, cols.size), dtype=np.float64)
    step = max(1, MEDIAN_BLOCK_BYTES // (8 * max(1, data.shape[0])))
    for start in range(0, cols.size, step):
        block = cols[start : start + step]
        srt = np.sort(data[:, block].astype(np.float64), axis=0)  # NaN last
        m = counts[block]
        a = (m - 2) // 2
        j = np.arange(block.size)
        around[0, start : start + block.size] = srt[a, j]
        around[1, start : start + block.size] = srt[a + 1, j]
        around[2, start : start + block.size] = srt[np.minimum(a + 2, m - 1), j]
    odd = (counts[cols] % 2) == 1
    median = np.where(odd, around[1], 0.5 * (around[0] + around[1]))
    return MedianStats(cols=cols, median=median, around=around, odd=odd)


def signal_voxels(med: np.ndarray, fraction: float = SIGNAL_FRACTION) -> np.ndarray:
    """Boolean mask of the consensus' most negative and most positive ``fraction`` of voxels."""
    if med.size == 0:
        return np.zeros(0, dtype=bool)
    lo, hi = np.quantile(med, [fraction, 1.0 - fraction])
    return (med <= lo) | (med >= hi)


def correlations(data: np.ndarray, target: np.ndarray, min_voxels: int = MIN_SIGNAL_VOXELS) -> np.ndarray:
    """Pearson r of every row of ``data`` with ``target`` on the entries where the row is finite."""
    out = np.full(data.shape[0], np.nan)
    y = np.asarray(target, dtype=np.float64)
    for i, row in enumerate(data):
        ok = np.isfinite(row)
        if ok.sum() < min_voxels:
            continue
        xs = row[ok].astype(np.float64)
        ys = y[ok]
        xs = xs - xs.mean()
        ys = ys - ys.mean()
        # elementwise sums, not BLAS dot products: no thread start-up per map on a busy node
        den = math.sqrt(float(np.sum(xs * xs)) * float(np.sum(ys * ys)))
        if den > 0:
            out[i] = float(np.sum(xs * ys)) / den
    return out


def iqr_fences(values: np.ndarray, factor: float) -> tuple[float, float, float, float]:
    """``(Q1, Q3, Q1 - factor x IQR, Q3 + factor x IQR)`` of the finite values (numpy's linear quantiles)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan,) * 4
    q1, q3 = (float(q) for q in np.percentile(v, [25, 75]))
    return q1, q3, q1 - factor * (q3 - q1), q3 + factor * (q3 - q1)


def assess(
    data: np.ndarray,
    members: np.ndarray,
    inverted_r: float,
    iqr_factor: float,
    signal_fraction: float = SIGNAL_FRACTION,
) -> Consensus:
    """Consensus of the ``members`` rows of ``data`` (maps x voxels, NaN = no data) and each row's verdict.

    A member is compared with the consensus of the *other* members (leave-one-out median), on the
    signal voxels of that consensus: a map is never compared with a median it is part of, nor on
    voxels chosen because it was extreme there (with sparse signal, a pure-noise map would
    otherwise correlate with the consensus through its own noise). Non-members (duplicates) are
    compared with the consensus of all members.

    Parameters
    ----------
    data : ndarray, (k, s)
        The maps, z values.
    members : ndarray of bool, (k,)
        The rows the consensus is the median of, and the rows judged.
    inverted_r : float
        Member rows with r below this are inverted contrasts.
    iqr_factor : float
        Tukey multiplier of the outlier fences (computed over the member rows not inverted).
    signal_fraction : float
        Fraction of consensus voxels taken at each end as signal.

    Returns
    -------
    Consensus
    """
    members = np.asarray(members, dtype=bool)
    k = int(members.sum())
    stats = median_stats(data[members], min_maps=max(2, math.ceil(k / 2)))
    r = np.full(data.shape[0], np.nan)
    for i, row in enumerate(data):
        x = row[stats.cols].astype(np.float64)
        target = stats.leave_one_out(x) if members[i] else stats.median
        sig = signal_voxels(target, signal_fraction)
        r[i] = correlations(x[None, sig], target[sig])[0]
    inverted = members & np.isfinite(r) & (r < inverted_r)
    q1, q3, lower, upper = iqr_fences(r[members & ~inverted], iqr_factor)
    outlier = members & ~inverted & np.isfinite(r) & (r < lower)
    info = {
        "status": "computed",
        "n_maps": k,
        "n_voxels": int(stats.cols.size),
        "n_signal_voxels": int(signal_voxels(stats.median, signal_fraction).sum()),
        "signal_fraction": signal_fraction,
        "inverted_r": float(inverted_r),
        "iqr_factor": float(iqr_factor),
        "q1": q1,
        "q3": q3,
        "lower_fence": lower,
        "upper_fence": upper,
        "n_inverted": int(inverted.sum()),
        "n_outliers": int(outlier.sum()),
        "n_undefined": int((members & ~np.isfinite(r)).sum()),
    }
    return Consensus(r=r, inverted=inverted, outlier=outlier, info=info)
