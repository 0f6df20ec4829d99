"""The per-image job: read one downloaded map, convert it to z, put it on the template grid, write z-map + QC.

One process reads, converts, resamples and writes. It imports only numpy, nibabel and scipy.special at
module level; nilearn is never imported (the one interpolation is scipy's, see :mod:`nvmeta.images.resample`).

Every image ends with both outputs, so Snakemake's outputs are always complete:

- ``zmap.nii.gz``: template grid, float32, NaN = no data (an all-NaN map when the image is excluded);
- ``qc.json``: status ``included``/``excluded``, the exclusion reason and what was done (see README, "Outputs").

An image is excluded, never crashes the job, for: a failed download, an unusable map type, a t map without
sample size, an unusable or implausible sample size or df (not a number, not finite, negative, non-integral,
n or df above ``qc.max_n``, too small to leave a df), a two_sample design whose n1 + n2 is not the image's n,
a map whose header says it decodes to more than ``qc.max_map_mb`` (checked before its data are read), several volumes, an
unreadable or lying file, no finite data, all zeros, a constant map, implausible values, an implied effect size
``max |t| / sqrt(n)`` above ``qc.max_t_per_sqrt_n`` (a map stored scaled, e.g. x1000), or no data inside the
template mask.

One read, one resampling: the map is read once as float32, its statistic (t or z) is put on the template grid
once (:func:`nvmeta.images.resample.resample_to_template`), and t -> z is computed on the template grid (mask voxels
only). Memory: about 15 bytes per source voxel at the peak (float32 data, validity, the interpolation stack), so
the ``qc.max_map_mb`` default keeps a job well inside the rule's ``mem_mb``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
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
#: Keys of the ``qc`` config block that the per-image job applies (passed as ``limits``).
LIMIT_KEYS = ("max_n", "max_t_per_sqrt_n", "max_map_mb")

#: Bytes of stored data read at a time (see :func:`_read_float32`).
SLAB_BYTES = 32_000_000

logger = logging.getLogger(__name__)

R_DOWNLOAD = "download failed: {}"
R_MAP_TYPE = "map type not usable: {}"
R_VOLUMES = "too many volumes: {} (AFNI sub-brick selection not supported yet)"
R_UNREADABLE = "unreadable map: {}"
R_NO_FINITE = "no finite data"
R_ALL_ZERO = "all zero"
R_CONSTANT = "constant map"
R_IMPLAUSIBLE = "implausible values"
R_NO_OVERLAP = "no data inside the template mask"
R_TOO_LARGE = (
    "map too large: header says {shape} voxels = {mb:.0f} MB as float32 > qc.max_map_mb = {limit:g} "
    "(not read)"
)
R_EFFECT = (
    "implausible effect size: max |{stat}| / sqrt({n_label}) = {value:.3g} > qc.max_t_per_sqrt_n = {limit:g} "
    "(max |{stat}| = {max_abs:.4g}; map stored scaled?)"
)


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


def load_map(
    path: str | os.PathLike, qc: dict | None = None, max_map_mb: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a statistic map once as a 3-D float32 array plus its affine, or raise :class:`Excluded`.

    Parameters
    ----------
    path : path-like
        NIfTI (``.nii``/``.nii.gz``) or Analyze (``.hdr``/``.img``) file.
    qc : dict, optional
        Filled with ``source_shape``, ``source_voxel_size`` and ``source_affine_orientation`` as soon as
        the header is read (so they are reported even when the data turn out unusable).
    max_map_mb : float, optional
        ``qc.max_map_mb``: largest map, in MB of float32 data (voxels x 4 bytes / 1e6), checked on the
        header before any data are read (a 3 MB file can decode to gigabytes).

    Returns
    -------
    data : ndarray, float32, 3-D, C-contiguous and writable
        Values with the header scaling (scl_slope/scl_inter) applied. A float64 file is range-checked
        in float64 first, so values beyond the float32 range are reported as implausible, not turned
        into inf.
    affine : ndarray, (4, 4)

    Raises
    ------
    Excluded
        With reason ``"unreadable map: ..."``, ``"too many volumes: ..."``, ``"map too large: ..."`` or
        ``"implausible values"``.
    """
    qc = {} if qc is None else qc
    try:
        # one file handle for the slab reads below (a gzip stream is then read once, front to back)
        img = nib.load(os.fspath(path), mmap=False, keep_file_open=True)
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
    if max_map_mb is not None and n_vox * 4 / 1e6 > max_map_mb:
        dims = "x".join(str(s) for s in shape[:3])
        raise Excluded(R_TOO_LARGE.format(shape=dims, mb=n_vox * 4 / 1e6, limit=max_map_mb))
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Excluded(R_UNREADABLE.format("invalid affine (not finite or singular)"))
    try:
        dtype = img.get_data_dtype()
        if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            raise TypeError(f"unsupported data type {dtype}")
        data = _read_float32(img.dataobj, shape)
    except Excluded:
        raise
    except Exception as exc:
        raise Excluded(R_UNREADABLE.format(_short(exc, path))) from exc
    return data, affine


