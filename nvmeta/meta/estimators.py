"""Meta-analysis estimators: one class per method, in a registry (NiMARE's ``ibma`` is the model).

An estimator says what it needs per map (:attr:`Estimator.needs`: ``"z"`` or ``"effect"``,
:attr:`Estimator.needs_n`) and the fewest units a voxel needs (:attr:`Estimator.min_k`);
:meth:`Estimator.fit` reads the units from a :class:`~nvmeta.meta.units.Source` and returns a
:class:`Fit`: the named maps (``z``, ``logp``, ``k``, which voxels are reported, and any extra map
such as ``p_fwe``, ``est``, ``se``, ``tau2``). Corrections (:mod:`nvmeta.meta.correction`) and
outputs (:mod:`nvmeta.meta.outputs`) are separate, so a new estimator is one class plus its
:data:`ESTIMATORS` entry.

Every z-based estimator streams over the maps with running sums (float64
vectors over the mask voxels): memory O(voxels) whatever the number of maps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import special

from nvmeta.meta import dependence
from nvmeta.meta.units import Source

logger = logging.getLogger(__name__)

LOG2 = math.log(2.0)


def logp_from_z(z: np.ndarray, two_sided: bool) -> np.ndarray:
    """Natural log of the p-value of a z map: two-sided ``min(1, 2 Φ(−|z|))`` or upper tail ``Φ(−z)``."""
    with np.errstate(invalid="ignore"):
        if two_sided:
            return np.minimum(0.0, LOG2 + special.log_ndtr(-np.abs(z)))
        return special.log_ndtr(-z)


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


@dataclass
class Fit:
    """What an estimator returns, per template-mask voxel.

    Attributes
    ----------
    z, logp : ndarray
        Signed z and natural-log p (two- or one-sided as configured); NaN where undefined.
    k : ndarray of int
        Units with data at the voxel.
    reported : ndarray of bool
        Voxels the method reports (enough units, finite z).
    maps : dict
        Extra float maps written as ``{name}.nii.gz`` (e.g. ``est``, ``se``, ``tau2``).
    p_fwe : ndarray, optional
        Family-wise-error p-values when the method provides them (permutation).
    notes : list of str
        Warnings for ``summary.json``.
    summary : dict
        Extra ``summary.json`` entries.
    """

    z: np.ndarray
    logp: np.ndarray
    k: np.ndarray
    reported: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    p_fwe: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Estimator:
    """Base class: one meta-analysis method.

    Parameters
    ----------
    cfg : dict
        The analysis' ``meta`` block.
    n_jobs : int
        Threads the rule gave the job.
    log : logging.Logger, optional
        Defaults to the module logger.
    workdir : Path, optional
        The job's output directory (for temporaries, swept by :func:`nvmeta.meta.outputs.sweep`).
    """

    #: Registry name (``meta.methods`` value).
    name: ClassVar[str] = ""
    #: ``"z"`` (z-maps) or ``"effect"`` (g and var(g) maps).
    needs: ClassVar[str] = "z"
    #: Needs a sample size per map (maps without one are left out, with a warning).
    needs_n: ClassVar[bool] = False
    #: Fewest units a voxel needs (raises the configured ``min_maps`` when larger).
    min_k: ClassVar[int] = 1
    #: Summary label of the per-map step of ``combine_within: collection``.
    combine_label: ClassVar[str] = "Stouffer-combined"

    def __init__(
        self, cfg: dict, n_jobs: int = 1, log: logging.Logger | None = None, workdir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.workdir = workdir  # where the job may keep temporaries (its output directory)
        self.two_sided = bool(cfg["two_sided"])
        self.n_jobs = int(n_jobs)
        self.log = log or logger

    def fit(self, source: Source, k_min: int) -> Fit:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``fit`` kept for later diagnostics (temporaries)."""


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


class _StoufferSums(_Accumulator):
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
        return z, logp_from_z(z, self.two_sided)

    def without(self, ids, z, n):
        out = _StoufferSums(len(ids), self.two_sided, self.weighted)
        ok = ~np.isnan(z)
        w = math.sqrt(n) if self.weighted else 1.0
        out.swz, out.sw2, out.k = (
            self.swz[ids] - np.where(ok, w * z, 0.0),
            self.sw2[ids] - ok * w * w,
            self.k[ids] - ok,
        )
        return out


