"""Duplicate and sign-flipped maps of an analysis: all pairs, in one read of every map.

Duplicate search cost (:func:`find_duplicates`): every map is read once. Up to 64 maps all pairs are computed
exactly (shared-voxel sums from chunked matrix products of the data and validity matrices). Above, all pairs are
screened on a fixed, evenly spaced subsample of 2,000 mask voxels and only pairs with
``|r_sub| > duplicate_r - 0.05`` are checked exactly on all voxels: the pairwise cost falls ~110x on the MNI 2 mm
mask. Maps are held in memory when ``k x v`` float32 fit in ``memory_bytes`` (default 2 GB, about 2,000 maps);
above, only the subsample is held (10,000 maps: 80 MB) and candidate pairs are re-read.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: Pairs of maps sharing fewer voxels than this are never called duplicates.
MIN_SHARED_VOXELS = 100


def _standardise(x: np.ndarray) -> np.ndarray:
    """Centre and scale a masked vector over its finite entries (Pearson r on any subset is unchanged).

    float32 arithmetic with float64 accumulation of the mean and standard deviation.
    """
    x = np.asarray(x, dtype=np.float32)
    ok = np.isfinite(x)
    vals = x[ok]
    if vals.size < 2:
        return x.copy()
    mu = vals.mean(dtype=np.float64)
    sd = vals.std(dtype=np.float64)
    out = x - np.float32(mu)
    if sd > 0:
        out *= np.float32(1.0 / sd)
    return out


def _pairwise_r(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between rows of ``a`` and rows of ``b`` on shared finite entries, and the shared counts.

    ``a``: (p, v), ``b``: (q, v) float32 with NaN = no data. Returns (r, n) of shape (p, q), r NaN where
    undefined. Uses four matrix products: n = Va Vbᵀ, Sx = Xa Vbᵀ, Sy = Va Xbᵀ, Sxy = Xa Xbᵀ,
    Sxx = Xa² Vbᵀ, Syy = Va Xb²ᵀ (X = data with NaN -> 0, V = validity).
    """
    va = np.isfinite(a)
    vb = np.isfinite(b)
    xa = np.where(va, a, 0).astype(np.float32)
    xb = np.where(vb, b, 0).astype(np.float32)
    fa = va.astype(np.float32)
    fb = vb.astype(np.float32)
    n = (fa @ fb.T).astype(np.float64)
    sx = (xa @ fb.T).astype(np.float64)
    sy = (fa @ xb.T).astype(np.float64)
    sxy = (xa @ xb.T).astype(np.float64)
    sxx = ((xa * xa) @ fb.T).astype(np.float64)
    syy = (fa @ (xb * xb).T).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = n * sxy - sx * sy
        var_x = n * sxx - sx * sx
        var_y = n * syy - sy * sy
        r = cov / np.sqrt(var_x * var_y)
    r[(n < 2) | ~(var_x > 0) | ~(var_y > 0)] = np.nan
    return np.clip(r, -1.0, 1.0), n


