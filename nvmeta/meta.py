"""Image-based meta-analysis of template-grid z-maps (fan-in of an analysis).

Entry points used by the Snakemake scripts:

- :func:`run_method` runs one estimator over the maps an analysis included and writes
  ``results/analyses/{a}/meta/{method}/``: ``z, p, k, q, z_fdr, z_bonf`` maps (``.nii.gz``),
  ``clusters.tsv`` (FDR map) and ``clusters_bonf.tsv`` (Bonferroni map), ``z.png`` and
  ``summary.json``; ``permutation`` adds ``p_fwe``, ``z_fwe`` and ``clusters_fwe.tsv``.
- :func:`sensitivity` compares the FDR-thresholded maps of several methods (Dice overlap).

Estimators (``meta.methods``)
-----------------------------
``stouffer``
    ``z = Σ z_i / √k`` over the ``k`` maps that have data at the voxel. On maps that all
    cover every voxel this is the formula of nilearn's NeuroVault stop-go example,
    ``np.sum(z, axis=3) / np.sqrt(K)``.
``weighted_stouffer``
    ``z = Σ w_i z_i / √(Σ w_i²)`` with ``w_i = √n_i`` (``n`` = number_of_subjects), as
    NiMARE's ``Stouffers(use_sample_size=True)``. Maps without a sample size are left out
    (with a warning).
``fisher``
    ``X = −2 Σ ln p_i`` with one-sided ``p_i = Φ(−z_i)`` (computed as ``log_ndtr``), referred
    to χ² with ``2k`` degrees of freedom (log survival function, exact in the far tail), and
    returned as ``z = Φ⁻¹(1 − p)`` (``-ndtri_exp(log p)``). With ``two_sided`` the test is
    the *concordant* test of Winkler et al. (2016), as NiMARE's ``Fishers(two_sided=True)``:
    both directed tests are computed, ``p = min(1, 2 min(p₊, p₋))`` and ``z = ±Φ⁻¹(1 − p/2)``
    with the sign of the winning direction.
``ttest``
    Random-effects one-sample t-test of the z values across maps (per-voxel ``k``,
    ``df = k − 1``; needs ``k >= 2``), converted to z with the exact
    :func:`nvmeta.stats.t_to_z`. Tests consistency across studies rather than combined
    evidence.
``permutation``
    Sign-flipping permutation test of the mean z (one-sample t statistic) with
    max-statistic family-wise error correction, via nilearn's
    :func:`~nilearn.mass_univariate.permuted_ols` (``two_sided_test``, ``n_perm``,
    ``random_state`` from the config, ``n_jobs`` threads). It needs the maps × voxels matrix
    in memory (float32): a clear :class:`MemoryError` is raised up front when the estimate
    exceeds the available memory. ``permuted_ols`` cannot take NaN, so this method is
    restricted to the voxels where *every* map (or collection) has data. Its ``z``/``p``
    maps are the parametric conversion of the same t statistic (``t_to_z`` with
    ``df = k − 1``, i.e. equal to ``ttest`` on those voxels); ``p_fwe`` is the permutation
    FWE p-value and ``z_fwe`` the z map thresholded at ``p_fwe < alpha``.

p-values, corrections
---------------------
``p`` is two-sided (``p = min(1, 2 Φ(−|z|))``) when ``meta.two_sided`` (the default) and
one-sided upper-tail (``p = Φ(−z)``) otherwise; ``z`` always keeps its sign. FDR is
Benjamini–Hochberg (:func:`scipy.stats.false_discovery_control`) over the reported voxels,
``z_fdr`` is ``z`` where ``q < alpha`` and 0 elsewhere; Bonferroni keeps ``p < alpha / V``
(``V`` reported voxels). In one-sided mode only positive effects can be significant.

Reported voxels
---------------
A voxel of the template mask is reported when at least
``max(min_maps, ceil(min_fraction * K))`` maps have data there (``K`` = number of maps, or
of collections with ``combine_within: collection``). Outside the reported voxels every
float map is NaN (no data); ``k`` is an integer map (0 outside the mask).

Dependence
----------
``combine_within: collection`` first Stouffer-combines the maps of each collection, voxel by
voxel over the maps with data (``Σ z / √k_c``), so each collection counts once (weight for
``weighted_stouffer``: √ of the mean sample size of its maps). Note that this within-
collection step assumes the maps are independent. With ``none`` (the default, as the seed
example) a collection contributing several maps is logged and reported as a warning in
``summary.json``.

Memory
------
All estimators except ``permutation`` stream over the maps with running sums (float64
vectors over the mask voxels): memory is O(voxels) whatever the number of maps.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import special

from nvmeta.io import atomic_path, write_json, write_tsv

__all__ = [
    "METHODS",
    "DEFAULTS",
    "run_method",
    "sensitivity",
    "read_included",
    "combine",
    "log_chi2_sf_even",
    "available_memory_bytes",
    "permutation_memory_bytes",
    "clusters_table",
    "frozen_gc",
]

METHODS = ("stouffer", "weighted_stouffer", "fisher", "ttest", "permutation")

#: Defaults of the ``meta`` config block (contracts.md), used for missing keys.
DEFAULTS: dict[str, Any] = {
    "methods": ["stouffer"],
    "min_maps": 2,
    "min_fraction": 0.0,
    "alpha": 0.05,
    "combine_within": "none",
    "n_perm": 1000,
    "random_state": 0,
    "threshold": 3.0,
    "cut_coords": [-15, -8, 6, 30, 46, 62],
    "vmax": None,
    "two_sided": True,
    "min_cluster_voxels": 10,
}

_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------


def _as_logger(log: Any) -> Any:
    """A path becomes a logger appending to that file; anything else is returned as is."""
    if isinstance(log, str | os.PathLike):
        logger = logging.getLogger(f"nvmeta.meta[{os.fspath(log)}]")
        if not logger.handlers:
            handler = logging.FileHandler(os.fspath(log))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        return logger
    return log


def _emit(log: Any, level: str, msg: str) -> None:
    """Send ``msg`` to a :class:`logging.Logger`, a callable, or nowhere (None)."""
    if log is None:
        return
    if isinstance(log, logging.Logger) or hasattr(log, level):
        getattr(log, level)(msg)
    elif callable(log):
        log(f"{level.upper()}: {msg}" if level != "info" else msg)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Freeze the current heap for the garbage collector while nilearn runs.

    nilearn calls ``gc.collect()`` for every image it loads (``safe_get_data``); a full
    collection walks every live object (~0.2–0.5 s in a process that imported nilearn,
    matplotlib, scipy, pandas, more in a test session), which dominated the time of the
    cluster tables and figures. Objects alive before the block are moved to the permanent
    generation (``gc.freeze``) and given back afterwards (``gc.unfreeze``); objects created
    inside are still collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _mask_data(mask_img: Any) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(mask_img) if isinstance(mask_img, str | os.PathLike) else mask_img
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    mask = np.nan_to_num(data.astype(np.float64), nan=0.0) > 0
    return img, mask


def _load_vector(path: Path, mask_img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """The mask voxels of a template-grid z-map as float64 (NaN = no data)."""
    img = nib.load(path)
    shape = img.shape[:3]
    if shape != mask.shape or (len(img.shape) == 4 and img.shape[3] != 1) or len(img.shape) > 4:
        raise ValueError(f"{path}: shape {img.shape} is not the template grid {mask.shape}")
    if not np.allclose(img.affine, mask_img.affine, atol=1e-3):
        raise ValueError(f"{path}: affine differs from the template grid")
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(mask.shape)
    vec = data[mask].astype(np.float64)
    vec[~np.isfinite(vec)] = np.nan
    return vec


def _to_img(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, fill: float = np.nan, dtype=np.float32):
    out = np.full(mask.shape, fill, dtype=dtype)
    out[mask] = values.astype(dtype)
    img = nib.Nifti1Image(out, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    return img


def _save_img(img: nib.Nifti1Image, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


def _cfg(cfg: dict | None) -> dict:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (cfg or {}).items() if v is not None or k == "vmax"})
    return out


def read_included(qc_tsv: str | os.PathLike):
    """Rows of ``qc.tsv`` with ``status == "included"``, in file order.

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' ``qc.tsv``.

    Returns
    -------
    pandas.DataFrame
        Included rows with a fresh index; ``image_id`` as int, ``collection_id`` and
        ``number_of_subjects`` as float (NaN when missing).
    """
    import pandas as pd

    df = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    df = df[df["status"].astype(str).str.strip() == "included"].reset_index(drop=True)
    df["image_id"] = df["image_id"].astype(int)
    for col in ("collection_id", "number_of_subjects"):
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


# ----------------------------------------------------------------------------------------
# units (maps, or collections combined with Stouffer)
# ----------------------------------------------------------------------------------------


@dataclass
class _Unit:
    label: str
    image_ids: list[int]
    n: float | None  # sample size used for weighting (mean over the unit's maps)


@dataclass
class _Plan:
    units: list[_Unit]
    warnings: list[str] = field(default_factory=list)
    n_maps: int = 0


def _plan_units(rows, method: str, combine_within: str, log: Any) -> _Plan:
    """Group the included rows into combination units and collect dependence warnings."""
    notes: list[str] = []
    if method == "weighted_stouffer":
        n = rows["number_of_subjects"]
        bad = ~(np.isfinite(n.to_numpy()) & (n.to_numpy() > 0))
        if bad.any():
            ids = rows.loc[bad, "image_id"].tolist()
            msg = f"weighted_stouffer: {len(ids)} map(s) without a sample size left out: {ids}"
            notes.append(msg)
            _emit(log, "warning", msg)
            rows = rows.loc[~bad].reset_index(drop=True)
    groups: dict[str, list[int]] = {}
    sizes: dict[str, list[float]] = {}
    for row in rows.itertuples(index=False):
        cid = row.collection_id
        key = f"collection {int(cid)}" if np.isfinite(cid) else f"image {int(row.image_id)}"
        groups.setdefault(key, []).append(int(row.image_id))
        sizes.setdefault(key, []).append(float(row.number_of_subjects))
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if combine_within == "collection":
        units = []
        for key, ids in groups.items():
            ns = [x for x in sizes[key] if np.isfinite(x) and x > 0]
            units.append(_Unit(key, ids, float(np.mean(ns)) if ns else None))
        if multi:
            _emit(
                log,
                "info",
                "combine_within=collection: "
                + ", ".join(f"{k} ({len(v)} maps)" for k, v in multi.items())
                + " Stouffer-combined into one map each",
            )
    elif combine_within == "none":
        units = [
            _Unit(f"image {int(r.image_id)}", [int(r.image_id)], float(r.number_of_subjects))
            for r in rows.itertuples(index=False)
        ]
        for key, ids in multi.items():
            msg = (
                f"{key} contributes {len(ids)} maps, treated as independent "
                "(meta.combine_within: none; set it to 'collection' to count each collection once)"
            )
            notes.append(msg)
            _emit(log, "warning", msg)
    else:
        raise ValueError(f"meta.combine_within must be 'none' or 'collection', got {combine_within!r}")
    return _Plan(units=units, warnings=notes, n_maps=int(len(rows)))


def _iter_unit_vectors(
    plan: _Plan,
    zmap_path_for: Callable[[int], Path],
    mask_img: nib.Nifti1Image,
    mask: np.ndarray,
) -> Iterator[tuple[_Unit, np.ndarray]]:
    """Yield ``(unit, z vector)``; a multi-map unit is Stouffer-combined over its maps with data."""
    for unit in plan.units:
        if len(unit.image_ids) == 1:
            yield unit, _load_vector(Path(zmap_path_for(unit.image_ids[0])), mask_img, mask)
            continue
        s = np.zeros(int(mask.sum()))
        c = np.zeros(int(mask.sum()))
        for image_id in unit.image_ids:
            v = _load_vector(Path(zmap_path_for(image_id)), mask_img, mask)
            ok = ~np.isnan(v)
            s[ok] += v[ok]
            c[ok] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(c > 0, s / np.sqrt(c), np.nan)
        yield unit, z


# ----------------------------------------------------------------------------------------
# estimators (streaming accumulators)
# ----------------------------------------------------------------------------------------


def log_chi2_sf_even(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Natural log of the χ² survival function with ``2k`` degrees of freedom.

    Uses ``log(gammaincc(k, x/2))`` where that is a normal double, and otherwise (far tail,
    where the survival function is below 1e-280 or underflows) the exact identity
    ``P(χ²_{2k} > x) = P(Poisson(x/2) <= k − 1)``, summed in log space, so values like
    ``1e-5000`` keep full relative precision.

    Parameters
    ----------
    x : ndarray
        χ² statistics (>= 0).
    k : ndarray
        Half the degrees of freedom (positive integers), broadcastable against ``x``.

    Returns
    -------
    ndarray
        ``log P(χ²_{2k} > x)`` (float64).
    """
    x, k = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(k, dtype=np.float64))
    with np.errstate(divide="ignore", under="ignore"):
        sf = special.gammaincc(k, 0.5 * x)
        out = np.log(sf)
    far = ~(sf > 1e-280) & np.isfinite(x)
    if np.any(far):
        y = 0.5 * x[far]
        m = k[far] - 1.0  # sum over j = 0..m of y^j / j!
        log_y = np.log(y)
        lt = m * log_y - special.gammaln(m + 1.0)  # log of the largest-index term
        acc = lt.copy()
        for j in range(int(m.max()), 0, -1):
            act = m >= j  # term j exists: step down to term j - 1
            lt = np.where(act, lt + math.log(j) - log_y, lt)
            acc = np.where(act, np.logaddexp(acc, lt), acc)
        out[far] = -y + acc
    return out