class _FisherSums(_Accumulator):
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
            lp = np.minimum(0.0, LOG2 + np.minimum(lp_pos, lp_neg))
            zz = -special.ndtri_exp(lp - LOG2)
            zz = np.where(lp_neg < lp_pos, -zz, zz)
        else:
            lp = lp_pos
            zz = -special.ndtri_exp(lp)
        z[has] = zz
        logp[has] = lp
        return z, logp

    def without(self, ids, z, n):
        out = _FisherSums(len(ids), self.two_sided)
        ok = ~np.isnan(z)
        zo = np.where(ok, z, 0.0)
        out.slp_pos = self.slp_pos[ids] - np.where(ok, special.log_ndtr(-zo), 0.0)
        out.slp_neg = self.slp_neg[ids] - np.where(ok, special.log_ndtr(zo), 0.0)
        out.k = self.k[ids] - ok
        return out


class _TTestSums(_Accumulator):
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
        from nvmeta.images.stats import t_to_z

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
        return z, logp_from_z(z, self.two_sided)

    def without(self, ids, z, n):
        """Welford step backwards: remove one value from the running mean and M2."""
        out = _TTestSums(len(ids), self.two_sided)
        ok = ~np.isnan(z)
        k, mean, m2 = self.k[ids], self.mean[ids], self.m2[ids]
        k1 = k - ok
        x = np.where(ok, z, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean1 = np.where(ok, np.where(k1 > 0, (k * mean - x) / np.maximum(k1, 1), 0.0), mean)
        out.k, out.mean = k1, mean1
        out.m2 = np.maximum(0.0, np.where(ok, m2 - (x - mean) * (x - mean1), m2))
        return out


class _StreamingZ(Estimator):
    """A z-based estimator that streams over the units with an accumulator (with
    ``meta.dependence: cluster_robust``, the sandwich of :func:`nvmeta.meta.dependence.fit_z`)."""

    def accumulator(self, n_vox: int) -> _Accumulator:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, source: Source, k_min: int) -> Fit:
        if dependence.is_cluster_robust(self.cfg):
            return dependence.fit_z(self, source, k_min)
        acc = self.accumulator(source.n_vox)
        self._acc, self._source = acc, source
        for i, (unit, zvec) in enumerate(source.iter_z()):
            acc.add(zvec, unit.n)
            if (i + 1) % 100 == 0:
                self.log.info(f"{self.name}: {i + 1}/{source.n_units} maps read")
        z, logp = acc.finish()
        reported = (acc.k >= k_min) & np.isfinite(z)
        return Fit(z=z, logp=logp, k=acc.k, reported=reported, notes=list(acc.warnings))

    def jackknife(self, labels: np.ndarray, z_full: np.ndarray, plan, collections: dict) -> list[dict]:
        """Leave-one-out per cluster from the running sums: each unit is read once more and its
        contribution removed (NiMARE's Jackknife; rows as :meth:`nvmeta.meta.effects`'s)."""
        from nvmeta.meta.effects import jackknife_rows

        if dependence.is_cluster_robust(self.cfg):
            return dependence.jackknife_z(self, labels, z_full, plan, collections)
        ids = np.flatnonzero(labels > 0)

        def z_without(i, unit, zvec):
            return self._acc.without(ids, zvec[ids], unit.n).finish()[0]

        return jackknife_rows(labels, ids, z_full, plan, collections,
                              ((i, u, z) for i, (u, z) in enumerate(self._source.iter_z())), z_without)  # fmt: skip

    def close(self) -> None:
        dependence.close(self)


class Stouffer(_StreamingZ):
    """``z = Σ z_i / √k`` over the ``k`` maps that have data at the voxel.

    On maps that all cover every voxel this is the formula of nilearn's NeuroVault stop-go
    example, ``np.sum(z, axis=3) / np.sqrt(K)``.
    """

    name = "stouffer"

    def accumulator(self, n_vox):
        return _StoufferSums(n_vox, self.two_sided)


class WeightedStouffer(_StreamingZ):
    """``z = Σ w_i z_i / √(Σ w_i²)`` with ``w_i = √n_i``, as NiMARE's ``Stouffers(use_sample_size=True)``.

    ``n_i`` is the image's resolved sample size (``qc.json``'s ``n``); maps without one are left
    out (with a warning).
    """

    name = "weighted_stouffer"
    needs_n = True

    def accumulator(self, n_vox):
        return _StoufferSums(n_vox, self.two_sided, weighted=True)


