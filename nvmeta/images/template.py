"""The analysis template: one brain mask whose grid is the output grid of every z-map.

``load_mask("mni152_2mm")`` is nilearn's MNI152 2 mm brain mask (``load_mni152_brain_mask(resolution=2)``,
the mask of nilearn's NeuroVault ICA example); any other spec is the path of a mask NIfTI.

Importing nilearn and building its MNI mask costs more than a per-image job's own work (BENCHMARKS.md,
"Where the time went"). The mask is therefore cached twice: in process (``functools.lru_cache``) and on disk, as a plain NIfTI keyed by the
nilearn version, in ``$NVMETA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/nvmeta`` or ``~/.cache/nvmeta``; set
``NVMETA_CACHE_DIR=""`` to switch the disk cache off). The disk copy is written atomically and is only a
copy of nilearn's packaged data, so deleting it is always safe.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import nibabel as nib
import numpy as np

MNI152_2MM = "mni152_2mm"


def _cache_dir() -> Path | None:
    env = os.environ.get("NVMETA_CACHE_DIR")
    if env is not None:
        return Path(env) if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nvmeta"


def _nilearn_version() -> str:
    from importlib.metadata import version

    return version("nilearn")


def _build_mni152_2mm() -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    data = np.asarray(img.dataobj).astype(np.uint8)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm")
    return out


def _load_mni152_2mm() -> nib.Nifti1Image:
    cache = _cache_dir()
    path = None
    if cache is not None:
        path = cache / f"mni152_2mm_brain_mask_nilearn-{_nilearn_version()}.nii.gz"
        if path.is_file():
            try:
                img = nib.load(path)
                img = nib.Nifti1Image(np.asarray_chkfinite(img.dataobj), img.affine, img.header)
                return img
            except Exception:  # corrupt cache entry: rebuild it below
                pass
    img = _build_mni152_2mm()
    if path is not None:
        try:
            from nvmeta.io import atomic_path

            with atomic_path(path) as tmp:
                nib.save(img, tmp)
        except OSError:  # read-only home, full disk...: the cache is an optimisation only
            pass
    return img


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str) -> nib.Nifti1Image:

    if spec.strip().lower() == MNI152_2MM:
        img = _load_mni152_2mm()
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"template.mask: mask file not found: {spec!r} (use {MNI152_2MM!r} or the path of a mask NIfTI)"
            )
        img = nib.load(path)
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"template.mask: {spec!r} is not a 3-D mask (shape {data.shape})")
    mask = (np.nan_to_num(data.astype(np.float64), nan=0.0) > 0).astype(np.uint8)
    if not mask.any():
        raise ValueError(f"template.mask: {spec!r} has no voxel > 0")
    out = nib.Nifti1Image(mask, img.affine)
    out.header.set_xyzt_units("mm")
    return out


def load_mask(spec: str | os.PathLike = MNI152_2MM) -> nib.Nifti1Image:
    """Load the template mask; its grid is the output grid of every z-map.

    Parameters
    ----------
    spec : str or path-like
        ``"mni152_2mm"`` (nilearn's MNI152 2 mm brain mask) or the path of a mask NIfTI (voxels > 0 are in
        the mask; a 4-D file with one volume is accepted).

    Returns
    -------
    nibabel.Nifti1Image
        A uint8 0/1 mask image (3-D). The same object is returned for the same spec within a process: do not
        modify it in place.

    Raises
    ------
    FileNotFoundError
        If ``spec`` is a path that does not exist (the message names the ``template.mask`` config key).
    ValueError
        If the mask is not 3-D or is empty.
    """
    return _load_cached(os.fspath(spec))


def mask_bool(mask_img: nib.Nifti1Image):
    """Return the mask of ``mask_img`` as a boolean array (voxels > 0)."""
    return np.asarray(mask_img.dataobj) > 0


def write_mask(spec: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Write the template mask of ``spec`` to ``out_path`` (uint8 0/1, atomically).

    The workflow writes it once per run (rule ``template``) so that per-image jobs read a plain
    NIfTI instead of importing nilearn.
    """
    from nvmeta.io import atomic_path

    img = load_mask(spec)
    out = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8), img.affine)
    out.header.set_xyzt_units("mm")
    with atomic_path(out_path) as tmp:
        nib.save(out, tmp)
