"""The per-image job: read one downloaded map, convert it to z, put it on the template grid, write z-map + QC.

One process reads, converts, resamples and writes. It imports only numpy, nibabel and scipy.special at
module level; nilearn is imported only when a map really needs interpolation (see :mod:`nvmeta.resample`).

Every image ends with both outputs, so Snakemake's outputs are always complete:

- ``zmap.nii.gz``: template grid, float32, NaN = no data (an all-NaN map when the image is excluded);
- ``qc.json``: status ``included``/``excluded``, the exclusion reason and what was done (see contracts.md).

An image is excluded, never crashes the job, for: a failed download, an unusable map type, a t map without
sample size, several volumes, an unreadable or lying file, no finite data, all zeros, a constant map,
implausible values, or no data inside the template mask.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.io import atomic_path, read_json, write_json

#: Map types that are converted (T) or used as is (Z); every other NeuroVault map type is excluded.
T_MAP = "T map"
Z_MAP = "Z map"
#: |value| above this in the source map is not a statistic.
MAX_PLAUSIBLE = 1e10
#: Refuse to load more voxels than this (a header that lies about its shape must not exhaust memory).
MAX_VOXELS = 200_000_000

R_DOWNLOAD = "download failed: {}"
R_MAP_TYPE = "map type not usable: {}"
R_VOLUMES = "too many volumes: {} (AFNI sub-brick selection not supported yet)"
R_UNREADABLE = "unreadable map: {}"
R_NO_FINITE = "no finite data"
R_ALL_ZERO = "all zero"
R_CONSTANT = "constant map"
R_IMPLAUSIBLE = "implausible values"
R_NO_OVERLAP = "no data inside the template mask"


class Excluded(Exception):
    """Raised inside :func:`make_zmap` to stop processing an image with an exclusion reason."""


def _orientation(affine: np.ndarray) -> str | None:
    try:
        return "".join(nib.orientations.aff2axcodes(affine))
    except Exception:
        return None


def _short(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    msg = " ".join(str(exc).split())
    if path is not None:  # no temporary/absolute paths in the QC table
        msg = msg.replace(os.fspath(path), Path(path).name)
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int_or_none(x: Any) -> int | None:
    try:
        if x is None or isinstance(x, bool):
            return None
        f = float(x)
        return int(f) if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def _sample_size(record: dict, conversion: dict) -> int | None:
    """The sample size that applies to the image (record, else config override), for qc.json."""
    from nvmeta.stats import _lookup, _positive_n

    n = _positive_n(record.get("number_of_subjects"))
    if n is None:
        n = _positive_n(_lookup(conversion.get("n_images"), record.get("id", record.get("image_id"))))
    if n is None:
        n = _positive_n(_lookup(conversion.get("n_collections"), record.get("collection_id")))
    return int(n) if n is not None else None


def load_map(path: str | os.PathLike, qc: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a statistic map as a 3-D float32 array plus its affine, or raise :class:`Excluded`.

    Parameters
    ----------
    path : path-like
        NIfTI (``.nii``/``.nii.gz``) or Analyze (``.hdr``/``.img``) file.
    qc : dict, optional
        Filled with ``source_shape``, ``source_voxel_size`` and ``source_affine_orientation`` as soon as
        the header is read (so they are reported even when the data turn out unusable).

    Returns
    -------
    data : ndarray, float32 (float64 for float64 files), 3-D
        Values with the header scaling (scl_slope/scl_inter) applied.
    affine : ndarray, (4, 4)

    Raises
    ------
    Excluded
        With reason ``"unreadable map: ..."`` or ``"too many volumes: ..."``.
    """
    qc = {} if qc is None else qc
    try:
        img = nib.load(os.fspath(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception as exc:
        raise Excluded(R_UNREADABLE.format(_short(exc, path))) from exc
    qc["source_shape"] = list(shape)
    qc["source_voxel_size"] = [round(z, 6) if math.isfinite(z) else None for z in zooms]
    qc["source_affine_orientation"] = _orientation(affine)
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise Excluded(R_UNREADABLE.format(f"not a 3-D volume (shape {list(shape)})"))
    n_vol = int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1
    if n_vol > 1:
        raise Excluded(R_VOLUMES.format(n_vol))
    n_vox = int(np.prod(shape, dtype=np.int64))
    if n_vox > MAX_VOXELS:
        raise Excluded(R_UNREADABLE.format(f"implausible shape {list(shape)} ({n_vox} voxels)"))
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Excluded(R_UNREADABLE.format("invalid affine (not finite or singular)"))
    try:
        data = np.asarray(img.dataobj)
        if data.shape != shape:
            raise ValueError(f"data shape {data.shape} != header shape {shape}")
        if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
            raise TypeError(f"unsupported data type {data.dtype}")
        if data.dtype != np.float64:
            data = data.astype(np.float32, copy=False)
    except Exception as exc:
        raise Excluded(R_UNREADABLE.format(_short(exc, path))) from exc
    # A private, writable copy (not a view on a memory map), float32 or float64 (kept until the value
    # checks so that values beyond the float32 range are reported as implausible, not turned into inf).
    return np.array(data.reshape(shape[:3]), copy=True), affine


def check_values(data: np.ndarray) -> np.ndarray:
    """Check a source map's values and return its validity mask (finite and non-zero), or raise Excluded."""
    finite = np.isfinite(data)
    if not finite.any():
        raise Excluded(R_NO_FINITE)
    valid = finite & (data != 0)
    if not valid.any():
        raise Excluded(R_ALL_ZERO)
    vals = data[valid]
    vmin, vmax = float(vals.min()), float(vals.max())
    # (float32 beyond ~3.4e38 is inf, i.e. already "no data"; float64 files are checked at full range)
    if max(abs(vmin), abs(vmax)) > MAX_PLAUSIBLE:
        raise Excluded(R_IMPLAUSIBLE)
    if vmin == vmax:
        raise Excluded(R_CONSTANT)
    return valid


def _write_nifti(data: np.ndarray, mask_img: nib.Nifti1Image, dest: str | os.PathLike) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), mask_img.affine)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("z score")
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