class Fisher(_StreamingZ):
    """``X = −2 Σ ln p_i`` with one-sided ``p_i = Φ(−z_i)``, referred to χ² with ``2k`` df.

    Computed as ``log_ndtr`` and a log survival function (exact in the far tail), returned as
    ``z = Φ⁻¹(1 − p)``. With ``two_sided`` the test is the concordant test of Winkler et al.
    (2016), as NiMARE's ``Fishers(two_sided=True)``: ``p = min(1, 2 min(p₊, p₋))`` and
    ``z = ±Φ⁻¹(1 − p/2)`` with the sign of the winning direction.
    """

    name = "fisher"

    def accumulator(self, n_vox):
        return _FisherSums(n_vox, self.two_sided)


class TTest(_StreamingZ):
    """Random-effects one-sample t-test of the z values across maps (``df = k − 1``, ``k >= 2``).

    Converted to z with the exact :func:`nvmeta.images.stats.t_to_z`. Tests consistency across studies
    rather than combined evidence.
    """

    name = "ttest"
    min_k = 2

    def accumulator(self, n_vox):
        return _TTestSums(n_vox, self.two_sided)


# ----------------------------------------------------------------------------------------
# permutation
# ----------------------------------------------------------------------------------------

#: Maps (float64, no-data voxels as 0) are held in memory when they take at most this (285 maps
#: on the MNI152 2 mm mask); more maps are read again for every pass of permutations.
PERMUTATION_CACHE_BYTES = 512 << 20
#: Memory (bytes) of the permutations x voxels accumulator of the sign-flip test (float64) when
#: the maps are read again per pass (570 permutations per pass on the 2 mm mask) ...
PERMUTATION_ACC_BYTES = 1 << 30
#: ... and when they are in memory, where a pass costs no reading (35 permutations on 2 mm; a
#: larger accumulator would only cost page faults: about 5 s per fresh GiB on this project's VMs).
PERMUTATION_CACHED_ACC_BYTES = 64 << 20
#: Maps read per block (one float64 copy each) before they enter the accumulator.
PERMUTATION_BLOCK_UNITS = 64
#: Permutations whose maxima are taken at once (one float64 row per voxel each).
PERMUTATION_ROWS = 16
#: Seconds per map, permutation and voxel of the sign-flip test on 2 threads, reading included
#: (measured: 2,000 and 5,000 maps x 1,000 permutations on the 2 mm mask, 139 s and 335 s, i.e.
#: 2.95e-10 and 2.85e-10, rounded up; BENCHMARKS.md, "Permutation"). Maps held in
#: memory (at most 285 on 2 mm) cost about twice as much per map, which the 10 minutes every job
#: declares cover. :func:`permutation_runtime_minutes` declares 4 times it.
PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL = 3e-10


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


def maps_in_memory(n_units: int, n_vox: int) -> bool:
    """Whether the permutation method holds the maps in memory (:data:`PERMUTATION_CACHE_BYTES`)."""
    return 8 * int(n_units) * int(n_vox) <= PERMUTATION_CACHE_BYTES


