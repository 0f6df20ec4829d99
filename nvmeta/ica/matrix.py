"""The maps x mask-voxels data matrix of the ICA, built on disk and read back block by block.

The included maps' template-mask voxels are written one row per map into a float32 raw file (a
``numpy.memmap`` file) in the job's temporary directory, so memory stays bounded by one block whatever
the number of maps. With ``standardize`` each map is z-scored over its own finite voxels first; then
every no-data value (NaN/inf) is set to 0, i.e. "no effect" after standardisation, which is what
nilearn's cross-study ICA example effectively does (``smooth_img(fwhm=None)`` replaces non-finite values
by 0 before masking). :func:`select_voxels` then picks the voxels the decomposition uses.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BLOCK_VALUES",
    "DataMatrix",
    "build_matrix",
    "iter_masked_maps",
    "mask_and_affine",
    "select_voxels",
]

#: Target number of float32 values per streamed block (64 Mi values = 256 MiB).
BLOCK_VALUES = 1 << 26


def block_rows_for(n_voxels: int, block_rows: int | None = None) -> int:
    """Rows per streamed block: ``block_rows`` when given, else as many as fit in :data:`BLOCK_VALUES`."""
    return block_rows or max(1, int(BLOCK_VALUES // max(1, n_voxels)))


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
        step = min(self.n_maps, block_rows_for(self.n_voxels, block_rows))
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


def _write_row(
    out: np.ndarray, values: np.ndarray, finite: np.ndarray, standardize: bool, label: Any
) -> tuple[int, str | None]:
    """Write one map into its matrix row ``out``; its number of finite voxels and a problem, if any."""
    n_voxels = out.shape[0]
    nf = int(np.count_nonzero(finite))
    out[...] = values
    if nf < n_voxels:
        out[~finite] = 0
    if not standardize:
        return nf, None
    if nf == 0:
        return nf, f"map {label}: no finite data (row set to 0)"
    good = out if nf == n_voxels else values[finite]
    # mean and standard deviation in float64: a float32 sum over ~10^5 voxels loses digits
    mean = float(np.mean(good, dtype=np.float64))
    std = float(np.std(good, dtype=np.float64))
    if not std > 0:
        out[...] = 0
        return nf, f"map {label}: constant map (row set to 0)"
    out -= np.float32(mean)
    out /= np.float32(std)
    if nf < n_voxels:
        out[~finite] = 0
    return nf, None


def build_matrix(
    maps: Iterable[np.ndarray],
    n_maps: int,
    n_voxels: int,
    path: str | os.PathLike,
    *,
    standardize: bool,
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
        The config's ``ica.standardize``.
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
    step = block_rows_for(n_voxels, block_rows)
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
            count += finite
            label = labels[row] if labels is not None else row
            n_finite[row], problem = _write_row(window[i], values, finite, standardize, label)
            if problem:
                problems.append(problem)
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


def select_voxels(count: np.ndarray, n_maps: int, nodata: str, min_fraction: float) -> np.ndarray:
    """Voxels used by the decomposition.

    Parameters
    ----------
    count : numpy.ndarray, shape (n_voxels,)
        Maps with data per voxel.
    n_maps : int
    nodata : {"zero", "drop"}
        The config's ``ica.nodata``. "zero": keep voxels with data in at least ``min_fraction`` of the
        maps (0 keeps all); "drop": keep voxels with data in every map.
    min_fraction : float
        The config's ``ica.min_fraction``.

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


def mask_and_affine(mask_img: Any) -> tuple[np.ndarray, np.ndarray]:
    """The template mask as a 3-D boolean array (voxels > 0, NaN = outside) and its affine (float64).

    Parameters
    ----------
    mask_img : nibabel image or path-like
        A 3-D image, or 4-D with one volume.
    """
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
