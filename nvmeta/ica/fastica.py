"""Spatial FastICA of the data matrix: a stabilised fixed-point iteration, sign rule, reruns, matching.

FastICA (logcosh, symmetric) runs on the voxels x maps matrix ``X.T``, so the sources are spatial maps
and the mixing matrix (maps x components) holds each map's loading, as
``FastICA(n_components, random_state).fit_transform(X.T)`` in nilearn's cross-study ICA example. The
fixed-point step is relaxed (:func:`stabilized_fastica`): same fixed points as scikit-learn's, but it
converges where scikit-learn's undamped step oscillates (the demo's pain maps). Each component's sign is
flipped so that its larger tail is positive (its mixing column with it); components keep FastICA's order.
With more than ``ica.reduce_above`` maps the maps axis is first reduced by :func:`nvmeta.ica.pca.
randomized_pca` to ``ica.reduce_factor * ica.n_components`` dimensions, and the mixing is mapped back
to maps through the PCA loadings. With ``ica.n_runs > 1`` FastICA is rerun with seeds ``random_state +
1, ...`` on the same (reduced) data and each rerun's components are matched to the first run's
(:func:`match_components`).

Everything runs in float64 and the relaxed iteration contracts near its fixed point, so rounding
differences (BLAS threads, one-ulp input changes) shrink instead of growing: a converged run gives the
same components whatever the thread count.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvmeta.ica.matrix import DataMatrix
from nvmeta.ica.pca import randomized_pca

__all__ = [
    "STEP_SIZE",
    "Decomposition",
    "decompose",
    "match_components",
    "spatial_fastica",
    "stabilized_fastica",
]

logger = logging.getLogger(__name__)

#: Relaxation of the stabilised fixed-point iteration (a step of this fraction towards FastICA's step).
STEP_SIZE = 0.3


def _sym_decorrelation(w: np.ndarray) -> np.ndarray:
    """``(W W^T)^(-1/2) W``: the symmetric orthogonalisation of FastICA's parallel algorithm."""
    from scipy import linalg

    s, u = linalg.eigh(w @ w.T)
    s = np.clip(s, np.finfo(w.dtype).tiny, None)
    return (u * (1.0 / np.sqrt(s))) @ u.T @ w


def stabilized_fastica(
    white: np.ndarray, w_init: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int, bool]:
    """Symmetric FastICA (logcosh contrast, ``g = tanh``) with a step size, on whitened data (k x samples).

    Hand-written because scikit-learn's ``FastICA`` takes the full Newton-like fixed-point step, with no
    step size: on data that follow the ICA model poorly (few, similar maps, such as the demo's pain maps)
    that step overshoots, the unmixing matrix never settles and the run stops at ``max_iter`` wherever it
    is, so its components change with the thread count and with one-ulp changes of the input
    (BENCHMARKS.md, "ICA convergence on the demo"). This loop is scikit-learn's parallel fixed-point step
    ``sym_decorrelation(E[g(y) x^T] - diag(E g'(y)) W)`` with its rows' signs aligned to ``W``, followed
    by a relaxation towards it: ``W <- sym_decorrelation((1 - mu) W + mu W_step)`` with ``mu`` =
    :data:`STEP_SIZE` (a stabilised FastICA in the sense of Hyvarinen 1999, IEEE Trans. Neural Netw.
    10(3), section 5.2). Its fixed points are exactly the undamped iteration's (on data where
    scikit-learn converges both give the same components), and damping turns the overshooting
    oscillation into a contraction. The convergence test is scikit-learn's:
    ``max_i |1 - |<w_i new, w_i old>|| < tol``.

    Returns
    -------
    W : numpy.ndarray, shape (k, k)
        Orthogonal unmixing matrix in the whitened space.
    n_iter : int
    converged : bool
    """
    n = white.shape[1]
    w = _sym_decorrelation(np.asarray(w_init, dtype=np.float64))
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        y = w @ white
        g = np.tanh(y)
        g_prime = 1.0 - np.mean(g * g, axis=1)
        # scikit-learn's fixed-point step, its rows' signs aligned with w, then a step of STEP_SIZE towards it
        target = _sym_decorrelation((g @ white.T) / n - g_prime[:, None] * w)
        target *= np.where(np.einsum("ij,ij->i", target, w) < 0, -1.0, 1.0)[:, None]
        w1 = _sym_decorrelation((1.0 - STEP_SIZE) * w + STEP_SIZE * target)
        lim = float(np.max(np.abs(np.abs(np.einsum("ij,ij->i", w1, w)) - 1)))
        w = w1
        if lim < tol:
            return w, n_iter, True
    return w, n_iter, False