class _Accumulator:
    """Running per-voxel sums; ``add`` one unit map at a time, then ``finish``."""

    def __init__(self, n_vox: int, two_sided: bool):
        self.k = np.zeros(n_vox, dtype=np.int64)
        self.two_sided = two_sided
        self.warnings: list[str] = []

    def add(self, z: np.ndarray, n: float | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Return ``(z, log p)`` (NaN where undefined)."""
        raise NotImplementedError

    def _logp_from_z(self, z: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            if self.two_sided:
                return np.minimum(0.0, _LOG2 + special.log_ndtr(-np.abs(z)))
            return special.log_ndtr(-z)


class _Stouffer(_Accumulator):
    def __init__(self, n_vox: int, two_sided: bool, weighted: bool = False):
        super().__init__(n_vox, two_sided)
        self.weighted = weighted
        self.swz = np.zeros(n_vox)
        self.sw2 = np.zeros(n_vox)

    def add(self, z, n):
        ok = ~np.isnan(z)
        w = math.sqrt(n) if self.weighted else 1.0
        self.swz[ok] += w * z[ok]
        self.sw2[ok] += w * w
        self.k[ok] += 1

    def finish(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(self.k > 0, self.swz / np.sqrt(self.sw2), np.nan)
        return z, self._logp_from_z(z)


class _Fisher(_Accumulator):
    def __init__(self, n_vox: int, two_sided: bool):
        super().__init__(n_vox, two_sided)
        self.slp_pos = np.zeros(n_vox)  # Σ ln P(Z > z_i)   (evidence for positive effects)
        self.slp_neg = np.zeros(n_vox)  # Σ ln P(Z < z_i)   (evidence for negative effects)

    def add(self, z, n):
        ok = ~np.isnan(z)
        zo = z[ok]
        self.slp_pos[ok] += special.log_ndtr(-zo)
        self.slp_neg[ok] += special.log_ndtr(zo)
        self.k[ok] += 1

    def finish(self):
        has = self.k > 0
        z = np.full(self.k.shape, np.nan)
        logp = np.full(self.k.shape, np.nan)
        kk = self.k[has]
        lp_pos = log_chi2_sf_even(-2.0 * self.slp_pos[has], kk)
        if self.two_sided:
            lp_neg = log_chi2_sf_even(-2.0 * self.slp_neg[has], kk)
            lp = np.minimum(0.0, _LOG2 + np.minimum(lp_pos, lp_neg))
            zz = -special.ndtri_exp(lp - _LOG2)
            zz = np.where(lp_neg < lp_pos, -zz, zz)
        else:
            lp = lp_pos
            zz = -special.ndtri_exp(lp)
        z[has] = zz
        logp[has] = lp
        return z, logp


class _TTest(_Accumulator):
    """Welford running mean / sum of squared deviations (numerically stable)."""

    def __init__(self, n_vox: int, two_sided: bool):
        super().__init__(n_vox, two_sided)
        self.mean = np.zeros(n_vox)
        self.m2 = np.zeros(n_vox)

    def add(self, z, n):
        ok = ~np.isnan(z)
        self.k[ok] += 1
        x = z[ok]
        delta = x - self.mean[ok]
        self.mean[ok] += delta / self.k[ok]
        self.m2[ok] += delta * (x - self.mean[ok])

    def finish(self):
        from nvmeta.stats import t_to_z

        z = np.full(self.k.shape, np.nan)
        ok = self.k >= 2
        kk = self.k[ok].astype(np.float64)
        sd = np.sqrt(self.m2[ok] / (kk - 1.0))
        degenerate = ~(sd > 0)
        if np.any(degenerate):
            msg = f"ttest: {int(degenerate.sum())} voxel(s) with zero variance across maps left unreported"
            self.warnings.append(msg)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = self.mean[ok] / (sd / np.sqrt(kk))
        t[degenerate] = np.nan
        z[ok] = t_to_z(t, kk - 1.0)
        return z, self._logp_from_z(z)


# ----------------------------------------------------------------------------------------
# permutation
# ----------------------------------------------------------------------------------------


def available_memory_bytes() -> int:
    """Memory available to this process, in bytes.

    ``MemAvailable`` from ``/proc/meminfo`` (Linux), else physical pages × page size, capped
    by a cgroup v2 ``memory.max`` limit when one is set.
    """
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2**63 - 1
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(avail)


def permutation_memory_bytes(n_units: int, n_vox: int, n_jobs: int = 1) -> int:
    """Estimated peak memory (bytes) of the permutation method for a maps × voxels problem.

    The float32 matrix we build (``n_units × n_vox``), its copy restricted to complete
    voxels, nilearn's Fortran-ordered and normalised copies (float32) and, per parallel
    job, a sign-flipped float64 copy and one temporary of the same size.
    """
    cell = int(n_units) * int(n_vox)
    return cell * 4 * 4 + max(1, int(n_jobs)) * cell * 8 * 2


def _run_permutation(plan, zmap_path_for, mask_img, mask, cfg, n_jobs, log):
    from nilearn.mass_univariate import permuted_ols

    from nvmeta.stats import t_to_z

    n_units = len(plan.units)
    n_vox = int(mask.sum())
    need = permutation_memory_bytes(n_units, n_vox, n_jobs)
    have = available_memory_bytes()
    if need > 0.9 * have:
        raise MemoryError(
            f"meta method 'permutation' needs the {n_units} maps x {n_vox} voxels matrix in memory: "
            f"about {need / 2**30:.1f} GiB estimated with n_jobs={n_jobs}, but only {have / 2**30:.1f} GiB "
            "is available. Use fewer maps (max_images, or combine_within: collection), fewer threads, "
            "a machine with more memory, or drop 'permutation' from meta.methods (the other methods "
            "stream and need O(voxels) memory)."
        )
    mat = np.empty((n_units, n_vox), dtype=np.float32)
    for i, (_unit, z) in enumerate(_iter_unit_vectors(plan, zmap_path_for, mask_img, mask)):
        mat[i] = z
    k = np.sum(np.isfinite(mat), axis=0).astype(np.int64)
    full = k == n_units
    target = np.ascontiguousarray(mat[:, full])
    del mat
    notes = []
    if 2**n_units < int(cfg["n_perm"]):
        notes.append(
            f"permutation: only 2^{n_units} = {2**n_units} distinct sign flips for n_perm={cfg['n_perm']}"
        )
    if int(full.sum()) == 0:
        raise ValueError("permutation: no voxel has data in every map")
    _emit(
        log,
        "info",
        f"permutation: permuted_ols on {n_units} maps x {int(full.sum())} voxels, n_perm={cfg['n_perm']}",
    )
    out = permuted_ols(
        np.ones((n_units, 1)),
        target,
        model_intercept=False,
        n_perm=int(cfg["n_perm"]),
        two_sided_test=bool(cfg["two_sided"]),
        random_state=cfg["random_state"],
        n_jobs=int(n_jobs),
        verbose=0,
        output_type="dict",
    )
    t_full = np.asarray(out["t"], dtype=np.float64).ravel()
    p_fwe_full = 10.0 ** (-np.asarray(out["logp_max_t"], dtype=np.float64).ravel())
    z = np.full(n_vox, np.nan)
    z[full] = t_to_z(t_full, n_units - 1.0)
    p_fwe = np.full(n_vox, np.nan)
    p_fwe[full] = p_fwe_full
    return z, k, full, p_fwe, notes


# ----------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------

_CLUSTER_COLUMNS = ["Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)", "Cluster Size (voxels)"]


def clusters_table(thresholded_img: nib.Nifti1Image, two_sided: bool, min_voxels: int = 0):
    """Cluster table of a thresholded map (0 or NaN = not significant).

    nilearn's :func:`~nilearn.reporting.get_clusters_table` (peaks and sub-peaks at least
    8 mm apart, MNI mm coordinates of the grid's affine, face-connected clusters) plus a
    cluster size in voxels. Empty (header only) when no voxel survives.
    """
    import pandas as pd
    from nilearn.reporting import get_clusters_table

    data = np.nan_to_num(np.asarray(thresholded_img.dataobj, dtype=np.float64), nan=0.0)
    nz = np.abs(data[data != 0])
    if nz.size == 0:
        return pd.DataFrame(columns=_CLUSTER_COLUMNS)
    img = nib.Nifti1Image(data.astype(np.float32), thresholded_img.affine)
    thr = float(nz.min()) * (1 - 1e-6)
    with warnings.catch_warnings():
        # two-sided tables warn when one sign has no cluster: not worth a warning here
        warnings.filterwarnings("ignore", message="No clusters found", category=UserWarning)
        table = get_clusters_table(
            img, stat_threshold=thr, cluster_threshold=int(min_voxels), two_sided=two_sided
        )
    vox_mm3 = float(abs(np.linalg.det(thresholded_img.affine[:3, :3])))
    sizes = pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce")
    table["Cluster Size (voxels)"] = (sizes / vox_mm3).round().astype("Int64")
    return table[[c for c in _CLUSTER_COLUMNS if c in table.columns]]


def _n_clusters(table) -> int:
    """Clusters in a table (sub-peak rows have an empty cluster size)."""
    import pandas as pd

    return int(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").notna().sum()) if len(table) else 0


def _plot_z(z_img, out_png: Path, cfg: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = np.nan_to_num(np.asarray(z_img.dataobj, dtype=np.float32), nan=0.0)
    fig = plt.figure(figsize=(14, 3))
    try:
        display = plotting.plot_stat_map(
            nib.Nifti1Image(data, z_img.affine),
            display_mode="z",
            threshold=cfg["threshold"],
            cut_coords=list(cfg["cut_coords"]),
            vmax=cfg["vmax"],
            title=title,
            figure=fig,
        )
        with atomic_path(out_png) as tmp:
            display.savefig(str(tmp), dpi=100)
        display.close()
    finally:
        plt.close(fig)


def _bh_q(p: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control

    if p.size == 0:
        return p.copy()
    return false_discovery_control(np.clip(p, 0.0, 1.0), method="bh")


def run_method(
    method: str,
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], Path],
    mask_img: Any,
    cfg: dict | None,
    outdir: str | os.PathLike,
    log: Any = None,
    *,
    n_jobs: int = 1,
) -> dict:
    """Run one meta-analysis estimator over an analysis' included z-maps and write its outputs.

    Parameters
    ----------
    method : {"stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"}
        Estimator (see the module docstring).
    qc_tsv : path-like
        The analysis' ``qc.tsv``; rows with ``status == "included"`` are used, in file order.
    zmap_path_for : callable
        ``image_id -> Path`` of the image's template-grid z-map (float32, NaN = no data).
    mask_img : nibabel image or path-like
        Template mask; its grid is the grid of the z-maps and of the outputs.
    cfg : dict
        The analysis' ``meta`` config block (missing keys take :data:`DEFAULTS`).
    outdir : path-like
        ``results/analyses/{a}/meta/{method}/`` (created).
    log : logging.Logger, callable, path-like or None
        Where progress and warnings go (a path: appended to that file).
    n_jobs : int, default=1
        Threads for ``permutation`` (the rule's threads).

    Returns
    -------
    dict
        The summary also written to ``summary.json``: method, k_maps, k_units, n_voxels_mask,
        n_voxels_reported, min_maps_effective, p_sided, n_significant_fdr / _bonferroni
        (/ _fwe), z_min, z_max, n_clusters, warnings, ...

    Raises
    ------
    ValueError
        Unknown method / bad config, no included maps, or a z-map off the template grid.
    MemoryError
        ``permutation`` when the maps × voxels matrix would not fit in memory.
    """
    t0 = time.perf_counter()
    log = _as_logger(log)
    if method not in METHODS:
        raise ValueError(f"unknown meta method {method!r}; expected one of {', '.join(METHODS)}")
    cfg = _cfg(cfg)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    mask_img, mask = _mask_data(mask_img)
    affine = mask_img.affine
    n_vox = int(mask.sum())
    alpha = float(cfg["alpha"])
    two_sided = bool(cfg["two_sided"])

    rows = read_included(qc_tsv)
    plan = _plan_units(rows, method, str(cfg["combine_within"]), log)
    n_units = len(plan.units)
    notes = list(plan.warnings)
    k_min = max(int(cfg["min_maps"]), int(math.ceil(float(cfg["min_fraction"]) * n_units - 1e-9)), 1)
    if method in ("ttest", "permutation") and k_min < 2:
        k_min = 2
    _emit(log, "info", f"{method}: {plan.n_maps} maps in {n_units} units, {n_vox} mask voxels, k_min={k_min}")

    p_fwe = None
    too_few = n_units < k_min
    if too_few:
        # Not an error: every image of an analysis can be excluded by QC. The outputs exist and
        # say "nothing reported" (NaN maps, empty tables), and the reason is in summary.json.
        msg = f"{method}: only {n_units} usable map(s), fewer than the {k_min} required: nothing reported"
        notes.append(msg)
        _emit(log, "warning", msg)
    if method == "permutation" and too_few:
        acc0 = _Stouffer(n_vox, two_sided)
        for unit, zvec in _iter_unit_vectors(plan, zmap_path_for, mask_img, mask):
            acc0.add(zvec, unit.n)
        k = acc0.k
        z = np.full(n_vox, np.nan)
        logp = np.full(n_vox, np.nan)
        p_fwe = np.full(n_vox, np.nan)
        reported = np.zeros(n_vox, dtype=bool)
    elif method == "permutation":
        z, k, full, p_fwe, extra = _run_permutation(plan, zmap_path_for, mask_img, mask, cfg, n_jobs, log)
        notes += extra
        logp = np.full(n_vox, np.nan)
        with np.errstate(invalid="ignore"):
            logp[full] = (
                np.minimum(0.0, _LOG2 + special.log_ndtr(-np.abs(z[full])))
                if two_sided
                else special.log_ndtr(-z[full])
            )
        reported = full & (n_units >= k_min)
        n_partial = int(np.sum((k >= k_min) & ~full))
        if n_partial:
            msg = (
                f"permutation: {n_partial} voxel(s) with data in only some maps left out "
                "(permuted_ols needs complete data)"
            )
            notes.append(msg)
            _emit(log, "warning", msg)
    else:
        acc: _Accumulator
        if method == "stouffer":
            acc = _Stouffer(n_vox, two_sided)
        elif method == "weighted_stouffer":
            acc = _Stouffer(n_vox, two_sided, weighted=True)
        elif method == "fisher":
            acc = _Fisher(n_vox, two_sided)
        else:
            acc = _TTest(n_vox, two_sided)
        for i, (unit, zvec) in enumerate(_iter_unit_vectors(plan, zmap_path_for, mask_img, mask)):
            acc.add(zvec, unit.n)
            if (i + 1) % 100 == 0:
                _emit(log, "info", f"{method}: {i + 1}/{n_units} maps read")
        z, logp = acc.finish()
        k = acc.k
        notes += acc.warnings
        reported = (k >= k_min) & np.isfinite(z)

    t_est = time.perf_counter() - t0
    z = np.where(reported, z, np.nan)
    logp = np.where(reported, logp, np.nan)
    p = np.exp(logp)
    n_rep = int(reported.sum())
    q = np.full(n_vox, np.nan)
    q[reported] = _bh_q(p[reported])
    sig_fdr = reported & (q < alpha)
    sig_bonf = reported & (p < alpha / max(n_rep, 1))
    if not two_sided:  # one-sided: only positive effects can be significant
        sig_fdr &= z > 0
        sig_bonf &= z > 0
    z_fdr = np.where(reported, np.where(sig_fdr, z, 0.0), np.nan)
    z_bonf = np.where(reported, np.where(sig_bonf, z, 0.0), np.nan)
    if n_rep == 0:
        msg = f"{method}: no voxel has data in at least {k_min} maps"
        notes.append(msg)
        _emit(log, "warning", msg)

    _save_img(_to_img(z, mask, affine), outdir / "z.nii.gz")
    _save_img(_to_img(p, mask, affine), outdir / "p.nii.gz")
    kdtype = np.int16 if n_units < 32000 else np.int32
    _save_img(_to_img(k, mask, affine, fill=0, dtype=kdtype), outdir / "k.nii.gz")
    _save_img(_to_img(q, mask, affine), outdir / "q.nii.gz")
    z_fdr_img = _to_img(z_fdr, mask, affine)
    _save_img(z_fdr_img, outdir / "z_fdr.nii.gz")
    z_bonf_img = _to_img(z_bonf, mask, affine)
    _save_img(z_bonf_img, outdir / "z_bonf.nii.gz")
    with frozen_gc():
        table = clusters_table(z_fdr_img, two_sided, cfg["min_cluster_voxels"])
        table_bonf = clusters_table(z_bonf_img, two_sided, cfg["min_cluster_voxels"])
    write_tsv(outdir / "clusters.tsv", table)
    write_tsv(outdir / "clusters_bonf.tsv", table_bonf)

    summary: dict[str, Any] = {
        "method": method,
        "k_maps": plan.n_maps,
        "k_units": n_units,
        "combine_within": str(cfg["combine_within"]),
        "min_maps_effective": k_min,
        "n_voxels_mask": n_vox,
        "n_voxels_reported": n_rep,
        "alpha": alpha,
        "p_sided": "two-sided" if two_sided else "one-sided (upper tail)",
        "n_significant_fdr": int(sig_fdr.sum()),
        "n_significant_bonferroni": int(sig_bonf.sum()),
        "z_min": float(np.nanmin(z)) if n_rep else None,
        "z_max": float(np.nanmax(z)) if n_rep else None,
        "n_clusters_fdr": _n_clusters(table),
        "n_clusters_bonferroni": _n_clusters(table_bonf),
        "warnings": notes,
        "fdr_min_abs_z": float(np.min(np.abs(z[sig_fdr]))) if sig_fdr.any() else None,
    }
    if p_fwe is not None:
        p_fwe = np.where(reported, p_fwe, np.nan)
        sig_fwe = reported & (p_fwe < alpha)
        if not two_sided:
            sig_fwe &= z > 0
        z_fwe = np.where(reported, np.where(sig_fwe, z, 0.0), np.nan)
        _save_img(_to_img(p_fwe, mask, affine), outdir / "p_fwe.nii.gz")
        z_fwe_img = _to_img(z_fwe, mask, affine)
        _save_img(z_fwe_img, outdir / "z_fwe.nii.gz")
        with frozen_gc():
            table_fwe = clusters_table(z_fwe_img, two_sided, cfg["min_cluster_voxels"])
        write_tsv(outdir / "clusters_fwe.tsv", table_fwe)
        summary["n_significant_fwe"] = int(sig_fwe.sum())
        summary["n_perm"] = int(cfg["n_perm"])
        summary["random_state"] = cfg["random_state"]
        summary["n_clusters_fwe"] = _n_clusters(table_fwe)

    title = f"{method}: {plan.n_maps} maps" + (f" / {n_units} collections" if n_units != plan.n_maps else "")
    with frozen_gc():
        _plot_z(_to_img(z, mask, affine), outdir / "z.png", cfg, title)
    summary["seconds_estimation"] = round(t_est, 3)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(outdir / "summary.json", summary)
    _emit(
        log,
        "info",
        f"{method}: {n_rep} voxels reported, {summary['n_significant_fdr']} FDR-significant, "
        f"{summary['n_significant_bonferroni']} Bonferroni-significant",
    )
    return summary


def combine(method: str, z: np.ndarray, *, n: np.ndarray | None = None, two_sided: bool = True):
    """In-memory version of the estimators, for a maps × voxels array (NaN = no data).

    Parameters
    ----------
    method : {"stouffer", "weighted_stouffer", "fisher", "ttest"}
        Estimator.
    z : ndarray, shape (n_maps, n_voxels)
        z values.
    n : ndarray, optional
        Sample sizes (``weighted_stouffer``).
    two_sided : bool
        p-value sidedness (and the Fisher variant).

    Returns
    -------
    tuple of ndarray
        ``(z, p, k)`` per voxel (no ``min_maps`` filtering).
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    acc: _Accumulator
    if method in ("stouffer", "weighted_stouffer"):
        acc = _Stouffer(z.shape[1], two_sided, weighted=method == "weighted_stouffer")
    elif method == "fisher":
        acc = _Fisher(z.shape[1], two_sided)
    elif method == "ttest":
        acc = _TTest(z.shape[1], two_sided)
    else:
        raise ValueError(f"combine: unsupported method {method!r}")
    for i in range(z.shape[0]):
        acc.add(z[i], None if n is None else float(n[i]))
    zz, logp = acc.finish()
    return zz, np.exp(logp), acc.k.copy()


# ----------------------------------------------------------------------------------------
# sensitivity panel
# ----------------------------------------------------------------------------------------


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

    _, mask = _mask_data(mask_img)
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
