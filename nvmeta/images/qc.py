"""Per-analysis QC table and funnel: which images are used, which are left out and why.

:func:`build_qc` reads the selection (``selection.tsv``) and, for each image, its ``metadata.json`` (download) and
``qc.json`` (per-image job), then applies the analysis-level rules, in this order, to the images still included:

1. coverage < ``qc.min_coverage`` (default 0.5)       -> ``"low coverage: 0.31 < 0.5"``
2. max |z| < ``qc.min_max_abs_z`` (default 1.96)      -> ``"max |z| < 1.96 (probably not a t/z map)"``
3. max |z| > ``qc.max_abs_z`` (default 50)            -> ``"max |z| > 50"``
4. duplicates and sign-flipped copies: Pearson r on the voxels both maps have data in; when
   ``|r| > qc.duplicate_r`` (default 0.99) the map that comes first in selection order is kept and the other is
   excluded: ``"duplicate of image 12 (r=0.999)"`` or ``"sign-flipped copy of image 12 (r=-0.999)"``. Maps are
   compared with the maps kept so far only, and need at least ``MIN_SHARED_VOXELS`` shared voxels.

Soft warnings go to the ``flags`` column (``"; "``-separated) and do not exclude.

The funnel has one row per stage, ``selected -> downloaded -> converted -> passed QC``: ``count`` images reach the
stage, ``excluded_here`` are lost at it and ``reasons`` breaks those down (``"2 × download failed: ...; 1 × ..."``).

Duplicate search cost (:func:`find_duplicates`): every map is read once. Up to 64 maps all pairs are computed
exactly (shared-voxel sums from chunked matrix products of the data and validity matrices). Above, all pairs are
screened on a fixed, evenly spaced subsample of 2,000 mask voxels and only pairs with
``|r_sub| > duplicate_r - 0.05`` are checked exactly on all voxels: the pairwise cost falls ~110x on the MNI 2 mm
mask. Maps are held in memory when ``k x v`` float32 fit in ``memory_bytes`` (default 2 GB, about 2,000 maps);
above, only the subsample is held (10,000 maps: 80 MB) and candidate pairs are re-read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

QC_COLUMNS = [
    "image_id",
    "collection_id",
    "name",
    "contrast_definition",
    "number_of_subjects",
    "n",
    "n_source",
    "status",
    "reason",
    "flags",
    "df",
    "df_source",
    "coverage",
    "max_abs_z",
    "z_min",
    "z_max",
]
FUNNEL_COLUMNS = ["stage", "count", "excluded_here", "reasons"]
STAGES = ["selected", "downloaded", "converted", "passed QC"]
#: Pairs of maps sharing fewer voxels than this are never called duplicates.
MIN_SHARED_VOXELS = 100
#: Soft-warning thresholds (flags only).
FLAG_LOW_COVERAGE = 0.8
FLAG_HIGH_Z = 30.0


def _fmt(x: float) -> str:
    """Short number for reasons: 0.31, 1.96, 50, 0.999."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _num(x: Any) -> float | None:
    try:
        if x is None or isinstance(x, bool):
            return None
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def reason_key(reason: str | None) -> str:
    """Group exclusion reasons for the funnel: drop image-specific numbers (coverage value, image id, r)."""
    if not reason:
        return ""
    for prefix in (
        "low coverage",
        "duplicate of image",
        "sign-flipped copy of image",
        "too many volumes",
        "implausible sample size",
        "implausible degrees of freedom",
        "implausible effect size",
        "map too large",
    ):
        if reason.startswith(prefix):
            return prefix
    return reason


