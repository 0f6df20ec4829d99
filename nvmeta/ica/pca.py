"""Randomised PCA of the on-disk data matrix, for ICAs over more maps than fit in memory.

The maps axis is reduced by a randomised range finder with power iterations (Halko, Martinsson & Tropp
2011, algorithm 4.4) whose every product with the data streams row blocks of the file, so the maps x
voxels matrix is never in memory; FastICA then runs on the voxels x dimensions scores.
Hand-written because scikit-learn's ``PCA(svd_solver="randomized")`` centres an in-memory copy of the
whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from nvmeta.ica.matrix import DataMatrix

__all__ = ["randomized_pca"]


def randomized_pca(
    matrix: DataMatrix,
    columns: np.ndarray | None,
    n_dims: int,
    random_state: int,
    n_iter: int = 4,
    n_oversamples: int = 10,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Randomised PCA of the voxels x maps data (voxels = samples, maps = features), streamed from disk.

    Each map is centred over the selected voxels. The range of the centred maps x voxels matrix ``Xc`` is
    found with a Gaussian test matrix and ``n_iter`` QR-normalised power iterations; every product with
    ``Xc`` streams row blocks from the file, so memory is
    O(block + (n_maps + n_voxels) * (n_dims + n_oversamples)).

    Parameters
    ----------
    matrix : DataMatrix
    columns : numpy.ndarray of bool, optional
        Voxel selection.
    n_dims : int
        Number of principal components kept.
    random_state : int
        Seed of the Gaussian test matrix.
    n_iter : int
        Power iterations (each costs two passes over the file; total passes ``2 * n_iter + 2``).
    n_oversamples : int
        Test vectors beyond ``n_dims`` (Halko et al.'s ``p``).
    block_rows : int, optional

    Returns
    -------
    scores : numpy.ndarray, shape (n_selected_voxels, n_dims), float64
        ``Xc.T @ loadings``: the reduced voxels x dimensions data.
    loadings : numpy.ndarray, shape (n_maps, n_dims), float64
        Orthonormal principal axes in maps space.
    info : dict
        ``explained_variance_ratio`` (of the kept dimensions, total), ``n_passes``, ``n_dims``.
    """
    from scipy import linalg

    n_maps = matrix.n_maps
    n_cols = matrix.n_voxels if columns is None else int(np.count_nonzero(columns))
    n_dims = int(min(n_dims, n_maps, n_cols))
    width = int(min(n_dims + n_oversamples, n_maps, n_cols))
    rng = np.random.RandomState(random_state)
    omega = rng.standard_normal((n_cols, width)).astype(np.float32)
    means = np.zeros(n_maps, dtype=np.float64)
    total_ss = 0.0
    y = np.zeros((n_maps, width), dtype=np.float64)
    passes = 1
    for start, stop, rows in matrix.iter_blocks(columns, block_rows):
        m = rows.mean(axis=1, dtype=np.float64)
        means[start:stop] = m
        rows -= m[:, None].astype(np.float32)
        total_ss += float(np.einsum("ij,ij->", rows, rows, dtype=np.float64))
        y[start:stop] = rows @ omega
    del omega
    means32 = means.astype(np.float32)

    def centred_blocks() -> Iterator[tuple[int, int, np.ndarray]]:
        for start, stop, rows in matrix.iter_blocks(columns, block_rows):
            rows -= means32[start:stop, None]
            yield start, stop, rows

    for _ in range(n_iter):
        q = linalg.qr(y, mode="economic")[0].astype(np.float32)
        z = np.zeros((n_cols, width), dtype=np.float64)
        for start, stop, rows in centred_blocks():
            z += rows.T @ q[start:stop]
        q2 = _orthonormal_columns(z).astype(np.float32)
        del z
        y = np.zeros((n_maps, width), dtype=np.float64)
        for start, stop, rows in centred_blocks():
            y[start:stop] = rows @ q2
        del q2
        passes += 2
    q = linalg.qr(y, mode="economic")[0]
    q32 = q.astype(np.float32)
    b = np.zeros((width, n_cols), dtype=np.float64)  # b = q.T @ Xc, small: width x voxels
    for start, stop, rows in centred_blocks():
        b += q32[start:stop].T @ rows
    passes += 1
    # SVD of b through its width x width Gram matrix (b = u s vt): only the top n_dims are kept, whose
    # singular values are the large ones, so the squared condition number is harmless here
    evals, evecs = linalg.eigh(b @ b.T)
    order = np.argsort(evals)[::-1][:n_dims]
    s = np.sqrt(np.clip(evals[order], 0, None))
    u_b = evecs[:, order]
    loadings = q @ u_b
    scores = b.T @ u_b  # = vt[:n_dims].T * s
    del b
    # deterministic signs: the largest-|.| loading of each axis is positive
    signs = np.sign(loadings[np.argmax(np.abs(loadings), axis=0), np.arange(n_dims)])
    signs[signs == 0] = 1
    loadings *= signs
    scores *= signs
    ratio = float(np.sum(s**2) / total_ss) if total_ss > 0 else float("nan")
    return scores, loadings, {"explained_variance_ratio": ratio, "n_passes": passes, "n_dims": n_dims}


def _orthonormal_columns(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis of a tall matrix's columns by CholeskyQR2 (QR if the Gram matrix is singular).

    Cheaper than Householder QR for voxels x ~30 matrices; two rounds restore orthogonality to machine
    precision for the condition numbers met here.
    """
    from scipy import linalg

    q = a
    try:
        for _ in range(2):
            r = linalg.cholesky(q.T @ q, lower=False)
            q = linalg.solve_triangular(r, q.T, trans="T", lower=False).T
        if np.all(np.isfinite(q)):
            return q
    except linalg.LinAlgError:
        pass
    return linalg.qr(a, mode="economic")[0]
