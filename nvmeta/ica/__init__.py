"""Cross-study spatial ICA of the included z-maps, as nilearn's "NeuroVault cross-study ICA maps" example.

Pipeline (:func:`run_ica`):

1. **Data matrix** (:func:`build_matrix`): the included maps' template-mask voxels, one row per map, written
   block by block into a float32 ``numpy.memmap`` file (maps x mask voxels) in a temporary directory inside
   the output directory, deleted at the end. Memory stays bounded by one block, whatever the number of maps.
2. **No-data voxels** (NaN/inf = no data). With ``standardize`` each map is z-scored over its own finite
   mask voxels first. Then every no-data value is set to 0, i.e. "no effect" after standardisation; this
   is what the example effectively does (``smooth_img(fwhm=None)`` replaces non-finite values by 0 before
   masking). Voxels with data in fewer than ``min_fraction`` of the maps are dropped (``min_fraction=0``
   keeps every mask voxel, like the example). ``nodata="drop"`` instead keeps only voxels with data in
   every map.
3. **Spatial ICA** (:func:`_fastica`): FastICA (logcosh, symmetric) on the voxels x maps matrix ``X.T``, so
   the sources are spatial maps and the mixing matrix (maps x components) holds each map's loading, as
   ``FastICA(n_components, random_state).fit_transform(X.T)`` in nilearn's example. The fixed-point
   iteration is relaxed (:func:`_stabilized_fastica`): same fixed points as scikit-learn's, but it converges
   where scikit-learn's undamped step oscillates (the demo's pain maps). Each run records ``n_iter`` and
   ``converged``; :func:`run_ica` fails on an unconverged run unless ``ica.allow_unconverged``. Each component's sign is flipped so that its larger tail is positive
   (the mixing column is flipped with it). Components keep FastICA's order.
4. **Scale**: with more than ``reduce_above`` maps the maps axis is first reduced by randomised PCA
   (Halko et al. range finder with power iterations, computed by streaming row blocks of the memmap, so
   the maps x voxels matrix is never in memory) to ``reduce_factor * n_components`` dimensions; FastICA
   runs on the voxels x dimensions scores and the mixing is mapped back to maps through the PCA loadings
   (``mixing = loadings @ ica.mixing_``).
5. **Stability** (``n_runs > 1``): FastICA is rerun with seeds ``random_state + 1, ...`` on the same
   (reduced) data; components are matched to the first run's with the Hungarian algorithm on absolute
   spatial correlations, and each component's mean absolute correlation is reported.
6. **Terms** (:mod:`nvmeta.ica.terms`): per-image term weights (metadata TF-IDF or Neurosynth decode words),
   component loadings ``mixing.T @ max(weights, 0)``, top ``n_terms`` per component.

Outputs in ``outdir``: ``components.nii.gz`` (4-D, template grid, float32, NaN outside the voxels used),
``mixing.tsv``, ``terms.tsv``, ``component_{k}.png``, ``stability.tsv`` (``n_runs > 1``), ``summary.json``.
The same inputs and config give byte-identical ``components.nii.gz`` (fixed seeds, deterministic block
order, float32 writes, deterministic gzip), given the same BLAS; a converged run gives the same components
whatever the thread count (the iteration runs in float64 and contracts near its fixed point).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.workflow.rule_inputs import path_lookup

__all__ = [
    "DataMatrix",
    "TMP_PREFIX",
    "Decomposition",
    "build_matrix",
    "decompose",
    "iter_masked_maps",
    "match_components",
    "NotConverged",
    "path_lookup",
    "remove_stale_temps",
    "randomized_pca",
    "run_ica",
    "select_voxels",
]

logger = logging.getLogger(__name__)

#: Prefix of the job's temporary directory (the memory-mapped data matrix) inside its output directory.
TMP_PREFIX = ".ica_tmp_"


class NotConverged(RuntimeError):
    """FastICA stopped at ``max_iter`` before reaching ``tol`` (and ``allow_unconverged`` is false)."""


#: Target number of float32 values per streamed block (64 Mi values = 256 MiB).
BLOCK_VALUES = 1 << 26


def _block_rows(n_voxels: int, block_values: int | None = None) -> int:
    return max(1, int((block_values or BLOCK_VALUES) // max(1, n_voxels)))


# ----------------------------------------------------------------------------------------------------------
# Data matrix
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DataMatrix:
    """A maps x mask-voxels float32 matrix stored in a raw C-order file (a ``numpy.memmap`` file).

    Attributes
    ----------
    path : pathlib.Path
    n_maps, n_voxels : int
    count : numpy.ndarray of int32, shape (n_voxels,)
        Number of maps with data (finite value) at each voxel.
    n_finite : numpy.ndarray of int64, shape (n_maps,)
        Number of mask voxels with data in each map.
    problems : list of str
        Maps that could not be standardised (no data, constant); their rows are all 0.
    """

    path: Path
    n_maps: int
    n_voxels: int
    count: np.ndarray
    n_finite: np.ndarray
    problems: list[str] = field(default_factory=list)

    def read_rows(
        self, start: int, stop: int, columns: np.ndarray | None = None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``start:stop`` (optionally only ``columns``, a boolean voxel selection) as a float32 array.

        Read with plain file reads rather than through a memory map, so that the pages read do not count in
        the process' resident memory. With ``buffer`` (float32, at least ``stop - start`` rows of
        ``n_voxels``) the rows are read into it and a view of it is returned (no new allocation).
        """
        n = stop - start
        if buffer is None:
            buffer = np.empty((n, self.n_voxels), dtype=np.float32)
        block = buffer.reshape(-1)[: n * self.n_voxels].reshape(n, self.n_voxels)
        view = memoryview(block).cast("B")
        done = 0
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(start * self.n_voxels * 4)
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise OSError(f"{self.path}: file shorter than {self.n_maps} x {self.n_voxels} float32")
                done += got
        if columns is not None and not bool(np.all(columns)):
            block = block[:, columns]
        return block

    def iter_blocks(
        self, columns: np.ndarray | None = None, block_rows: int | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, rows)`` blocks in order.

        The blocks are read into one reused buffer: a yielded array is only valid until the next one.
        """
        step = min(self.n_maps, block_rows or _block_rows(self.n_voxels))
        buffer = np.empty((step, self.n_voxels), dtype=np.float32)
        for start in range(0, self.n_maps, step):
            stop = min(self.n_maps, start + step)
            yield start, stop, self.read_rows(start, stop, columns, buffer)

    def load(self, columns: np.ndarray | None = None, block_rows: int | None = None) -> np.ndarray:
        """The whole matrix (maps x selected voxels, C order, float32) in memory."""
        n_cols = self.n_voxels if columns is None else int(np.count_nonzero(columns))
        out = np.empty((self.n_maps, n_cols), dtype=np.float32)
        for start, stop, rows in self.iter_blocks(columns, block_rows):
            out[start:stop] = rows
        return out


def build_matrix(
    maps: Iterable[np.ndarray],
    n_maps: int,
    n_voxels: int,
    path: str | os.PathLike,
    standardize: bool = True,
    block_rows: int | None = None,
    labels: Sequence[Any] | None = None,
) -> DataMatrix:
    """Write maps (1-D arrays of mask voxels, NaN = no data) into a float32 memmap file, block by block.

    Each map is cast to float32; with ``standardize`` it is z-scored over its finite voxels (mean and
    standard deviation computed in float64); then non-finite values become 0.

    Parameters
    ----------
    maps : iterable of numpy.ndarray, each shape (n_voxels,)
        The maps in row order (an iterator is fine: only one block is held at a time).
    n_maps, n_voxels : int
    path : path-like
        The matrix file (created or overwritten).
    standardize : bool
    block_rows : int, optional
        Rows per memmap window (default: about 256 MiB).
    labels : sequence, optional
        Names of the maps (e.g. image ids) used in :attr:`DataMatrix.problems`.

    Returns
    -------
    DataMatrix
    """
    path = Path(path)
    if n_maps < 1 or n_voxels < 1:
        raise ValueError(f"empty data matrix ({n_maps} maps x {n_voxels} voxels)")
    with open(path, "wb") as fh:
        fh.truncate(n_maps * n_voxels * 4)
    count = np.zeros(n_voxels, dtype=np.int32)
    n_finite = np.zeros(n_maps, dtype=np.int64)
    problems: list[str] = []
    step = block_rows or _block_rows(n_voxels)
    it = iter(maps)
    for start in range(0, n_maps, step):
        stop = min(n_maps, start + step)
        window = np.memmap(
            path, dtype=np.float32, mode="r+", offset=start * n_voxels * 4, shape=(stop - start, n_voxels)
        )
        for i in range(stop - start):
            row = start + i
            try:
                values = next(it)
            except StopIteration:
                raise ValueError(f"expected {n_maps} maps, got {row}") from None
            values = np.asarray(values, dtype=np.float32).reshape(-1)
            if values.shape[0] != n_voxels:
                raise ValueError(f"map {row} has {values.shape[0]} voxels, expected {n_voxels}")
            finite = np.isfinite(values)
            nf = int(np.count_nonzero(finite))
            n_finite[row] = nf
            count += finite
            out = window[i]
            out[...] = values
            if nf < n_voxels:
                out[~finite] = 0
            if standardize:
                label = labels[row] if labels is not None else row
                if nf == 0:
                    problems.append(f"map {label}: no finite data (row set to 0)")
                    continue
                good = out if nf == n_voxels else values[finite]
                mean = float(np.mean(good, dtype=np.float64))
                std = float(np.std(good, dtype=np.float64))
                if not std > 0:
                    problems.append(f"map {label}: constant map (row set to 0)")
                    out[...] = 0
                    continue
                out -= np.float32(mean)
                out /= np.float32(std)
                if nf < n_voxels:
                    out[~finite] = 0
        window.flush()
        del window
    with contextlib.suppress(StopIteration):
        next(it)
        raise ValueError(f"more than {n_maps} maps given")
    return DataMatrix(path, n_maps, n_voxels, count, n_finite, problems)


def iter_masked_maps(
    paths: Sequence[str | os.PathLike],
    mask: np.ndarray,
    threads: int = 1,
    reference_affine: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Yield each NIfTI's mask voxels (float32, NaN kept), in order, reading up to ``threads`` files at once.

    Parameters
    ----------
    paths : sequence of path-like
        3-D maps on the mask's grid (a 4-D file with one volume is accepted).
    mask : numpy.ndarray of bool, 3-D
    threads : int
        Reader threads (gzip decompression releases the GIL). At most ``2 * threads`` maps are in flight.
    reference_affine : numpy.ndarray, optional
        When given, each map's affine must match it (within 1e-3 mm).
    """
    import nibabel as nib

    def read(path: str | os.PathLike) -> np.ndarray:
        img = nib.load(os.fspath(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.shape != mask.shape:
            raise ValueError(f"{path}: shape {data.shape} is not the template grid {mask.shape}")
        if reference_affine is not None and not np.allclose(img.affine, reference_affine, atol=1e-3):
            raise ValueError(f"{path}: affine differs from the template's")
        return data[mask]

    threads = max(1, int(threads))
    if threads == 1:
        for p in paths:
            yield read(p)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        it = iter(paths)
        for p in it:
            pending.append(pool.submit(read, p))
            if len(pending) >= 2 * threads:
                break
        while pending:
            fut = pending.popleft()
            for p in it:
                pending.append(pool.submit(read, p))
                break
            yield fut.result()


def select_voxels(
    count: np.ndarray, n_maps: int, nodata: str = "zero", min_fraction: float = 0.5
) -> np.ndarray:
    """Voxels used by the decomposition.

    Parameters
    ----------
    count : numpy.ndarray, shape (n_voxels,)
        Maps with data per voxel.
    n_maps : int
    nodata : {"zero", "drop"}
        "zero": keep voxels with data in at least ``min_fraction`` of the maps (0 keeps all); "drop": keep
        voxels with data in every map.
    min_fraction : float

    Returns
    -------
    numpy.ndarray of bool
    """
    count = np.asarray(count)
    if nodata == "drop":
        return count >= n_maps
    if nodata != "zero":
        raise ValueError(f"ica.nodata must be 'zero' or 'drop', not {nodata!r}")
    return count >= float(min_fraction) * n_maps - 1e-9


# ----------------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------------


def randomized_pca(
    matrix: DataMatrix,
    columns: np.ndarray | None,
    n_dims: int,
    random_state: int = 0,
    n_iter: int = 4,
    n_oversamples: int = 10,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Randomised PCA of the voxels x maps data (voxels = samples, maps = features), streamed from disk.

    Each map is centred over the selected voxels. The range of the centred maps x voxels matrix ``Xc`` is
    found with a Gaussian test matrix and ``n_iter`` QR-normalised power iterations (Halko, Martinsson &
    Tropp 2011, algorithm 4.4); every product with ``Xc`` streams row blocks from the file, so memory is
    O(block + (n_maps + n_voxels) * (n_dims + n_oversamples)).

    Parameters
    ----------
    matrix : DataMatrix
    columns : numpy.ndarray of bool, optional
        Voxel selection.
    n_dims : int
        Number of principal components kept.
    random_state : int
    n_iter : int
        Power iterations (each costs two passes over the file; total passes ``2 * n_iter + 2``).
    n_oversamples : int
    block_rows : int, optional

    Returns
    -------
    scores : numpy.ndarray, shape (n_selected_voxels, n_dims), float64
        ``Xc.T @ loadings``: the reduced voxels x dimensions data.
    loadings : numpy.ndarray, shape (n_maps, n_dims), float64
        Orthonormal principal axes in maps space.
    info : dict
        ``explained_variance_ratio`` (of the kept dimensions, total), ``n_passes``.
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
        ``n_iter`` per run, PCA info, warnings.
    stability : numpy.ndarray or None, shape (n_components, n_runs - 1)
        Matched absolute correlation of each component with each rerun.
    """

    components: np.ndarray
    mixing: np.ndarray
    reduced: bool
    info: dict[str, Any] = field(default_factory=dict)
    stability: np.ndarray | None = None


#: Relaxation of the stabilised fixed-point iteration (a step of this fraction towards FastICA's step).
STEP_SIZE = 0.3


def _sym_decorrelation(w: np.ndarray) -> np.ndarray:
    """``(W W^T)^(-1/2) W``: the symmetric orthogonalisation of FastICA's parallel algorithm."""
    from scipy import linalg

    s, u = linalg.eigh(w @ w.T)
    s = np.clip(s, np.finfo(w.dtype).tiny, None)
    return (u * (1.0 / np.sqrt(s))) @ u.T @ w


def _stabilized_fastica(
    white: np.ndarray, w_init: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int, bool]:
    """Symmetric FastICA (logcosh contrast, ``g = tanh``) with a step size, on whitened data (k x samples).

    Why not scikit-learn's ``FastICA``: it takes the full Newton-like fixed-point step, with no step size.
    On data that follow the ICA model poorly (few, similar maps: the demo's 21 pain maps with 4
    components) that step overshoots and the unmixing matrix never settles: it still changed by 0.1-0.9
    (``1 - |cos|`` of a row) per iteration after 3,000 iterations, and stopped at ``max_iter`` wherever it
    was, so the components changed with the thread count and with one-ulp changes of the input. This loop
    is scikit-learn's parallel fixed-point step ``sym_decorrelation(E[g(y) x^T] -
    diag(E g'(y)) W)`` with its rows' signs aligned to ``W``, followed by a relaxation towards it:
    ``W <- sym_decorrelation((1 - mu) W + mu W_step)`` with ``mu`` = :data:`STEP_SIZE` (a stabilised
    FastICA in the sense of Hyvarinen 1999, IEEE Trans. Neural Netw. 10(3), section 5.2). Its fixed points
    are exactly the undamped iteration's (the same FastICA solutions: on data where scikit-learn converges
    both give the same components), and damping turns the overshooting oscillation into a contraction.
    The convergence test is scikit-learn's: ``max_i |1 - |<w_i new, w_i old>|| < tol``.

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


def _fastica(
    data: np.ndarray, n_components: int, random_state: int, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray, int, bool, list[str]]:
    """Spatial FastICA of samples (voxels) x features (maps or PCA dimensions); says whether it converged.

    1. Whitening: scikit-learn's ``PCA(whiten=True, svd_solver="covariance_eigh")`` in float64, to
       ``n_components`` dimensions (what FastICA's own whitening does).
    2. :func:`_stabilized_fastica` from scikit-learn FastICA's initial matrix for ``random_state``
       (``RandomState(random_state).normal(size=(k, k))``).

    Everything runs in float64 and the stabilised iteration contracts near its fixed point, so rounding
    differences (BLAS threads, one-ulp input changes) shrink instead of growing: a converged run gives the
    same components whatever the thread count.

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
        w, n_iter, converged = _stabilized_fastica(white.T, w_init, max_iter, tol)
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


def decompose(
    matrix: DataMatrix,
    columns: np.ndarray | None,
    n_components: int,
    random_state: int = 0,
    reduce_above: int = 500,
    reduce_factor: int = 3,
    n_runs: int = 1,
    block_rows: int | None = None,
    logger: logging.Logger | None = None,
    *,
    max_iter: int,
    tol: float,
) -> Decomposition:
    """Spatial FastICA of the (selected voxels of the) data matrix; randomised PCA first for many maps.

    Parameters
    ----------
    matrix : DataMatrix
    columns : numpy.ndarray of bool, optional
        Voxels used (see :func:`select_voxels`).
    n_components : int
    random_state : int
    reduce_above : int
        With more maps than this, reduce the maps axis to ``reduce_factor * n_components`` dimensions by
        :func:`randomized_pca` first.
    reduce_factor : int
    n_runs : int
        > 1: rerun FastICA with seeds ``random_state + r`` and compute :attr:`Decomposition.stability`.
    block_rows : int, optional
    logger : logging.Logger, optional
        Defaults to this module's logger.
    max_iter, tol : int, float
        Iteration limit and tolerance of each FastICA run (the config's ``ica.max_iter`` and ``ica.tol``).
        Whether each run converged is in ``info["converged"]``; :func:`decompose` does not judge it (see
        :func:`run_ica`).

    Returns
    -------
    Decomposition
    """
    log = logger if logger is not None else logging.getLogger(__name__)
    n_maps = matrix.n_maps
    n_cols = matrix.n_voxels if columns is None else int(np.count_nonzero(columns))
    info: dict[str, Any] = {"warnings": []}
    reduced = n_maps > reduce_above
    if reduced:
        n_dims = int(min(max(reduce_factor * n_components, n_components), n_maps, n_cols))
        log.info("ICA: randomised PCA of %d maps x %d voxels to %d dimensions", n_maps, n_cols, n_dims)
        data, loadings, pca_info = randomized_pca(
            matrix, columns, n_dims, random_state, block_rows=block_rows
        )
        info["pca"] = pca_info
        log.info("ICA: PCA keeps %.3f of the variance", pca_info["explained_variance_ratio"])
    else:
        loadings = None
        data = matrix.load(columns, block_rows).T  # voxels x maps (a transposed view, as in the example)
    log.info(
        "ICA: FastICA with %d components on %d voxels x %d inputs (max_iter=%d, tol=%g)",
        n_components,
        data.shape[0],
        data.shape[1],
        max_iter,
        tol,
    )
    sources, mix, n_iter, converged, msgs = _fastica(data, n_components, random_state, max_iter, tol)
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
            other, _, n_iter_r, conv_r, msgs_r = _fastica(data, n_components, random_state + r, max_iter, tol)
            log.info(
                "ICA: FastICA run %d/%d (random_state=%d): %d iterations, converged=%s",
                r + 1,
                n_runs,
                random_state + r,
                n_iter_r,
                conv_r,
            )
            info["n_iter"].append(n_iter_r)
            info["converged"].append(conv_r)
            info["warnings"] += msgs_r
            stability[:, r - 1] = match_components(sources, other)[1]
    del data
    return Decomposition(sources.astype(np.float32), mix, reduced, info, stability)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _included_ids(qc_tsv: str | os.PathLike) -> list[int]:
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    if "image_id" not in qc.columns or "status" not in qc.columns:
        raise ValueError(f"{qc_tsv}: needs image_id and status columns")
    rows = qc[qc["status"].astype(str).str.strip() == "included"]
    return [int(i) for i in rows["image_id"]]


def _mask_image(mask_img: Any):
    import nibabel as nib

    if isinstance(mask_img, (str, os.PathLike)):
        mask_img = nib.load(os.fspath(mask_img))
    data = np.asarray(mask_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    mask = np.nan_to_num(data.astype(np.float64), nan=0.0) > 0
    if mask.ndim != 3 or not mask.any():
        raise ValueError("ICA mask must be a non-empty 3-D image")
    return mask, np.asarray(mask_img.affine, dtype=np.float64)


def _unmask(values: np.ndarray, mask: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Components (k x selected voxels) to a float32 (X, Y, Z, k) volume, NaN outside the voxels used."""
    k = values.shape[0]
    out = np.full(mask.shape + (k,), np.nan, dtype=np.float32)
    full = np.full((int(mask.sum()), k), np.nan, dtype=np.float32)
    full[columns] = values.T
    out[mask] = full
    return out


def _plot_component(volume: np.ndarray, affine: np.ndarray, threshold: float, title: str, dest: Path) -> None:
    """One component as nilearn's ``plot_stat_map`` (ortho), thresholded, with its labelled colour bar."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    from nvmeta.figures import maps

    data = np.nan_to_num(volume, nan=0.0).astype(np.float32)
    vmax = max(float(np.max(np.abs(data))), threshold * 1.05 + 1e-6)
    img = nib.Nifti1Image(data, affine)
    with maps.pinned(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = plt.figure(figsize=(10, 3.6))
        ax = fig.add_axes([0.0, 0.04, 0.88, 0.86])  # room below for the cut labels
        plotting.plot_stat_map(
            img, threshold=threshold, colorbar=False, title=None, figure=fig, axes=ax, vmin=-vmax, vmax=vmax,
            symmetric_cbar=False, cmap="RdBu_r",
        )  # fmt: skip
        maps.colorbar(fig, [0.9, 0.1, 0.016, 0.72], "RdBu_r", -vmax, vmax, "component value (unit variance)",
                      hidden=(-threshold, threshold), marks=(threshold, -threshold), fmt="{:.2g}")  # fmt: skip
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
        maps.save(fig, dest)


def remove_stale_temps(outdir: str | os.PathLike, n_components: int) -> list[Path]:
    """Remove what a killed ICA job left in its own output directory.

    Only this job's temporaries: directories named ``.ica_tmp_XXXXXXXX`` (:data:`TMP_PREFIX` plus
    :func:`tempfile.mkdtemp`'s 8 characters; the memory-mapped data matrix) and the atomic-write
    temporaries of its own outputs (:func:`nvmeta.images.download.remove_stale_temps`). Nothing else in the
    directory is touched.

    Returns
    -------
    list of Path
        What was removed.
    """
    import re

    from nvmeta.images.download import remove_stale_temps as remove_output_temps

    outdir = Path(outdir)
    removed: list[Path] = []
    rx = re.compile(re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{8}")
    if outdir.is_dir():
        for entry in outdir.iterdir():
            if entry.is_dir() and not entry.is_symlink() and rx.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    names = ["components.nii.gz", "mixing.tsv", "terms.tsv", "summary.json", "stability.tsv"]
    names += [f"component_{k}.png" for k in range(max(0, int(n_components)))]
    removed += remove_output_temps(*(outdir / name for name in names))
    return removed


def _check_convergence(info: dict, cfg: dict, log: logging.Logger) -> str | None:
    """Raise :class:`NotConverged` when a FastICA run stopped at ``max_iter``; the warning text if allowed."""
    converged = info["converged"]
    if all(converged):
        return None
    bad = [i + 1 for i, ok in enumerate(converged) if not ok]
    what = (
        f"FastICA did not converge in {len(bad)} of {len(converged)} runs (run {', '.join(map(str, bad))}: "
        f"stopped at ica.max_iter={cfg['max_iter']} iterations with the unmixing matrix still changing by "
        f"more than ica.tol={cfg['tol']:g}); its components depend on the thread count and on rounding"
    )
    if cfg["allow_unconverged"]:
        msg = f"{what} (kept because ica.allow_unconverged is true)"
        log.warning("ICA: %s", msg)
        return msg
    msg = (
        f"{what}. Raise ica.max_iter, or loosen ica.tol, or lower ica.n_components; "
        "or set ica.allow_unconverged: true to keep unconverged components with a warning"
    )
    log.error("ICA: %s", msg)
    raise NotConverged(msg)


def run_ica(
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], Path],
    metadata_path_for: Callable[[int], Path],
    mask_img: Any,
    cfg: dict,
    outdir: str | os.PathLike,
    logger: logging.Logger | None = None,
    client_factory: Callable[[], Any] | None = None,
    threads: int = 1,
    neurosynth_cache_for: Callable[[int], Path] | None = None,
    plots: bool = True,
    labeler: Callable[[np.ndarray], list[list[tuple[str, float]]] | None] | None = None,
) -> dict:
    """Cross-study ICA of an analysis' included z-maps, with term labels; writes every output into ``outdir``.

    Parameters
    ----------
    qc_tsv : path-like
        ``results/analyses/{a}/qc.tsv``; rows with ``status == "included"`` are used, in file order.
    zmap_path_for : callable
        ``image_id -> Path`` of the template-grid z-map.
    metadata_path_for : callable
        ``image_id -> Path`` of ``metadata.json`` (term labels).
    mask_img : nibabel image or path-like
        Template mask; its grid is the z-maps' and the outputs' grid.
    cfg : dict
        The analysis' validated ``ica`` block, every key present (``{**nvmeta.workflow.config.defaults("ica"), ...}``).
    outdir : path-like
        ``results/analyses/{a}/ica/``.
    logger : logging.Logger, optional
        Defaults to this module's logger.
    client_factory : callable, optional
        ``() -> client`` with ``get_json_url`` (``lambda: nvmeta.neurovault.make_client(config["neurovault"])``);
        only used with ``terms: neurosynth``.
    threads : int
        Reader threads and BLAS threads.
    neurosynth_cache_for : callable, optional
        ``image_id -> Path`` of the per-image Neurosynth cache (default: ``neurosynth.json`` next to the
        image's ``metadata.json``).
    plots : bool
        Write ``component_{k}.png`` (tests and benchmarks may switch it off).
    labeler : callable, optional
        ``components volume (X, Y, Z, k) -> [[(term, r), ...] per component]`` or None: labels from
        decoding against the task atlas (:func:`nvmeta.decode.decoding.top_labels`). A component it
        gives no term keeps its image-text label; None (no decodable term) keeps them all.

    Returns
    -------
    dict
        The content written to ``summary.json``.

    Raises
    ------
    ValueError
        Fewer than 2 included maps, or fewer maps / voxels than ``n_components`` (the outputs would not be
        meaningful).
    NotConverged
        A FastICA run stopped at ``ica.max_iter`` and ``ica.allow_unconverged`` is false (nothing is
        written).
    """
    import nibabel as nib
    import pandas as pd
    import scipy.linalg  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    from threadpoolctl import threadpool_limits

    from nvmeta.ica import terms as termlib
    from nvmeta.io import atomic_path, write_json, write_tsv

    log = logger if logger is not None else logging.getLogger(__name__)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    n_components = int(cfg["n_components"])
    random_state = int(cfg["random_state"])
    n_runs = int(cfg["n_runs"])
    max_iter = int(cfg["max_iter"])
    tol = float(cfg["tol"])
    threads = max(1, int(threads))
    for path in remove_stale_temps(outdir, n_components):
        log.info("ICA: removed a stale temporary of an earlier, killed run: %s", path)

    image_ids = _included_ids(qc_tsv)
    n_maps = len(image_ids)
    log.info("ICA: %d included maps", n_maps)
    if n_maps < 2:
        raise ValueError(f"ICA needs at least 2 included maps; {qc_tsv} has {n_maps}")
    if n_maps < n_components:
        raise ValueError(
            f"ICA: n_components={n_components} is more than the {n_maps} included maps; lower ica.n_components"
        )
    mask, affine = _mask_image(mask_img)
    n_mask = int(mask.sum())

    warn: list[str] = []
    tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=outdir))
    try:
        # the BLAS libraries are loaded above, before threadpool_limits: a library first loaded inside it
        # would run unlimited in that first call only, and the first run's bits would differ from later ones
        with threadpool_limits(limits=threads):
            matrix = build_matrix(
                iter_masked_maps([zmap_path_for(i) for i in image_ids], mask, threads, affine),
                n_maps,
                n_mask,
                tmpdir / "data.f32",
                standardize=bool(cfg["standardize"]),
                labels=image_ids,
            )
            warn += matrix.problems
            empty = [image_ids[i] for i in np.flatnonzero(matrix.n_finite == 0)]
            if empty:
                warn.append(f"{len(empty)} maps have no data in the mask: {empty[:10]}")
            columns = select_voxels(matrix.count, n_maps, str(cfg["nodata"]), float(cfg["min_fraction"]))
            n_used = int(columns.sum())
            log.info("ICA: %d of %d mask voxels used (nodata=%s)", n_used, n_mask, cfg["nodata"])
            if n_used < n_components:
                raise ValueError(
                    f"ICA: only {n_used} voxels have data in enough maps (nodata={cfg['nodata']!r}, "
                    f"min_fraction={cfg['min_fraction']}); need at least n_components={n_components}"
                )
            dec = decompose(
                matrix,
                columns,
                n_components,
                random_state,
                int(cfg["reduce_above"]),
                int(cfg["reduce_factor"]),
                n_runs,
                logger=log,
                max_iter=max_iter,
                tol=tol,
            )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    unconverged = _check_convergence(dec.info, cfg, log)
    if unconverged:
        warn.append(unconverged)
    warn += dec.info["warnings"]
    k_out = dec.components.shape[0]

    # components.nii.gz
    volume = _unmask(dec.components, mask, columns)
    img = nib.Nifti1Image(volume, affine)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    with atomic_path(outdir / "components.nii.gz") as tmp:
        nib.save(img, tmp)

    names = [f"IC{k}" for k in range(k_out)]
    mixing = pd.DataFrame(dec.mixing, columns=names)
    mixing.insert(0, "image_id", image_ids)
    write_tsv(outdir / "mixing.tsv", mixing)

    # terms
    tw = termlib.image_term_weights(
        image_ids, metadata_path_for, cfg, client_factory, neurosynth_cache_for, logger=log
    )
    loadings = termlib.component_term_loadings(dec.mixing, tw.matrix)
    tops = termlib.top_terms(loadings, tw.vocabulary, int(cfg["n_terms"]))
    tops, label_sources, decoded_note = termlib.decoded_labels(tops, labeler, volume)
    if decoded_note:
        warn.append(decoded_note)
    rows = [
        {"component": k, "rank": rank + 1, "term": term, "weight": weight}
        for k, picked in enumerate(tops)
        for rank, (term, weight) in enumerate(picked)
    ]
    write_tsv(outdir / "terms.tsv", pd.DataFrame(rows, columns=["component", "rank", "term", "weight"]))
    warn += tw.warnings
    if tw.fallback:
        warn.append(tw.fallback)
    same = termlib.indistinct_labels(tops)
    if same:
        warn.append(same)

    # figures
    titles = []
    thresholds = []
    for k in range(k_out):
        shown_terms = [f"{t} (r={w:.2f})" if label_sources[k] == "atlas" else t for t, w in tops[k]]
        title = f"IC{k}: " + ", ".join(shown_terms) if tops[k] else f"IC{k} (no term loads positively)"
        titles.append(title)
        # the components have unit variance over the voxels used: show the 10 % largest |values|
        threshold = float(np.percentile(np.abs(dec.components[k]), 90))
        thresholds.append(threshold)
        if plots:
            shown = (
                f"{title}  |  component values (unit variance), shown where |value| > {threshold:.2f} "
                f"(top 10 % of voxels)"
            )
            if unconverged:
                shown += "\nNOT CONVERGED: FastICA stopped at ica.max_iter (ica.allow_unconverged is true)"
            _plot_component(volume[..., k], affine, threshold, shown, outdir / f"component_{k}.png")

    summary: dict[str, Any] = {
        "n_maps": n_maps,
        "n_mask_voxels": n_mask,
        "n_voxels_used": n_used,
        "n_components": k_out,
        "random_state": random_state,
        "nodata": str(cfg["nodata"]),
        "min_fraction": float(cfg["min_fraction"]),
        "standardize": bool(cfg["standardize"]),
        "reduced": dec.reduced,
        "pca": dec.info.get("pca"),
        "max_iter": max_iter,
        "tol": tol,
        "n_iter": dec.info["n_iter"],
        "converged": dec.info["converged"],
        "allow_unconverged": bool(cfg["allow_unconverged"]),
        "n_runs": n_runs,
        "term_source_requested": tw.requested,
        "term_source": tw.source,
        "term_fallback": tw.fallback,
        "label_sources": label_sources,
        "n_vocabulary": int(len(tw.vocabulary)),
        "neurosynth": tw.info or None,
        "titles": titles,
        "figure_thresholds": thresholds,
        "warnings": warn,
    }
    if dec.stability is not None:
        stab = pd.DataFrame(
            {
                "component": np.arange(k_out),
                "mean_abs_corr": dec.stability.mean(axis=1),
                "min_abs_corr": dec.stability.min(axis=1),
                "n_runs": n_runs,
            }
        )
        write_tsv(outdir / "stability.tsv", stab)
        summary["stability_mean_abs_corr"] = [float(x) for x in dec.stability.mean(axis=1)]
    for msg in warn:
        if msg is not unconverged:  # already logged
            log.warning("ICA warning: %s", msg)
    write_json(outdir / "summary.json", _jsonable(summary))
    log.info("ICA: done (%d components; terms from %s)", k_out, tw.source)
    return summary


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