def _exact_pair(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 2:
        return float("nan"), n
    xs = x[ok].astype(np.float64)
    ys = y[ok].astype(np.float64)
    xs -= xs.mean()
    ys -= ys.mean()
    den = math.sqrt(float(xs @ xs) * float(ys @ ys))
    return (float(xs @ ys) / den if den > 0 else float("nan")), n


#: Memory the duplicate search may use to hold every map (float32); with more maps it holds a
#: 2,000-voxel subsample and re-reads candidates. The QC rule's ``mem_mb`` is bounded by it.
DUPLICATE_SEARCH_BYTES = 2_000_000_000


def find_duplicates(
    load: Callable[[int], np.ndarray],
    k: int,
    threshold: float = 0.99,
    min_shared: int = MIN_SHARED_VOXELS,
    memory_bytes: int = DUPLICATE_SEARCH_BYTES,
    chunk: int = 256,
    screen_voxels: int = 2_000,
    screen_margin: float = 0.05,
    exact_max_maps: int = 64,
) -> dict[int, tuple[int, float]]:
    """Find near-duplicate and sign-flipped maps among ``k`` maps, keeping the first in order.

    Up to ``exact_max_maps`` maps (or maps of at most ``screen_voxels`` voxels), every pair's Pearson r on its
    shared voxels is computed exactly by chunked matrix products. Above, all pairs are screened on a fixed,
    evenly spaced subsample of ``screen_voxels`` voxels (the same shared-voxel r, ~110x fewer voxels on the MNI
    2 mm mask), and only pairs with ``|r_sub| > threshold - screen_margin`` are checked exactly on all voxels.
    At r near 0.99 the subsample's standard error is ~(1 - r^2) / sqrt(2000) = 4.5e-4, so the 0.05 margin is
    ~110 standard errors: a true duplicate is not missed unless its maps share only a few hundred voxels.
    The decision on every reported pair is the exact one.

    Parameters
    ----------
    load : callable
        ``load(i)`` returns map ``i`` as a 1-D float32 vector over the template mask voxels (NaN = no data);
        every map has the same length. Called once per map, plus twice per candidate pair when the maps do
        not fit in ``memory_bytes``.
    k : int
        Number of maps, in selection order.
    threshold : float
        ``|r| > threshold`` on shared voxels makes a pair duplicates.
    min_shared : int
        Minimum number of shared voxels for a pair to be compared.
    memory_bytes : int
        Budget for holding all maps (float32); above it only the subsample is held and candidates are re-read.
    chunk : int
        Rows per block of the pairwise products.
    screen_voxels, screen_margin : int, float
        Subsample size and threshold margin of the screening.
    exact_max_maps : int
        Up to this many maps, all pairs are computed exactly on all voxels (no screening).

    Returns
    -------
    dict
        ``{j: (i, r)}``: map ``j`` is excluded as a copy of the earlier kept map ``i`` with correlation ``r``.
    """
    if k < 2:
        return {}
    first = _standardise(load(0))
    v = first.size
    hold = k * v * 4 <= memory_bytes
    screen = v > screen_voxels and (k > exact_max_maps or not hold)
    hold = hold or not screen  # (not screening means v <= screen_voxels: small enough to hold)
    data = None
    if screen:
        idx = np.unique(np.linspace(0, v - 1, screen_voxels).round().astype(np.int64))
        screen_min_shared = max(2, int(min_shared * idx.size / v))
    if hold:
        data = np.empty((k, v), dtype=np.float32)
        data[0] = first
        for i in range(1, k):
            data[i] = _standardise(load(i))
        sub = data[:, idx] if screen else data
    else:
        sub = np.empty((k, idx.size), dtype=np.float32)
        sub[0] = first[idx]
        for i in range(1, k):
            sub[i] = _standardise(load(i))[idx]
    del first

    # candidate pairs (i < j), computed by row blocks against all earlier rows
    pairs: dict[int, list[tuple[int, float]]] = {}
    for start in range(1, k, chunk):
        stop = min(k, start + chunk)
        r, n = _pairwise_r(sub[start:stop], sub[:stop])
        for jj in range(stop - start):
            j = start + jj
            rj = r[jj, :j]
            nj = n[jj, :j]
            if screen:
                hit = np.flatnonzero((np.abs(rj) > threshold - screen_margin) & (nj >= screen_min_shared))
            else:
                hit = np.flatnonzero((np.abs(rj) > threshold) & (nj >= min_shared))
            if hit.size:
                pairs[j] = [(int(i), float(rj[i])) for i in hit]

    out: dict[int, tuple[int, float]] = {}
    cache: dict[int, np.ndarray] = {}

    def full(m: int) -> np.ndarray:
        if data is not None:
            return data[m]
        if m not in cache:
            cache[m] = load(m)
        return cache[m]

    for j in sorted(pairs):
        for i, r_ij in pairs[j]:
            if i in out:  # only compare with maps that are kept
                continue
            if screen:
                r_ij, n_ij = _exact_pair(full(i), full(j))
                if not (abs(r_ij) > threshold and n_ij >= min_shared):
                    continue
            out[j] = (i, r_ij)
            break
    return out