def make_zmap(
    metadata_path: str | os.PathLike,
    map_path: str | os.PathLike,
    mask_img: nib.Nifti1Image,
    conversion: dict | None,
    out_zmap: str | os.PathLike,
    out_qc: str | os.PathLike,
    out_effects: tuple[str | os.PathLike, str | os.PathLike] | None = None,
) -> dict:
    """Turn one downloaded image into a z-map on the template grid and write its qc.json.

    Parameters
    ----------
    metadata_path : path-like
        ``results/images/{id}/metadata.json`` (NeuroVault record + ``"nvmeta"`` download status).
    map_path : path-like
        ``results/images/{id}/map.nii.gz`` (need not exist when the download failed).
    mask_img : nibabel.Nifti1Image
        Template mask (:func:`nvmeta.template.load_mask`); its grid is the output grid.
    conversion : dict
        ``config["conversion"]`` (df rule and overrides), passed to :func:`nvmeta.stats.resolve_df`.
    out_zmap, out_qc : path-like
        Outputs, written atomically. An excluded image gets an all-NaN z-map.
    out_effects : (path-like, path-like), optional
        ``g.nii.gz`` and ``varg.nii.gz``: Hedges' g and its variance on the template grid, from the
        z-map and the resolved n / df (:func:`nvmeta.effectsize.write_effect_maps`).

    Returns
    -------
    dict
        The qc.json content: image_id, collection_id, status, reason, map_type, n, df, df_source,
        z_min, z_max, max_abs_z, coverage, source_shape, source_voxel_size, source_affine_orientation,
        resampled (the grid changed), resample_method (identity|lattice|linear).
    """
    from nvmeta.download import remove_stale_temps

    remove_stale_temps(out_zmap, out_qc)  # temporaries of a killed earlier attempt
    conversion = conversion or {}
    qc: dict[str, Any] = {
        "image_id": None,
        "collection_id": None,
        "status": "excluded",
        "reason": None,
        "map_type": None,
        "n": None,
        "df": None,
        "df_source": None,
        "z_min": None,
        "z_max": None,
        "max_abs_z": None,
        "coverage": None,
        "source_shape": None,
        "source_voxel_size": None,
        "source_affine_orientation": None,
        "resampled": None,
        "resample_method": None,
    }
    zmap = None
    meta: dict = {}
    try:
        try:
            meta = read_json(metadata_path)
        except Exception as exc:
            raise Excluded(f"unreadable metadata: {_short(exc)}") from exc
        nv = meta.get("nvmeta") or {}
        qc["image_id"] = _int_or_none(meta.get("id"))
        if qc["image_id"] is None:  # fall back on the directory name results/images/{id}/
            qc["image_id"] = _int_or_none(Path(metadata_path).parent.name)
        qc["collection_id"] = _int_or_none(meta.get("collection_id"))
        qc["map_type"] = meta.get("map_type")
        qc["n"] = _sample_size(meta, conversion)
        if nv.get("status") != "ok":
            raise Excluded(R_DOWNLOAD.format(nv.get("reason") or "unknown reason"))
        map_type = meta.get("map_type")
        if map_type == T_MAP:
            from nvmeta.stats import resolve_df

            df, df_source, reason = resolve_df(meta, conversion)
            if df is None:
                raise Excluded(reason or "missing sample size")
            qc["df"], qc["df_source"] = float(df), df_source
        elif map_type == Z_MAP:
            qc["df_source"] = "z map"
        else:
            raise Excluded(R_MAP_TYPE.format(map_type))

        data, affine = load_map(map_path, qc)
        valid = check_values(data)
        if map_type == T_MAP:
            from nvmeta.stats import t_to_z

            z = np.full(data.shape, np.nan, dtype=np.float32)
            z[valid] = np.asarray(t_to_z(data[valid], qc["df"]), dtype=np.float32)
        else:
            z = np.where(valid, data, np.nan).astype(np.float32)
        del data

        from nvmeta.resample import resample_to_template

        zmap, coverage, method = resample_to_template(z, affine, mask_img, return_method=True)
        qc["coverage"] = round(float(coverage), 6)
        qc["resample_method"] = method
        qc["resampled"] = method != "identity"
        if coverage <= 0:
            raise Excluded(R_NO_OVERLAP)
        qc["z_min"] = _finite_or_none(np.nanmin(zmap))
        qc["z_max"] = _finite_or_none(np.nanmax(zmap))
        qc["max_abs_z"] = max(abs(qc["z_min"]), abs(qc["z_max"]))
        qc["status"] = "included"
    except Excluded as exc:
        qc["status"] = "excluded"
        qc["reason"] = str(exc)
        zmap = None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # hostile input we did not foresee: keep the run going, say what happened
        qc["status"] = "excluded"
        qc["reason"] = f"processing error: {_short(exc, map_path)}"
        zmap = None

    if zmap is None:
        zmap = np.full(mask_img.shape[:3], np.nan, dtype=np.float32)
    _write_nifti(zmap, mask_img, out_zmap)
    if out_effects is not None:
        from nvmeta.effectsize import write_effect_maps

        included = qc["status"] == "included"
        write_effect_maps(zmap if included else None, qc, meta, conversion, mask_img, *out_effects)
    write_json(out_qc, qc)
    return qc


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m nvmeta.zmap METADATA MAP ZMAP QC [--mask SPEC] [--df n-2|n-1]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metadata")
    parser.add_argument("map")
    parser.add_argument("zmap")
    parser.add_argument("qc")
    parser.add_argument("--mask", default="mni152_2mm")
    parser.add_argument("--df", default="n-2", choices=["n-2", "n-1"])
    args = parser.parse_args(argv)
    from nvmeta.template import load_mask

    qc = make_zmap(args.metadata, args.map, load_mask(args.mask), {"df": args.df}, args.zmap, args.qc)
    print(qc["status"], qc["reason"] or "")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
