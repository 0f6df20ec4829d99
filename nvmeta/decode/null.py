"""The decoding null: how well a result map correlates with a reference built from *random* maps.

A high correlation with a term's reference means something only if a reference made of as many maps
drawn at random from the atlas would not correlate as well (the random-selection baseline of Peraza
et al. 2025). For each reference size ``k`` of the terms being decoded, :func:`null_correlations`
draws ``n_null`` sets of ``k`` maps without replacement from the *pool* (every map of the atlas'
terms, after the analysis' leave-out), combines each set with the atlas' method exactly as a term's
reference is combined (same sums, same ``min_fraction`` rule), and correlates it with every source
map. One draw serves every size at once: the first ``k`` maps of a random ordering of the pool are a
uniform random set of ``k`` maps, so the sums are accumulated once along the ordering and read off
at each ``k``.

The statistic is computed on the atlas' voxel sample (``atlas.null_voxels`` mask voxels drawn once,
seeded by ``atlas.random_state``; each term job stores its maps' values there), intersected with the
source's common mask: the observed reference is restricted to the same voxels (``r_sample``), so the
observed and null correlations are the same statistic, and the p-value is exact for it.
``p = (1 + #{null r >= r_sample}) / (1 + n_null)`` (one-sided: a positive association), seeded by
``decode.random_state``. The full-mask ``r`` (NiMARE's decoder) is reported beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from nvmeta.decode.sums import METHODS, contributions, finish, min_count

__all__ = ["Pool", "load_pool", "null_correlations", "pairwise_r", "sample_references"]

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """The atlas' maps at the voxel sample, after leave-out.

    Attributes
    ----------
    voxels : ndarray of int
        Indices into the mask voxels of the sample.
    values : ndarray, shape (n_maps, n_sample), float32
        z values (NaN = no data).
    image_ids, collection_ids : ndarray of int
    weights : ndarray of float
        Each map's weight (:func:`nvmeta.decode.sums.weight`).
    """

    voxels: np.ndarray
    values: np.ndarray
    image_ids: np.ndarray
    collection_ids: np.ndarray
    weights: np.ndarray

    @property
    def size(self) -> int:
        return int(self.values.shape[0])


def load_pool(sample_paths: Iterable, images: set[int], collections: set[int]) -> Pool:
    """Concatenate the terms' ``sample.npz`` files, without the maps left out.

    Raises
    ------
    ValueError
        When the terms' samples are not on the same voxels (the atlas was built with different
        ``null_voxels`` / ``random_state``), or a map is in two terms' samples.
    """
    voxels = None
    parts = []
    for path in sample_paths:
        with np.load(path, allow_pickle=False) as d:
            if voxels is None:
                voxels = d["voxels"]
            elif not np.array_equal(voxels, d["voxels"]):
                raise ValueError(f"{path}: voxel sample differs from the other terms' (rebuild the atlas)")
            ids, cids = d["image_ids"], d["collection_ids"]
            keep = ~(np.isin(ids, list(images)) | np.isin(cids, list(collections)))
            parts.append((d["values"][keep], ids[keep], cids[keep], d["weights"][keep]))
    if voxels is None:
        return Pool(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), *(np.zeros(0, t) for t in
                    (np.int64, np.int64, np.float64)))  # fmt: skip
    values = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, voxels.size), np.float32)
    ids = np.concatenate([p[1] for p in parts])
    if np.unique(ids).size != ids.size:
        raise ValueError("a map belongs to two atlas terms' samples")
    return Pool(voxels, values.astype(np.float32, copy=False), ids,
                np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))  # fmt: skip


def pairwise_r(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pearson r of every row of ``x`` with every row of ``r`` over the voxels where both have data.

    Parameters
    ----------
    x : ndarray, shape (n_x, n)
    r : ndarray, shape (n_r, n)
        NaN = no data.

    Returns
    -------
    ndarray, shape (n_x, n_r)
        NaN where fewer than 3 voxels are shared or one of the two is constant on them.
    """
    mx, mr = np.isfinite(x).astype(np.float64), np.isfinite(r).astype(np.float64)
    x0, r0 = np.where(mx > 0, x, 0.0), np.where(mr > 0, r, 0.0)
    n = mx @ mr.T
    sx, sr = x0 @ mr.T, mx @ r0.T
    sxx, srr, sxr = (x0 * x0) @ mr.T, mx @ (r0 * r0).T, x0 @ r0.T
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = n * sxr - sx * sr
        vx, vr = n * sxx - sx * sx, n * srr - sr * sr
        out = cov / np.sqrt(vx * vr)
    out[(n < 3) | ~(vx > 1e-12 * n * n) | ~(vr > 1e-12 * n * n)] = np.nan
    return np.clip(out, -1.0, 1.0)


def _accumulate(method: str, pool: Pool, rows: np.ndarray, acc: dict[str, np.ndarray]) -> None:
    if rows.size == 0:
        return
    c = contributions(method, pool.values[rows], pool.weights[rows][:, None])
    for key in acc:
        acc[key] += c[key].sum(axis=0)


def sample_references(method: str, pool: Pool, draws: np.ndarray, sizes: Sequence[int],
                      min_fraction: float) -> np.ndarray:  # fmt: skip
    """References at the voxel sample of the first ``k`` maps of ``draws`` (pool rows), for each ``k``.

    Returns
    -------
    ndarray, shape (len(sizes), n_sample)
        NaN where fewer maps than :func:`nvmeta.decode.sums.min_count` have data.
    """
    n = pool.voxels.size
    acc = {key: np.zeros(n) for key in (*METHODS[method], "count")}
    out = np.full((len(sizes), n), np.nan)
    done = 0
    for j, k in enumerate(sizes):
        _accumulate(method, pool, draws[done:k], acc)
        done = k
        z = finish(method, {f: acc[f] for f in METHODS[method]}, acc["count"])
        z[acc["count"] < min_count(method, k, min_fraction) - 0.5] = np.nan
        out[j] = z
    return out


def null_correlations(
    method: str,
    pool: Pool,
    sizes: Iterable[int],
    x: np.ndarray,
    n_null: int,
    seed: int,
    min_fraction: float,
    log: logging.Logger | None = None,
) -> dict[int, np.ndarray]:
    """Correlations of the sources ``x`` with ``n_null`` random references of each size.

    Parameters
    ----------
    method : str
        The atlas' method.
    pool : Pool
    sizes : iterable of int
        Reference sizes (maps) to draw; each at most ``pool.size``.
    x : ndarray, shape (n_sources, n_sample)
        The sources at the voxel sample (NaN outside their common masks).
    n_null, seed : int
    min_fraction : float

    Returns
    -------
    dict
        ``{k: ndarray (n_null, n_sources)}``.
    """
    log = log or logger
    ks = sorted({int(k) for k in sizes})
    if not ks:
        return {}
    if ks[-1] > pool.size:
        raise ValueError(f"null: a reference of {ks[-1]} maps from a pool of {pool.size}")
    rng = np.random.default_rng(seed)
    out = {k: np.empty((n_null, x.shape[0])) for k in ks}
    for d in range(n_null):
        draws = rng.choice(pool.size, size=ks[-1], replace=False)
        refs = sample_references(method, pool, draws, ks, min_fraction)
        rr = pairwise_r(x, refs)
        for j, k in enumerate(ks):
            out[k][d] = rr[:, j]
        if (d + 1) % 200 == 0:
            log.info("null: %d/%d draws", d + 1, n_null)
    return out