def _reasons_summary(reasons: Iterable[str]) -> str:
    counts = Counter(reason_key(r) for r in reasons)
    return "; ".join(f"{n} × {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# QC table
# --------------------------------------------------------------------------------------------------------------


def _flags(row: dict, qc_cfg: dict) -> list[str]:
    flags = []
    if row.get("df_source") in ("n-2", "n-1"):
        flags.append(f"df assumed from sample size ({row['df_source']})")
    elif row.get("df_source") in ("override_image", "override_collection"):
        flags.append(f"df from config ({row['df_source']})")
    if row.get("n_source") in ("n_images", "n_collections"):
        flags.append(f"n from config ({row['n_source']})")
    cov = _num(row.get("coverage"))
    if cov is not None and qc_cfg["min_coverage"] <= cov < FLAG_LOW_COVERAGE:
        flags.append(f"partial coverage: {_fmt(cov)}")
    zmin, zmax = _num(row.get("z_min")), _num(row.get("z_max"))
    if zmin is not None and zmin >= 0:
        flags.append("all positive")
    if zmax is not None and zmax <= 0:
        flags.append("all negative")
    mz = _num(row.get("max_abs_z"))
    if mz is not None and FLAG_HIGH_Z < mz <= qc_cfg["max_abs_z"]:
        flags.append(f"max |z| > {_fmt(FLAG_HIGH_Z)}")
    return flags


def _empty(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, str) and not x.strip():
        return None
    return x


def build_qc(
    selection_tsv: str | os.PathLike,
    image_dir_for: Callable[[int], Path],
    qc_cfg: Mapping[str, Any] | None = None,
    logger: logging.Logger | None = None,
    mask_img: Any = None,
    memory_bytes: int = DUPLICATE_SEARCH_BYTES,
):
    """Build the per-analysis QC table and funnel.

    Parameters
    ----------
    selection_tsv : path-like
        ``results/analyses/{analysis}/selection.tsv``.
    image_dir_for : callable
        ``image_dir_for(image_id) -> Path`` of ``results/images/{image_id}/`` (holding metadata.json, qc.json,
        zmap.nii.gz).
    qc_cfg : mapping, optional
        ``config["qc"]`` (every key; build one as ``{**nvmeta.workflow.config.defaults("qc"), ...}``); None: the
        schema defaults.
    logger : logging.Logger, optional
        Progress and warnings (default: this module's logger).
    mask_img : nibabel.Nifti1Image, optional
        Template mask used to vectorise the z-maps for the duplicate search; by default the voxels where any
        included map has data (same result: voxels outside the mask are NaN in every z-map).
    memory_bytes : int
        Memory budget of the duplicate search (see module docstring).

    Returns
    -------
    qc_df : pandas.DataFrame
        One row per selected image in selection order, columns :data:`QC_COLUMNS`.
    funnel_df : pandas.DataFrame
        Columns :data:`FUNNEL_COLUMNS`, one row per stage in :data:`STAGES`.
    """
    import pandas as pd

    log = logger if logger is not None else logging.getLogger(__name__)
    if qc_cfg is None:
        from nvmeta.workflow.config import defaults

        qc_cfg = defaults("qc")
    cfg = qc_cfg
    sel = pd.read_csv(selection_tsv, sep="\t", dtype=str, keep_default_na=False)
    rows: list[dict] = []
    stage_lost: dict[str, list[str]] = {s: [] for s in STAGES[1:]}
    for rec in sel.to_dict("records"):
        image_id = int(float(rec["image_id"]))
        d = Path(image_dir_for(image_id))
        row: dict[str, Any] = {c: None for c in QC_COLUMNS}
        row.update(
            image_id=image_id,
            collection_id=_int(rec.get("collection_id")),
            name=_empty(rec.get("name")),
            contrast_definition=_empty(rec.get("contrast_definition")),
            number_of_subjects=_int(rec.get("number_of_subjects")),
        )
        meta = _read_json(d / "metadata.json")
        nv = (meta or {}).get("nvmeta") or {}
        qc = _read_json(d / "qc.json")
        if qc is not None:  # the one resolved sample size (contract C3), not the record's
            row.update(n=_int(qc.get("n")), n_source=qc.get("n_source"))
        if meta is None or nv.get("status") != "ok":
            if meta is None:
                reason = "download failed: metadata.json missing"
            else:
                reason = (qc or {}).get(
                    "reason"
                ) or f"download failed: {nv.get('reason') or 'unknown reason'}"
            row.update(status="excluded", reason=reason)
            stage_lost["downloaded"].append(reason)
            rows.append(row)
            continue
        if qc is None:
            reason = "not converted: qc.json missing"
            log.warning("image %s: %s", image_id, reason)
            row.update(status="excluded", reason=reason)
            stage_lost["converted"].append(reason)
            rows.append(row)
            continue
        for key in ("df", "df_source", "coverage", "max_abs_z", "z_min", "z_max"):
            row[key] = qc.get(key)
        if row["collection_id"] is None:
            row["collection_id"] = _int(qc.get("collection_id"))
        if qc.get("status") != "included":
            reason = qc.get("reason") or "excluded (no reason given)"
            row.update(status="excluded", reason=reason)
            stage_lost["converted"].append(reason)
            rows.append(row)
            continue
        reason = None
        cov, mz = _num(qc.get("coverage")), _num(qc.get("max_abs_z"))
        if cov is None or cov < cfg["min_coverage"]:
            reason = f"low coverage: {_fmt(cov or 0.0)} < {_fmt(cfg['min_coverage'])}"
        elif mz is None or mz < cfg["min_max_abs_z"]:
            reason = f"max |z| < {_fmt(cfg['min_max_abs_z'])} (probably not a t/z map)"
        elif mz > cfg["max_abs_z"]:
            reason = f"max |z| > {_fmt(cfg['max_abs_z'])}"
        row.update(status="excluded" if reason else "included", reason=reason)
        if reason:
            stage_lost["passed QC"].append(reason)
        rows.append(row)

    # duplicates among the maps still included
    kept = [i for i, r in enumerate(rows) if r["status"] == "included"]
    if len(kept) >= 2:
        log.info("duplicate search over %d maps (|r| > %s)", len(kept), cfg["duplicate_r"])
        vox = _vector_index(mask_img, [image_dir_for(rows[i]["image_id"]) for i in kept])

        def load(m: int) -> np.ndarray:
            return _load_vector(Path(image_dir_for(rows[kept[m]]["image_id"])) / "zmap.nii.gz", vox)

        dups = find_duplicates(
            load, len(kept), threshold=float(cfg["duplicate_r"]), memory_bytes=memory_bytes
        )
        for j, (i, r) in sorted(dups.items()):
            row, other = rows[kept[j]], rows[kept[i]]
            kind = "sign-flipped copy" if r < 0 else "duplicate"
            reason = f"{kind} of image {other['image_id']} (r={r:.3f})"
            row.update(status="excluded", reason=reason)
            stage_lost["passed QC"].append(reason)
            log.info("image %s: %s", row["image_id"], reason)

    for row in rows:
        row["flags"] = "; ".join(_flags(row, cfg)) if row["status"] == "included" else None
        for key in ("coverage", "max_abs_z", "z_min", "z_max", "df"):
            row[key] = _num(row[key])

    qc_df = pd.DataFrame(rows, columns=QC_COLUMNS)
    for col in ("image_id", "collection_id", "number_of_subjects", "n"):
        qc_df[col] = qc_df[col].astype("Int64")

    count = len(rows)
    funnel = [{"stage": "selected", "count": count, "excluded_here": 0, "reasons": ""}]
    for stage in STAGES[1:]:
        lost = stage_lost[stage]
        count -= len(lost)
        funnel.append(
            {"stage": stage, "count": count, "excluded_here": len(lost), "reasons": _reasons_summary(lost)}
        )
    funnel_df = pd.DataFrame(funnel, columns=FUNNEL_COLUMNS)
    n_inc = int((qc_df["status"] == "included").sum())
    log.info("QC: %d selected, %d included", len(rows), n_inc)
    return qc_df, funnel_df


def _int(x: Any) -> int | None:
    f = _num(_empty(x))
    return int(f) if f is not None else None


def _vector_index(mask_img: Any, dirs: list[Path]) -> np.ndarray:
    """Flat indices of the voxels used for the duplicate search."""
    import nibabel as nib

    if mask_img is not None:
        return np.flatnonzero(np.asarray(mask_img.dataobj).ravel() > 0)
    union = None
    for d in dirs:
        z = np.asarray(nib.load(Path(d) / "zmap.nii.gz").dataobj, dtype=np.float32).ravel()
        union = np.isfinite(z) if union is None else union | np.isfinite(z)
    return np.flatnonzero(union)


def _load_vector(path: Path, vox: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float32).ravel()[vox]


def write_qc(
    selection_tsv: str | os.PathLike,
    image_dir_for: Callable[[int], Path],
    qc_cfg: Mapping[str, Any] | None,
    qc_tsv: str | os.PathLike,
    funnel_tsv: str | os.PathLike,
    logger: logging.Logger | None = None,
    mask_img: Any = None,
):
    """Build (:func:`build_qc`) and write ``qc.tsv`` and ``funnel.tsv`` atomically; return both tables."""
    from nvmeta.io import write_tsv

    qc_df, funnel_df = build_qc(selection_tsv, image_dir_for, qc_cfg, logger=logger, mask_img=mask_img)
    write_tsv(qc_tsv, qc_df)
    write_tsv(funnel_tsv, funnel_df)
    return qc_df, funnel_df
