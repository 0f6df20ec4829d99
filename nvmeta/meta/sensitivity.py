"""Sensitivity panel: overlap of the FDR-thresholded maps of several methods (Dice)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.io import write_tsv
from nvmeta.meta.units import mask_data


def sensitivity(method_dirs: dict[str, Path], mask_img: Any, out_tsv: str | os.PathLike):
    """Dice overlap of the FDR-thresholded maps of each pair of methods.

    A voxel is "found" by a method when its ``z_fdr.nii.gz`` is finite and non-zero; two
    methods overlap at a voxel only when both find it *with the same sign*.

    Parameters
    ----------
    method_dirs : dict
        ``method -> results/analyses/{a}/meta/{method}/``.
    mask_img : nibabel image or path-like
        Template mask (voxels outside it are ignored).
    out_tsv : path-like
        Output ``meta/sensitivity.tsv``: one long table with columns
        ``method_a, method_b, dice, n_a, n_b``. Rows with ``method_a == method_b`` give each
        method's voxel count (``n_a = n_b`` = n_voxels, dice 1, or empty when it finds
        nothing); the other rows are the unordered pairs (dice empty when neither finds a voxel).

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import pandas as pd

    _, mask = mask_data(mask_img)
    signs: dict[str, np.ndarray] = {}
    for name, d in method_dirs.items():
        data = np.asarray(nib.load(Path(d) / "z_fdr.nii.gz").dataobj, dtype=np.float64)[mask]
        signs[name] = np.sign(np.nan_to_num(data, nan=0.0)).astype(np.int8)
    names = list(method_dirs)
    rows = []
    for i, a in enumerate(names):
        for b in names[i:]:
            sa, sb = signs[a], signs[b]
            na, nb = int(np.count_nonzero(sa)), int(np.count_nonzero(sb))
            inter = int(np.count_nonzero((sa == sb) & (sa != 0)))
            dice = 2.0 * inter / (na + nb) if na + nb else np.nan
            rows.append({"method_a": a, "method_b": b, "dice": dice, "n_a": na, "n_b": nb})
    table = pd.DataFrame(rows, columns=["method_a", "method_b", "dice", "n_a", "n_b"])
    diag = table["method_a"] == table["method_b"]
    table = pd.concat([table[diag], table[~diag]], ignore_index=True)
    write_tsv(out_tsv, table)
    return table