def _read_float32(proxy: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Read a 3-D (or single-volume) image once into a float32 array, in slabs of the last spatial axis.

    nibabel reads a whole image into one array of its stored dtype (a float64 gz map: the raw bytes plus a
    second copy inside Python's gzip reader), i.e. up to 16 bytes per voxel before the float32 cast. Slabs of
    about :data:`SLAB_BYTES` (contiguous in the file, read in order through one open handle) keep the reading
    peak at the float32 result plus one slab. Values beyond the float32 range (float64 files) raise
    :class:`Excluded` (``"implausible values"``) instead of silently becoming inf (= no data).
    """
    nx, ny, nz = shape[:3]
    extra = (0,) * (len(shape) - 3)
    out = np.empty((nx, ny, nz), dtype=np.float32)
    step = max(1, SLAB_BYTES // max(1, nx * ny * 8))
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        block = np.asarray(proxy[(slice(None), slice(None), slice(k0, k1), *extra)])
        if block.shape != (nx, ny, k1 - k0):
            raise ValueError(f"data shape {block.shape} != header shape {shape}")
        if block.dtype.itemsize > 4 and np.issubdtype(block.dtype, np.floating):
            finite = np.isfinite(block)
            hi = float(np.max(np.abs(block), where=finite, initial=0.0))
            if hi > MAX_PLAUSIBLE:
                raise Excluded(R_IMPLAUSIBLE)
        out[:, :, k0:k1] = block
    return out


def check_values(data: np.ndarray) -> tuple[np.ndarray, float]:
    """Check a source map's values: return its validity mask (finite and non-zero) and max |value|.

    Raises :class:`Excluded` for no finite data, all zeros, implausible values or a constant map.
    """
    valid = np.isfinite(data)
    if not valid.any():
        raise Excluded(R_NO_FINITE)
    np.not_equal(data, 0, out=valid, where=valid)
    if not valid.any():
        raise Excluded(R_ALL_ZERO)
    vmin = float(np.min(data, where=valid, initial=np.inf))
    vmax = float(np.max(data, where=valid, initial=-np.inf))
    # (float32 beyond ~3.4e38 is inf, i.e. already "no data"; float64 files are range-checked on reading)
    if max(abs(vmin), abs(vmax)) > MAX_PLAUSIBLE:
        raise Excluded(R_IMPLAUSIBLE)
    if vmin == vmax:
        raise Excluded(R_CONSTANT)
    return valid, max(abs(vmin), abs(vmax))


def _write_nifti(data: np.ndarray, mask_img: nib.Nifti1Image, dest: str | os.PathLike) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), mask_img.affine)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("z score")
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


#: Every key of qc.json, in order (a field the job did not reach stays null).
QC_FIELDS = (
    "image_id",
    "collection_id",
    "status",
    "reason",
    "map_type",
    "n",
    "n_source",
    "df",
    "df_source",
    "source_max_abs",
    "z_min",
    "z_max",
    "max_abs_z",
    "coverage",
    "source_shape",
    "source_voxel_size",
    "source_affine_orientation",
    "resampled",
    "resample_method",
)


def _resolve_statistic(
    meta: dict,
    metadata_path: str | os.PathLike,
    conversion: Mapping[str, Any],
    limits: Mapping[str, Any],
    qc: dict,
):
    """Fill the record's ids, map type, n and df into ``qc``; raise :class:`Excluded` when the image
    cannot be converted (failed download, unusable sample size, unsupported map type).

    n and df are resolved once, here: qc.json carries them to every consumer (weights, effect sizes,
    QC), and a two_sample design's n1 + n2 is that same n (or the image is excluded for the conflict).
    """
    from nvmeta.images.stats import resolve_sample_size, unused_df_override

    nv = meta.get("nvmeta") or {}
    qc["image_id"] = _int_or_none(meta.get("id"))
    if qc["image_id"] is None:  # fall back on the directory name results/images/{id}/
        qc["image_id"] = _int_or_none(Path(metadata_path).parent.name)
    qc["collection_id"] = _int_or_none(meta.get("collection_id"))
    map_type = qc["map_type"] = meta.get("map_type")
    size = resolve_sample_size(meta, conversion, max_n=limits["max_n"], need_df=map_type == T_MAP)
    qc["n"], qc["n_source"] = size.n, size.n_source
    if nv.get("status") != "ok":
        raise Excluded(R_DOWNLOAD.format(nv.get("reason") or "unknown reason"))
    if map_type == T_MAP:
        if size.df is None:
            raise Excluded(size.reason or "missing sample size")
        qc["df"], qc["df_source"] = size.df, size.df_source
        ignored = unused_df_override(meta, conversion, size)
        if ignored:
            qc["ignored_override"] = ignored
            logger.warning("image %s: %s", qc["image_id"], ignored)
    elif map_type == Z_MAP:
        qc["df_source"] = "z map"
        if size.reason:
            raise Excluded(size.reason)
    else:
        raise Excluded(R_MAP_TYPE.format(map_type))
    return size


def _check_implied_effect(max_abs: float, size, qc: dict, limits: Mapping[str, Any]) -> None:
    """Exclude a map whose strongest voxel implies an implausible one-sample d = t / sqrt(n)
    (``qc.max_t_per_sqrt_n``; df + 1 stands for n when only df is known): a map stored scaled."""
    n_eff, n_label = (size.n, "n") if size.n else (None, None)
    if n_eff is None and size.df is not None:
        n_eff, n_label = size.df + 1, "df + 1"
    if n_eff and max_abs / math.sqrt(n_eff) > limits["max_t_per_sqrt_n"]:
        raise Excluded(
            R_EFFECT.format(
                stat="t" if qc["map_type"] == T_MAP else "z",
                n_label=n_label,
                value=max_abs / math.sqrt(n_eff),
                limit=limits["max_t_per_sqrt_n"],
                max_abs=max_abs,
            )
        )


def make_zmap(
    metadata_path: str | os.PathLike,
    map_path: str | os.PathLike,
    mask_img: nib.Nifti1Image,
    conversion: Mapping[str, Any],
    out_zmap: str | os.PathLike,
    out_qc: str | os.PathLike,
    limits: Mapping[str, Any],
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
        Template mask (:func:`nvmeta.images.template.load_mask`); its grid is the output grid.
    conversion : mapping
        ``config["conversion"]`` (df rule and overrides), see :func:`nvmeta.images.stats.resolve_sample_size`.
    out_zmap, out_qc : path-like
        Outputs, written atomically. An excluded image gets an all-NaN z-map.
    limits : mapping
        The per-image plausibility keys of ``config["qc"]`` (:data:`LIMIT_KEYS`).
    out_effects : (path-like, path-like), optional
        ``g.nii.gz`` and ``varg.nii.gz``: Hedges' g and its variance on the template grid, from the
        z-map and the resolved n / df (:func:`nvmeta.images.effectsize.write_effect_maps`).

    Returns
    -------
    dict
        The qc.json content: image_id, collection_id, status, reason, map_type, n, n_source (the one
        resolved sample size every consumer reads), df, df_source, source_max_abs, z_min, z_max, max_abs_z,
        coverage, source_shape, source_voxel_size, source_affine_orientation, resampled (the grid changed),
        resample_method (identity|lattice|linear).
    """
    from nvmeta.images.download import remove_stale_temps

    remove_stale_temps(out_zmap, out_qc)  # temporaries of a killed earlier attempt
    qc: dict[str, Any] = dict.fromkeys(QC_FIELDS)
    qc["status"] = "excluded"
    zmap = None
    meta: dict = {}
    size = None
    try:
        try:
            meta = read_json(metadata_path)
        except Exception as exc:
            raise Excluded(f"unreadable metadata: {_short(exc)}") from exc
        size = _resolve_statistic(meta, metadata_path, conversion, limits, qc)
        data, affine = load_map(map_path, qc, max_map_mb=limits["max_map_mb"])
        valid, max_abs = check_values(data)
        qc["source_max_abs"] = max_abs
        _check_implied_effect(max_abs, size, qc, limits)

        from nvmeta.images.resample import resample_to_template

        # The one resampling: the map's own statistic (t or z) onto the template grid.
        stat, coverage, method = resample_to_template(data, affine, mask_img, return_method=True, valid=valid)
        del data, valid
        qc["coverage"] = round(float(coverage), 6)
        qc["resample_method"] = method
        qc["resampled"] = method != "identity"
        if coverage <= 0:
            raise Excluded(R_NO_OVERLAP)
        if qc["map_type"] == T_MAP:
            from nvmeta.images.stats import t_to_z

            # t -> z on the template grid's data voxels only (pointwise, so identical to converting first on
            # identity/lattice grids; on interpolated grids z is the transform of the interpolated t).
            has = np.isfinite(stat)
            zmap = np.full(stat.shape, np.nan, dtype=np.float32)
            zmap[has] = np.asarray(t_to_z(stat[has], qc["df"]), dtype=np.float32)
        else:
            zmap = stat
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
        from nvmeta.images.effectsize import write_effect_maps

        included = qc["status"] == "included"
        # a Z map's df (for z -> t) from the same one resolution as its n; qc.json keeps df null for it
        df = size.df if size is not None else None
        write_effect_maps(zmap if included else None, qc, meta, conversion, mask_img, *out_effects, df=df)
    write_json(out_qc, qc)
    return qc


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m nvmeta.images.zmap METADATA MAP ZMAP QC [--mask SPEC] [--df RULE]``.

    ``--mask`` and ``--df`` are ``template.mask`` and ``conversion.df``; the other settings are the
    schema's defaults.
    """
    import argparse

    from nvmeta.images.template import load_mask
    from nvmeta.workflow.config import defaults, schema_node

    conversion, qc_cfg = defaults("conversion"), defaults("qc")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metadata")
    parser.add_argument("map")
    parser.add_argument("zmap")
    parser.add_argument("qc")
    parser.add_argument("--mask", default=defaults("template")["mask"])
    parser.add_argument("--df", default=conversion["df"], choices=schema_node("conversion.df")["enum"])
    args = parser.parse_args(argv)
    limits = {k: qc_cfg[k] for k in LIMIT_KEYS}
    qc = make_zmap(
        args.metadata,
        args.map,
        load_mask(args.mask),
        {**conversion, "df": args.df},
        args.zmap,
        args.qc,
        limits,
    )
    print(qc["status"], qc["reason"] or "")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