def spatial_fastica(
    data: np.ndarray, n_components: int, random_state: int, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, int, bool, list[str]]:
    """Spatial FastICA of samples (voxels) x features (maps or PCA dimensions); says whether it converged.

    1. Whitening: scikit-learn's ``PCA(whiten=True, svd_solver="covariance_eigh")`` in float64, to
       ``n_components`` dimensions (what FastICA's own whitening does).
    2. :func:`stabilized_fastica` from scikit-learn FastICA's initial matrix for ``random_state``
       (``RandomState(random_state).normal(size=(k, k))``).

    Returns
    -------
    sources : numpy.ndarray, shape (n_components, n_samples), float64
        Unit variance over the samples (scikit-learn's ``whiten="unit-variance"`` convention).
    mixing : numpy.ndarray, shape (n_features, n_components)
        ``pinv`` of the unmixing matrix in feature space (scikit-learn's ``mixing_`` convention).
    n_iter : int
    converged : bool
    messages : list of str
        Warnings raised on the way.
    """
    from scipy import linalg
    from sklearn.decomposition import PCA

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pca = PCA(n_components=n_components, whiten=True, svd_solver="covariance_eigh")
        white = pca.fit_transform(np.asarray(data, dtype=np.float64))  # samples x k
        w_init = np.random.RandomState(random_state).normal(size=(n_components, n_components))
        w, n_iter, converged = stabilized_fastica(white.T, w_init, max_iter, tol)
    messages = [f"FastICA (random_state={random_state}): {c.message}" for c in caught]
    sources = white @ w.T  # samples x k
    std = sources.std(axis=0)
    std[std == 0] = 1.0
    sources /= std
    # white = (data - mean) @ whitening.T, so sources = (data - mean) @ unmixing.T
    whitening = pca.components_ / np.sqrt(pca.explained_variance_)[:, None]
    unmixing = (w / std[:, None]) @ whitening
    mixing = linalg.pinv(unmixing)
    return sources.T, mixing, n_iter, converged, messages