def permutations_per_pass(n_units: int, n_vox: int) -> int:
    """How many permutations one pass accumulates (:data:`PERMUTATION_ACC_BYTES`, or
    :data:`PERMUTATION_CACHED_ACC_BYTES` when the maps are in memory)."""
    acc = PERMUTATION_CACHED_ACC_BYTES if maps_in_memory(n_units, n_vox) else PERMUTATION_ACC_BYTES
    return max(1, acc // (8 * max(1, int(n_vox))))


def permutation_memory_bytes(n_units: int, n_vox: int, n_perm: int | None = None) -> int:
    """Estimated peak memory (bytes) of the permutation method, beyond the interpreter's own.

    The permutations × voxels accumulator (float64, :func:`permutations_per_pass` rows;
    ``n_perm=None`` assumes it full), the working copy of :data:`PERMUTATION_ROWS` of its rows, the
    signs of one pass (int8 and float64), the running sums and a map being read; and either the
    maps in memory, twice while they are restricted to the complete voxels (at most
    :data:`PERMUTATION_CACHE_BYTES`), or one block of :data:`PERMUTATION_BLOCK_UNITS` maps.
    ``tests/test_meta.py`` checks it against tracemalloc's peak. Beyond the cache, it does not
    grow with the number of maps but for the signs (9 bytes per map and permutation of a pass).
    """
    n_units, n_vox = int(n_units), int(n_vox)
    per_pass = permutations_per_pass(n_units, n_vox)
    p = per_pass if n_perm is None else min(int(n_perm), per_pass)
    rows = min(PERMUTATION_ROWS, p)
    if maps_in_memory(n_units, n_vox):
        maps = 2 * 8 * n_units * n_vox
    else:
        maps = 8 * min(PERMUTATION_BLOCK_UNITS, max(1, n_units)) * (n_vox + p)
    # running sums (5 vectors) and a map being read (its template-grid volume, ~4x the mask, decoded)
    return 8 * (p + rows) * n_vox + maps + 9 * p * n_units + 24 * 8 * n_vox


def permutation_runtime_minutes(n_units: int, n_vox: int, n_perm: int) -> int:
    """Wall time (minutes) the permutation job declares: 10 minutes plus 4 times the measured
    :data:`PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL` rate.

    The test reads every map once per pass and multiplies ``n_perm`` sign vectors by the maps at
    every voxel, so its time is proportional to maps x permutations x voxels (2,000 and 5,000 maps
    cost the same per map). The factor 4 leaves room for a slower or shared node; a job that
    declared too little would be killed by SLURM at its limit.
    """
    work = int(n_units) * int(n_perm) * int(n_vox)
    return 10 + math.ceil(4 * PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL * work / 60)


def _nilearn_sign_flips(random_state: int, n_units: int, n_perm: int) -> Iterator[np.ndarray]:
    """The sign vectors nilearn's ``permuted_ols(..., n_jobs=1)`` applies, one permutation at a time.

    nilearn 0.13 seeds its one job with ``randint(1, 2**31 - 2)`` from ``check_random_state
    (random_state)`` (for an integer, ``numpy.random.RandomState(random_state)``; the config's seed
    is an integer) and, per permutation, multiplies the maps it already flipped by a new
    ``randint(2, size=(n, 1)) * 2 - 1``; the product is yielded (int8, ±1). ``tests/test_meta.py``
    checks the resulting p-values against ``permuted_ols`` itself, so a change in nilearn's
    scheme fails there.
    """
    seed = np.random.RandomState(int(random_state)).randint(1, np.iinfo(np.int32).max - 1)
    rng = np.random.RandomState(seed)
    signs = np.ones(n_units, dtype=np.int8)
    for _ in range(n_perm):
        signs = signs * (rng.randint(2, size=(n_units, 1)) * 2 - 1).astype(np.int8).ravel()
        yield signs


def _normalised_t(b: np.ndarray, n: int) -> np.ndarray:
    """t of the normalised one-sample regression, ``b √((n − 1) / (1 − b²))`` (nilearn's formula)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return b * np.sqrt((n - 1.0) / (1.0 - b * b))


class Permutation(Estimator):
    """Sign-flipping permutation test of the mean z with max-statistic FWE correction.

    The test of nilearn's :func:`~nilearn.mass_univariate.permuted_ols` (intercept only,
    ``model_intercept=False``, ``two_sided_test``) with the sign flips it draws with ``n_jobs=1``
    for ``random_state``, whatever the job's threads (which only set the BLAS threads). ``p_fwe``
    is then ``permuted_ols(..., n_jobs=1)``'s up to one permutation count at near-ties (nilearn
    computes in float32 when given float32 maps, this class in float64: 7 of 190,850 voxels on
    the pain-21 maps, BENCHMARKS.md), except where every map has the same |z| (see below).
    ``permuted_ols`` itself is not called because it needs the maps × voxels matrix in memory,
    copied per job (about 48 bytes per map and voxel with 2 jobs: 21 GiB for 2,000 maps), and
    loops over permutations with element-wise passes (about 30 s for 21 maps and 1,000
    permutations). For a sign flip ``s`` of the maps ``Y``, the normalised one-sample statistic
    ``s·y / (‖y‖ √n)`` of every voxel is one row of the matrix product ``S Y``, computed for a
    pass of permutations at a time: from the maps in memory when they fit
    :data:`PERMUTATION_CACHE_BYTES`, else accumulated block by block of maps, in as many passes
    over the maps as :data:`PERMUTATION_ACC_BYTES` requires, so memory does not grow with the
    number of maps (:func:`permutation_memory_bytes`). The method is restricted to the voxels
    where *every* unit has data (as ``permuted_ols``, which cannot take NaN), and leaves out the
    voxels where every map has the same |z| (all zeros included): some flips give them an
    infinite t (NaN in nilearn when rounding takes ``|b|`` past 1), which would set every other
    voxel's maxima. ``z``/``p`` are the parametric conversion of the same t statistic
    (``t_to_z`` with ``df = k − 1``, i.e. ``ttest`` on those voxels); ``p_fwe`` is the
    permutation FWE p-value ``(1 + #{perm: max_w T_w ≥ T_v}) / (1 + n_perm)`` with ``T = |t|``
    (two-sided) or ``t`` (one-sided). With ``meta.dependence: cluster_robust`` the flips are drawn
    for the collections and every map of a collection takes its collection's sign, and ``z`` is
    ``ttest``'s cluster-robust z (:mod:`nvmeta.meta.dependence`).
    """

    name = "permutation"
    min_k = 2

    def fit(self, source: Source, k_min: int) -> Fit:
        self._source = source  # for jackknife
        n_units, n_vox = source.n_units, source.n_vox
        summary = {
            "n_perm": int(self.cfg["n_perm"]),
            "random_state": self.cfg["random_state"],
            "n_jobs": self.n_jobs,
        }
        if n_units < k_min:
            acc0 = _StoufferSums(n_vox, self.two_sided)
            for unit, zvec in source.iter_z():
                acc0.add(zvec, unit.n)
            nan = np.full(n_vox, np.nan)
            return Fit(
                z=nan, logp=nan.copy(), k=acc0.k, reported=np.zeros(n_vox, dtype=bool),
                p_fwe=nan.copy(), summary=summary,
            )  # fmt: skip
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=max(1, self.n_jobs), user_api="blas"):
            z, k, full, p_fwe, notes = self._permute(source)
        if dependence.is_cluster_robust(self.cfg):  # the parametric z from the sandwich, as ttest's
            self._ttest = TTest(self.cfg, self.n_jobs, self.log, self.workdir)
            robust = dependence.fit_z(self._ttest, source, k_min, label=self.name)
            z = np.where(np.isfinite(z), robust.z, np.nan)
            notes += robust.notes
            summary.update(robust.summary, **self._blocks)
        summary["passes_over_maps"] = self._passes
        summary["maps_in_memory"] = maps_in_memory(n_units, n_vox)
        logp = np.full(n_vox, np.nan)
        logp[full] = logp_from_z(z[full], self.two_sided)
        # (zero variance across the maps, e.g. 2 identical units, gives no t)
        reported = full & (n_units >= k_min) & np.isfinite(z)
        n_partial = int(np.sum((k >= k_min) & ~full))
        if n_partial:
            msg = (
                f"permutation: {n_partial} voxel(s) with data in only some maps left out "
                "(the sign-flip test needs complete data)"
            )
            notes.append(msg)
            self.log.warning(msg)
        return Fit(z=z, logp=logp, k=k, reported=reported, p_fwe=p_fwe, notes=notes, summary=summary)

    def _permute(self, source: Source):
        from scipy.linalg.blas import dgemm

        cfg = self.cfg
        n_units, n_vox = source.n_units, source.n_vox
        n_perm, two_sided = int(cfg["n_perm"]), bool(cfg["two_sided"])
        need = permutation_memory_bytes(n_units, n_vox, n_perm)
        have = available_memory_bytes()
        if need > 0.9 * have:
            raise MemoryError(
                f"meta method 'permutation' needs about {need / 2**30:.1f} GiB for {n_units} maps x {n_vox} "
                f"voxels, but only {have / 2**30:.1f} GiB is available. Use a machine with more memory, or "
                "drop 'permutation' from meta.methods (the other methods need O(voxels) memory)."
            )
        notes: list[str] = []
        cache = maps_in_memory(n_units, n_vox)
        per_pass = permutations_per_pass(n_units, n_vox)
        flips = self._sign_flips(source, n_perm, two_sided, notes)
        h0 = np.empty(n_perm)
        sums = _TTestSums(n_vox, two_sided)  # the unflipped t (ttest's), and k
        total = np.zeros(n_vox)
        sumsq = np.zeros(n_vox)
        amax = np.zeros(n_vox)  # largest and smallest |z| (NaN ignored)
        amin = np.full(n_vox, np.inf)
        maps = np.empty((n_units, n_vox)) if cache else None
        block = None if cache else np.empty((min(PERMUTATION_BLOCK_UNITS, n_units), n_vox))
        acc_buf = cols = None
        done = self._passes = 0
        while done < n_perm:
            p = min(per_pass, n_perm - done)
            signs = np.stack([next(flips) for _ in range(p)])  # p x n_units, int8
            first = done == 0
            if not cache:
                if acc_buf is None:  # once: fresh pages cost more than refilling them
                    acc_buf = np.empty((min(per_pass, n_perm), n_vox))
                acc = acc_buf[:p]
                acc.fill(0.0)
            if first or not cache:
                self._passes += 1
                i = 0
                for j, (unit, zvec) in enumerate(source.iter_z()):
                    if first:
                        sums.add(zvec, unit.n)
                        ok = ~np.isnan(zvec)
                        total[ok] += zvec[ok]
                        sumsq[ok] += zvec[ok] ** 2
                        az = np.abs(zvec)
                        np.fmax(amax, az, out=amax)
                        np.fmin(amin, az, out=amin)
                    if cache:
                        maps[j] = np.nan_to_num(zvec, nan=0.0)
                        continue
                    block[i] = np.nan_to_num(zvec, nan=0.0)
                    i += 1
                    if i == len(block) or j == n_units - 1:
                        # acc += S[:, maps] @ block, in place (acc.T is Fortran-ordered; a
                        # numpy product would allocate a second accumulator)
                        flip = np.asfortranarray(signs[:, j + 1 - i : j + 1].T, dtype=np.float64)
                        dgemm(1.0, block[:i].T, flip, beta=1.0, c=acc.T, overwrite_c=1)
                        i = 0
            if first:
                k = sums.k
                full = k == n_units
                if not full.any():
                    raise ValueError("permutation: no voxel has data in every map")
                self.log.info(
                    f"permutation: sign flips of {n_units} maps x {int(full.sum())} voxels, n_perm={n_perm}, "
                    + ("maps in memory" if cache else f"{-(-n_perm // per_pass)} pass(es) over the maps")
                    + f", {self.n_jobs} BLAS thread(s)"
                )
                scale = np.sqrt(sumsq[full] * n_units)  # ‖y‖ √n
                with np.errstate(invalid="ignore", divide="ignore"):
                    t0 = _normalised_t(total[full] / scale, n_units)
                # Where every map has the same |z| (all zero included), the flips that line the
                # signs up give |b| = 1, an infinite t (or, rounded past 1, NaN in nilearn, which
                # then skips the voxel): such voxels have no permutation distribution worth the
                # name and would set the maxima of every other voxel. They are left out.
                degenerate = (amax - amin)[full] <= 1e-6 * amax[full]
                t0[degenerate] = np.nan
                live = np.flatnonzero(full)[~degenerate]  # the voxels with a statistic
                inv_scale = 1.0 / scale[~degenerate]
                if degenerate.any():
                    msg = (
                        f"permutation: {int(degenerate.sum())} voxel(s) where every map has the same |z| "
                        "(or z = 0) left unreported (their sign flips have no variance)"
                    )
                    notes.append(msg)
                    self.log.warning(msg)
                if cache:  # keep those voxels only, normalised once: b = S @ maps
                    if len(live) < n_vox:
                        maps = np.ascontiguousarray(maps[:, live])
                    maps *= inv_scale
                    acc_buf = np.empty((min(per_pass, n_perm), len(live)))
                elif len(live) < n_vox:
                    cols = live
            if cache:
                acc = acc_buf[:p]
                np.matmul(signs.astype(np.float64), maps, out=acc)
            # t is increasing in the normalised statistic b, so a permutation's max |t| is the t
            # of its max |b| over the voxels that have a statistic (non-zero data)
            for r in range(0, p, PERMUTATION_ROWS):
                rows = acc[r : r + PERMUTATION_ROWS]
                b = rows[:, cols] if cols is not None else rows  # a copy, or acc itself
                if not cache:
                    b *= inv_scale
                bmax = (np.abs(b, out=b) if two_sided else b).max(axis=1) if b.shape[1] else np.nan
                h0[done + r : done + r + len(rows)] = _normalised_t(bmax, n_units)
            # a flip of every map or of none is the data itself, up to the sign: its maximum *is*
            # the largest voxel statistic, a tie that a summation in another order would break
            for r in np.flatnonzero((signs == signs[:, :1]).all(axis=1)):
                h0[done + r] = np.fmax.reduce(
                    np.fabs(t0) if two_sided else t0 * float(signs[r, 0]), initial=-np.inf
                )
            done += p
        del acc_buf, acc, rows, b, maps, block
        stat = np.fabs(t0) if two_sided else t0
        # nilearn's rank: how many permutations' maxima lie strictly below the voxel's statistic.
        # A maximum equal to it (a flip that changes only maps with z = 0 there, say) is a tie that
        # nilearn's one formula keeps exact; here the observed statistic and the permuted ones are
        # summed in different orders, so a tie is taken within 1e-10 (relative) of it.
        below = np.searchsorted(np.sort(h0[~np.isnan(h0)]), stat - 1e-10 * np.abs(stat), side="left")
        p_fwe = np.full(n_vox, np.nan)
        p_fwe[full] = np.where(np.isnan(stat), np.nan, (n_perm + 1 - below) / float(n_perm + 1))
        z, _logp = sums.finish()
        z[~full] = np.nan
        z[np.flatnonzero(full)[degenerate]] = np.nan
        return z, k, full, p_fwe, notes

    def _sign_flips(
        self, source: Source, n_perm: int, two_sided: bool, notes: list[str]
    ) -> Iterator[np.ndarray]:
        """nilearn's flips of the maps or, with ``meta.dependence: cluster_robust``, of whole collections."""
        n_units, seed = source.n_units, self.cfg["random_state"]
        if not dependence.is_cluster_robust(self.cfg):
            if 2**n_units < n_perm:
                notes.append(
                    f"permutation: only 2^{n_units} = {2**n_units} distinct sign flips for n_perm={n_perm}"
                )
            return _nilearn_sign_flips(seed, n_units, n_perm)
        blocks = dependence.clusters_of(source.plan)
        more, self._blocks = dependence.permutation_notes(blocks, n_perm, float(self.cfg["alpha"]), two_sided)
        for msg in more:
            self.log.warning(msg)
        notes += more
        return dependence.block_sign_flips(seed, blocks, n_perm)

    def jackknife(self, labels: np.ndarray, z_full: np.ndarray, plan, collections: dict) -> list[dict]:
        """Leave-one-out per cluster of the parametric z (no permutations needed).

        ``z`` of this method is ``t_to_z`` of the one-sample t on the voxels where every unit has
        data, i.e. the ``ttest`` estimator there; so leaving a map out is exactly a ``ttest`` refit
        without it, done from the running sums as :meth:`_StreamingZ.jackknife` does. The FWE
        p-values are not refitted (that would need ``n_perm`` permutations per map).
        """
        ttest = getattr(self, "_ttest", None)  # the cluster-robust fit of the parametric z
        if ttest is None:
            ttest = TTest(self.cfg, self.n_jobs, self.log, self.workdir)
            # clusters can only lie where permutation reports, i.e. on complete-data voxels
            ttest.fit(self._source, 2)
        return ttest.jackknife(labels, z_full, plan, collections)

    def close(self) -> None:
        if getattr(self, "_ttest", None) is not None:
            self._ttest.close()


#: Method name -> estimator class (``meta.methods``). Effect-size estimators register in
#: :mod:`nvmeta.meta.effects`.
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Stouffer, WeightedStouffer, Fisher, TTest, Permutation)
}


def get_estimator(name: str) -> type[Estimator]:
    """The estimator class registered as ``name`` (``ValueError`` naming the known ones)."""
    from nvmeta.meta import effects  # noqa: F401  (registers the effect-size estimators)

    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown meta method {name!r}; expected one of {', '.join(ESTIMATORS)}") from None


def combine(method: str, z: np.ndarray, *, n: np.ndarray | None = None, two_sided: bool = True):
    """In-memory version of the streaming z estimators, for a maps × voxels array (NaN = no data).

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
        acc = _StoufferSums(z.shape[1], two_sided, weighted=method == "weighted_stouffer")
    elif method == "fisher":
        acc = _FisherSums(z.shape[1], two_sided)
    elif method == "ttest":
        acc = _TTestSums(z.shape[1], two_sided)
    else:
        raise ValueError(f"combine: unsupported method {method!r}")
    for i in range(z.shape[0]):
        acc.add(z[i], None if n is None else float(n[i]))
    zz, logp = acc.finish()
    return zz, np.exp(logp), acc.k.copy()
