"""Meta-analysis estimators: the base classes and the z-combination methods (NiMARE's ``ibma``).

An estimator says what it needs per map (:attr:`Estimator.needs`: ``"z"`` or ``"effect"``,
:attr:`Estimator.needs_n`) and the fewest units a voxel needs (:attr:`Estimator.min_k`);
:meth:`Estimator.fit` reads the units from a :class:`~nvmeta.meta.units.Source` and returns a
:class:`Fit`: the named maps (``z``, ``logp``, ``k``, which voxels are reported, and any extra map
such as ``p_fwe``, ``est``, ``se``, ``tau2``). Corrections (:mod:`nvmeta.meta.correction`) and
outputs (:mod:`nvmeta.meta.outputs`) are separate, so a new estimator is one class plus its entry
in :mod:`nvmeta.meta.registry`, which lists these, :mod:`nvmeta.meta.permutation`'s and
:mod:`nvmeta.meta.effects`' estimators.

Every z-based estimator here streams over the maps with running sums (float64
vectors over the mask voxels): memory O(voxels) whatever the number of maps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import special

from nvmeta.meta import dependence

# the permutation job's budget, which workflow/rules/common.smk imports from here
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
    #: Why ``meta.dependence: cluster_robust`` cannot apply to this method (None: it can).
    no_sandwich: ClassVar[str | None] = None
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


def jackknife_rows(labels, ids, z_full, plan, collections, units, z_without) -> list[dict]:
    """Rows of ``jackknife.tsv`` from ``z_without(i, unit, data) -> z over ids`` for each unit.

    Per cluster and unit: the cluster's mean z with the unit left out and the unit's share, the
    mean over the cluster's voxels of ``1 − z_without / z_full`` (NaN ratios count as 0), as
    NiMARE's ``Jackknife``.
    """
    rows: list[dict] = []
    if ids.size == 0:
        return rows
    lab = labels[ids]
    n_cl = int(lab.max())
    size = np.bincount(lab, minlength=n_cl + 1).astype(float)
    zf = z_full[ids]
    for i, unit, data in units:
        zw = z_without(i, unit, data)
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.nan_to_num(zw / zf)
        fin = np.isfinite(zw)
        sum_z = np.bincount(lab[fin], weights=zw[fin], minlength=n_cl + 1)
        n_z = np.bincount(lab[fin], minlength=n_cl + 1)
        share = np.bincount(lab, weights=1.0 - prop, minlength=n_cl + 1)
        cid = {collections.get(j) for j in unit.image_ids}
        cid_s = ";".join(str(int(c)) for c in sorted(c for c in cid if c is not None and np.isfinite(c)))
        for c in range(1, n_cl + 1):
            if size[c]:
                rows.append({
                    "cluster": c, "unit": unit.label, "image_ids": ";".join(str(j) for j in unit.image_ids),
                    "collection_id": cid_s,
                    "z_mean_without": float(sum_z[c] / n_z[c]) if n_z[c] else float("nan"),
                    "share": float(share[c] / size[c]),
                })  # fmt: skip
    rows.sort(key=lambda r: r["cluster"])
    return rows


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
        contribution removed (NiMARE's Jackknife; rows of :func:`jackknife_rows`)."""
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
    no_sandwich = "Fisher's chi-squared combines p-values and is no weighted mean, so it has no sandwich form"

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


#: The z-combination estimators, in the order :data:`nvmeta.meta.registry.ESTIMATORS` lists them.
Z_ESTIMATORS = (Stouffer, WeightedStouffer, Fisher, TTest)


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