def _flip(sources: np.ndarray, mixing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each component (and its mixing column) so that its larger tail is positive."""
    sources = np.array(sources, copy=True)
    mixing = np.array(mixing, dtype=np.float64, copy=True)
    for k in range(sources.shape[0]):
        if -sources[k].min() > sources[k].max():
            sources[k] *= -1
            mixing[:, k] *= -1
    return sources, mixing


def match_components(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match ``other``'s components to ``reference``'s (Hungarian algorithm on absolute correlation).

    Parameters
    ----------
    reference, other : numpy.ndarray, shape (n_components, n_voxels)

    Returns
    -------
    index : numpy.ndarray of int, shape (n_ref,)
        ``other[index[k]]`` is matched to ``reference[k]`` (-1 when ``other`` has fewer components).
    abs_corr : numpy.ndarray, shape (n_ref,)
        Absolute correlation of each matched pair (0 for unmatched).
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    na[na == 0] = 1
    nb[nb == 0] = 1
    corr = np.abs((a / na[:, None]) @ (b / nb[:, None]).T)
    rows, cols = linear_sum_assignment(-corr)
    index = np.full(a.shape[0], -1, dtype=int)
    matched = np.zeros(a.shape[0])
    index[rows] = cols
    matched[rows] = corr[rows, cols]
    return index, np.clip(matched, 0.0, 1.0)


@dataclass
class Decomposition:
    """Result of :func:`decompose`.

    Attributes
    ----------
    components : numpy.ndarray, shape (n_components, n_selected_voxels), float32
        Spatial maps (unit variance over voxels), sign-flipped so the larger tail is positive.
    mixing : numpy.ndarray, shape (n_maps, n_components), float64
        Loading of each map on each component (flipped with its component).
    reduced : bool
    info : dict
        ``n_iter`` and ``converged`` per run, ``pca`` (PCA info, when reduced), ``warnings``.
    stability : numpy.ndarray or None, shape (n_components, n_runs - 1)
        Matched absolute correlation of each component with each rerun.
    """

    components: np.ndarray
    mixing: np.ndarray
    reduced: bool
    info: dict[str, Any] = field(default_factory=dict)
    stability: np.ndarray | None = None


def _reduced_data(
    matrix: DataMatrix, columns: np.ndarray | None, cfg: dict, block_rows: int | None, log: logging.Logger
) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """The samples x features data FastICA runs on: voxels x PCA scores above ``reduce_above`` maps
    (with the loadings and PCA info), else the voxels x maps matrix itself."""
    n_maps = matrix.n_maps
    n_components = int(cfg["n_components"])
    if n_maps <= int(cfg["reduce_above"]):
        return matrix.load(columns, block_rows).T, None, None  # a transposed view, as in the example
    n_cols = matrix.n_voxels if columns is None else int(np.count_nonzero(columns))
    n_dims = int(min(max(int(cfg["reduce_factor"]) * n_components, n_components), n_maps, n_cols))
    log.info("ICA: randomised PCA of %d maps x %d voxels to %d dimensions", n_maps, n_cols, n_dims)
    data, loadings, pca_info = randomized_pca(
        matrix, columns, n_dims, int(cfg["random_state"]), block_rows=block_rows
    )
    log.info("ICA: PCA keeps %.3f of the variance", pca_info["explained_variance_ratio"])
    return data, loadings, pca_info


def decompose(
    matrix: DataMatrix,
    columns: np.ndarray | None,
    cfg: dict,
    *,
    block_rows: int | None = None,
    logger: logging.Logger | None = None,
) -> Decomposition:
    """Spatial FastICA of the (selected voxels of the) data matrix; randomised PCA first for many maps.

    Parameters
    ----------
    matrix : DataMatrix
    columns : numpy.ndarray of bool, optional
        Voxels used (see :func:`nvmeta.ica.matrix.select_voxels`).
    cfg : dict
        The analysis' validated ``ica`` block; read here: ``n_components``, ``random_state``,
        ``reduce_above`` (with more maps, reduce the maps axis to ``reduce_factor * n_components``
        dimensions by :func:`nvmeta.ica.pca.randomized_pca` first), ``reduce_factor``, ``n_runs`` (> 1:
        rerun FastICA with seeds ``random_state + r`` and compute :attr:`Decomposition.stability`),
        ``max_iter`` and ``tol`` (of each run). Whether each run converged is in
        ``info["converged"]``; :func:`decompose` does not judge it (:func:`nvmeta.ica.run.run_ica` does).
    block_rows : int, optional
    logger : logging.Logger, optional
        Defaults to this module's logger.

    Returns
    -------
    Decomposition
    """
    log = logger if logger is not None else logging.getLogger(__name__)
    n_components = int(cfg["n_components"])
    random_state = int(cfg["random_state"])
    n_runs = int(cfg["n_runs"])
    max_iter = int(cfg["max_iter"])
    tol = float(cfg["tol"])
    info: dict[str, Any] = {"warnings": []}
    data, loadings, pca_info = _reduced_data(matrix, columns, cfg, block_rows, log)
    if pca_info is not None:
        info["pca"] = pca_info
    log.info(
        "ICA: FastICA with %d components on %d voxels x %d inputs (max_iter=%d, tol=%g)",
        n_components,
        data.shape[0],
        data.shape[1],
        max_iter,
        tol,
    )
    sources, mix, n_iter, converged, msgs = spatial_fastica(data, n_components, random_state, max_iter, tol)
    log.info("ICA: FastICA run 1: %d iterations, converged=%s", n_iter, converged)
    info["n_iter"] = [n_iter]
    info["converged"] = [converged]
    info["warnings"] += msgs
    if loadings is not None:
        mix = loadings @ mix
    sources, mix = _flip(sources, mix)
    stability = None
    if n_runs > 1:
        stability = np.zeros((sources.shape[0], n_runs - 1))
        for r in range(1, n_runs):
            seed = random_state + r
            other, _, n_iter_r, conv_r, msgs_r = spatial_fastica(data, n_components, seed, max_iter, tol)
            log.info(
                "ICA: FastICA run %d/%d (random_state=%d): %d iterations, converged=%s",
                r + 1,
                n_runs,
                seed,
                n_iter_r,
                conv_r,
            )
            info["n_iter"].append(n_iter_r)
            info["converged"].append(conv_r)
            info["warnings"] += msgs_r
            stability[:, r - 1] = match_components(sources, other)[1]
    del data
    return Decomposition(sources.astype(np.float32), mix, loadings is not None, info, stability)
