"""Inference that knows the maps of one collection are not independent (``meta.dependence``).

A NeuroVault collection usually holds several maps of the same participants (contrasts, runs,
tasks); their errors are correlated, and a method that counts them as independent studies is
anticonservative. With ``meta.dependence: cluster_robust`` the methods that are a weighted mean
take their standard error from the cluster-robust ("sandwich") estimator over collections, and
``permutation`` flips whole collections together.

Cluster-robust standard errors
    A method's estimate is read as an intercept-only weighted least-squares regression of its
    per-unit values ``y_i`` with weights ``w_i``: ``est = Σ w y / Σ w``. ``stouffer`` and ``ttest``
    regress the z values with ``w = 1`` (so under this option they are the same test: a
    cluster-robust t-test of the mean z), ``weighted_stouffer`` with ``w = √n`` (the estimate is
    0 exactly when Stouffer's ``Σ √n z`` is), ``fixed_effects_hedges`` Hedges' g with
    ``w = 1 / v``, ``dersimonian_laird`` and ``hedges`` with ``w = 1 / (v + τ²)`` and their own
    τ² (computed as without the option: the weights change only the efficiency of a sandwich
    estimate, never its validity; Hedges, Tipton & Johnson 2010). The variance is the CR2
    sandwich of Bell & McCaffrey (2002) over the ``G`` collections with data at the voxel: with
    ``W = Σ w``, per collection ``W_j = Σ_{i∈j} w_i``, ``h_j = W_j / W`` and
    ``r_j = Σ_{i∈j} w_i (y_i − est)``,
    ``var = Σ_j r_j² / (1 − h_j) / W²``, and p comes from Student's t on the Satterthwaite degrees
    of freedom of that variance (Bell & McCaffrey 2002; Tipton 2015; Pustejovsky & Tipton 2018),
    ``ν = 1 / (Σ a_j² − 2 Σ a_j² h_j + (Σ a_j h_j)²)`` with ``a_j = h_j / (1 − h_j)``, which is
    ``G − 1`` when the collections weigh the same. These are the intercept-only closed forms of
    PyMARE's ``cluster_robust_cov(method="CR2")`` and ``satterthwaite_dof`` (NiMARE's ``groupby=``
    for its meta-regression estimators), which the tests compare to 1e-12. CR2 is chosen over
    CR1 with ``G − 1`` df because CR1 stays anticonservative with few collections or unequal
    weights (Tipton 2015; Pustejovsky & Tipton 2018), while CR2 with Satterthwaite df is the
    recommended default of those papers and of clubSandwich, robumeta and PyMARE. A voxel needs
    data from two collections at least (one collection has no residual to estimate from);
    with 10 collections or fewer the sandwich is still somewhat anticonservative (Hedges,
    Tipton & Johnson 2010; the summary warns), as it is below about 4 df (Tipton 2015).
``fisher``, ``median``, ``trimmed_mean``
    Have no weighted-mean form and hence no sandwich: the option refuses them with a config
    error (Fisher's χ² combines p-values; the median and trimmed mean are not linear in the g).
Whole-collection sign flips (``permutation``)
    The sign-flip test is valid under dependence when the units of one collection are flipped
    together (Winkler et al. 2014: exchangeability blocks, "whole-block" permutation): the flips
    are nilearn's ``permuted_ols(n_jobs=1)`` flips for ``random_state`` drawn for the ``G``
    collections and applied to every unit of each, so the test has ``2^G`` distinct flips and
    its smallest p is ``1/2^G`` (``2/2^G`` two-sided, where flipping every collection gives the
    same ``|t|``). The method's parametric ``z`` (its FDR and Bonferroni maps) is then the
    cluster-robust one of ``ttest``.

Memory: the z methods keep each unit's z (the effect methods already keep g and var(g)) in the
float32 stack of :class:`nvmeta.meta.effects._Stack` on disk and compute the sandwich in voxel
chunks, so memory does not grow with the number of maps.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nvmeta.images.stats import t_to_z

if TYPE_CHECKING:
    from nvmeta.meta.estimators import Estimator, Fit
    from nvmeta.meta.units import Plan, Source

logger = logging.getLogger(__name__)


def unsupported() -> dict[str, str]:
    """The methods ``meta.dependence: cluster_robust`` refuses, and why (from the registry)."""
    # imported here: the registry imports the estimator modules, which import this one
    from nvmeta.meta.registry import ESTIMATORS

    return {name: cls.no_sandwich for name, cls in ESTIMATORS.items() if cls.no_sandwich}


#: At or below this many collections the sandwich is known to be anticonservative (Hedges, Tipton
#: & Johnson 2010), the threshold at which PyMARE warns too.
FEW_CLUSTERS = 10
#: Below these degrees of freedom the Satterthwaite t reference is outside the range where
#: Tipton (2015) found it holds its level.
LOW_DF = 4.0
#: 1 − h_j is floored here (a collection with almost all the weight), as PyMARE does.
MIN_LEVERAGE_COMPLEMENT = 1e-10
#: Summary label of the variance.
VARIANCE = (
    "CR2 sandwich over collections (Bell & McCaffrey 2002), Student t with Satterthwaite df "
    "(Tipton 2015; Pustejovsky & Tipton 2018)"
)


def is_cluster_robust(cfg: dict) -> bool:
    """Whether the analysis' ``meta`` block asks for cluster-robust inference."""
    return str(cfg["dependence"]) == "cluster_robust"


def problems(meta: dict, key: str) -> list[str]:
    """Config problems of ``meta.dependence`` (``key``: the meta block's dotted key).

    ``cluster_robust`` with a method that has no sandwich form is refused, naming the method
    and the fix.
    """
    if not is_cluster_robust(meta):
        return []
    from nvmeta.meta.registry import ESTIMATORS

    refused = unsupported()
    supported = ", ".join(name for name in ESTIMATORS if name not in refused)
    return [
        f"config key {key}.dependence: 'cluster_robust' cannot be applied to method {m!r} ({refused[m]}). "
        f"Fix: drop {m!r} from {key}.methods ({supported} support it), or set dependence: none."
        for m in meta["methods"]
        if m in refused
    ]


def check(method: str, cfg: dict) -> None:
    """``ValueError`` when ``method`` cannot run with the block's ``dependence`` (direct callers;
    the workflow refuses such a config before any job: :func:`problems`)."""
    refused = unsupported() if is_cluster_robust(cfg) else {}
    if method in refused:
        raise ValueError(
            f"meta.dependence: cluster_robust cannot be applied to {method!r}: {refused[method]}"
        )


@dataclass
class Clusters:
    """The collection of every unit, as integer codes, and how to sum over them.

    Attributes
    ----------
    codes : ndarray of int, (n_units,)
        Cluster of each unit (0 .. n − 1).
    labels : list of str
        ``collection <id>``, or ``image <id>`` for a map without a collection (its own cluster).
    order, starts : ndarray of int
        The units sorted by cluster and where each cluster starts (for :func:`numpy.add.reduceat`).
    """

    codes: np.ndarray
    labels: list[str]
    order: np.ndarray
    starts: np.ndarray

    @property
    def n(self) -> int:
        return len(self.labels)

    def sums(self, x: np.ndarray) -> np.ndarray:
        """Per-cluster sums of the rows of ``x`` (units × voxels): clusters × voxels."""
        if x.shape[0] == 0:
            return np.zeros((0,) + x.shape[1:])
        return np.add.reduceat(x[self.order], self.starts, axis=0)


def clusters_of(plan: Plan) -> Clusters:
    """The collection of each unit of ``plan`` (a multi-map unit is one collection already)."""
    index: dict[str, int] = {}
    codes = []
    for unit in plan.units:
        first = unit.image_ids[0]
        cid = plan.collections.get(first, math.nan)
        key = f"collection {int(cid)}" if math.isfinite(cid) else f"image {int(first)}"
        codes.append(index.setdefault(key, len(index)))
    codes_a = np.asarray(codes, dtype=np.int64)
    order = np.argsort(codes_a, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes_a[order]) != 0]) if codes else np.zeros(0, np.int64)
    return Clusters(codes_a, list(index), order, starts)


def cr2_intercept(y: np.ndarray, w: np.ndarray, clusters: Clusters) -> dict[str, np.ndarray]:
    """Weighted mean of ``y`` per column with its CR2 standard error and Satterthwaite df.

    Parameters
    ----------
    y : ndarray, (units, voxels)
        Values (NaN = no data).
    w : ndarray, (units,) or (units, voxels)
        Positive weights (a unit is left out where its weight is not finite and positive).
    clusters : Clusters
        The unit's collections.

    Returns
    -------
    dict
        ``est``, ``se``, ``df``, ``z`` (the normal deviate of the t p-value, sign of ``est``) and
        ``n_clusters`` (collections with data). NaN where fewer than two collections have data,
        or where the residuals are all zero (``se = 0``).
    """
    w = np.broadcast_to(w if np.ndim(w) == 2 else np.asarray(w, np.float64)[:, None], y.shape)
    ok = np.isfinite(y) & np.isfinite(w) & (w > 0)
    wk = np.where(ok, w, 0.0)
    wg = clusters.sums(wk)  # W_j
    ug = clusters.sums(wk * np.where(ok, y, 0.0))  # Σ_{i∈j} w_i y_i
    n_cl = (wg > 0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        big_w = wg.sum(axis=0)
        est = ug.sum(axis=0) / big_w
        h = wg / big_w
        comp = np.maximum(1.0 - h, MIN_LEVERAGE_COMPLEMENT)
        r = ug - wg * est
        var = (r * r / comp).sum(axis=0) / (big_w * big_w)
        a = h / comp
        trace = h.sum(axis=0)  # tr S = Σ h_j (= 1) in units of 1 / W
        trace_sq = (a * a).sum(axis=0) - 2.0 * (a * a * h).sum(axis=0) + (a * h).sum(axis=0) ** 2
        df = np.maximum(trace * trace / trace_sq, 1.0)
        se = np.sqrt(var)
    bad = (n_cl < 2) | ~(se > 0) | ~np.isfinite(df)
    for arr in (se, df):
        arr[bad] = np.nan
    est[n_cl < 1] = np.nan
    z = np.full(y.shape[1], np.nan)
    good = ~bad
    if good.any():
        z[good] = t_to_z(est[good] / se[good], df[good])
    return {"est": est, "se": se, "df": df, "z": z, "n_clusters": n_cl, "degenerate": (n_cl >= 2) & bad}


def block_sign_flips(random_state: int, clusters: Clusters, n_perm: int) -> Iterator[np.ndarray]:
    """Whole-collection sign flips: nilearn's ``permuted_ols(n_jobs=1)`` flips drawn for the
    collections (:func:`nvmeta.meta.permutation._nilearn_sign_flips`), given to every unit of each."""
    from nvmeta.meta.permutation import _nilearn_sign_flips

    for signs in _nilearn_sign_flips(random_state, clusters.n, n_perm):
        yield signs[clusters.codes]


def permutation_notes(
    clusters: Clusters, n_perm: int, alpha: float, two_sided: bool
) -> tuple[list[str], dict]:
    """Warnings and ``summary.json`` entries of the whole-collection sign-flip test."""
    g = clusters.n
    smallest = (2.0 if two_sided else 1.0) / 2.0**g
    summary = {"dependence": "cluster_robust", "permutation_blocks": g,
               "permutation_smallest_p": smallest, "permutation_flips": "whole collections (Winkler et al. 2014)"}  # fmt: skip
    notes = []
    if smallest > alpha:
        notes.append(
            f"permutation: only {g} collection(s): whole-collection sign flips cannot give a p below "
            f"{smallest:.3g} ({'2/' if two_sided else '1/'}2^{g}), above alpha = {alpha:g}: no voxel can be "
            "FWE-significant (meta.dependence: cluster_robust)"
        )
    elif 2**g < n_perm:
        notes.append(
            f"permutation: only 2^{g} = {2**g} distinct whole-collection sign flips for n_perm={n_perm}; "
            f"the smallest p is {smallest:.3g}"
        )
    return notes, summary


def report(
    label: str, res: dict, reported: np.ndarray, clusters: Clusters, k_min: int
) -> tuple[list[str], dict]:
    """Warnings and ``summary.json`` entries of a cluster-robust fit (``res``: the per-voxel
    ``df``, ``n_clusters`` and ``degenerate`` maps of :func:`cr2_intercept`)."""
    notes = []
    g = clusters.n
    if g <= FEW_CLUSTERS:
        notes.append(
            f"{label}: cluster-robust inference over only {g} collection(s): with {FEW_CLUSTERS} or fewer the "
            "sandwich is still anticonservative (Hedges, Tipton & Johnson 2010); CR2 and Satterthwaite df "
            "reduce the bias without removing it"
        )
    one = int(np.sum((res["n_clusters"] == 1) & (res["k"] >= k_min)))
    if one:
        notes.append(
            f"{label}: {one} voxel(s) with data from a single collection left unreported "
            "(meta.dependence: cluster_robust needs two collections to estimate a variance)"
        )
    degenerate = int(np.sum(res["degenerate"] & (res["k"] >= k_min)))
    if degenerate:
        notes.append(
            f"{label}: {degenerate} voxel(s) whose values are all equal left unreported (no variance)"
        )
    df = res["df"][reported]
    low = int(np.sum(df < LOW_DF))
    if low:
        notes.append(
            f"{label}: {low} reported voxel(s) with Satterthwaite df below {LOW_DF:g}, where the t reference "
            "is outside the range in which it is known to hold its level (Tipton 2015); the weight is "
            "concentrated in a few collections there"
        )
    ncl = res["n_clusters"][reported]
    summary: dict[str, Any] = {
        "dependence": "cluster_robust",
        "variance": VARIANCE,
        "n_collections": g,
        "collections_per_voxel_min": int(ncl.min()) if ncl.size else None,
        "df_min": float(df.min()) if df.size else None,
        "df_median": float(np.median(df)) if df.size else None,
        "n_voxels_df_below_4": low,
    }
    return notes, summary


def _stack_for(est: Estimator, n_units: int, n_vox: int, fields: int):
    from nvmeta.meta.effects import _chunk_size, _Stack

    step = _chunk_size(n_units)
    return _Stack(Path(est.workdir or tempfile.gettempdir()), n_units, n_vox, fields, step), step


def unit_weights(est: Estimator, plan: Plan) -> np.ndarray:
    """The regression weight of each unit of a z method: √n for the sample-size-weighted Stouffer
    (its one method that needs n), else 1."""
    return np.array([math.sqrt(u.n) if est.needs_n else 1.0 for u in plan.units], dtype=np.float64)


def fit_z(est: Estimator, source: Source, k_min: int, label: str | None = None) -> Fit:
    """Cluster-robust fit of a z method (``stouffer``, ``weighted_stouffer``, ``ttest``).

    The units' z go to a float32 stack on disk as they are read (once); the sandwich is computed
    in voxel chunks. The stack is kept on ``est`` for the jackknife (:func:`jackknife_z`) and
    removed by ``est.close()`` (:func:`close`).
    """
    from nvmeta.meta.estimators import Fit, logp_from_z

    label = label or est.name
    n_units, n_vox = source.n_units, source.n_vox
    clusters = clusters_of(source.plan)
    w = unit_weights(est, source.plan)
    stack, step = _stack_for(est, n_units, n_vox, 1)
    est._cr = (stack, clusters, w)
    k = np.zeros(n_vox, dtype=np.int64)
    for i, (_unit, zvec) in enumerate(source.iter_z()):
        stack.append(zvec)
        k += np.isfinite(zvec)
        if (i + 1) % 100 == 0:
            est.log.info(f"{label}: {i + 1}/{n_units} maps read")
    stack.finish()
    res = {name: np.full(n_vox, np.nan) for name in ("z", "est", "se", "df")}
    res["n_clusters"] = np.zeros(n_vox, dtype=np.int64)
    res["degenerate"] = np.zeros(n_vox, dtype=bool)
    for a in range(0, n_vox if n_units else 0, step):
        y, _ = stack.take(slice(a, min(n_vox, a + step)))
        r = cr2_intercept(y, w, clusters)
        for name in res:
            res[name][a : a + step] = r[name]
    res["k"] = k
    z = res["z"]
    reported = (k >= k_min) & np.isfinite(z)
    notes, summary = report(label, res, reported, clusters, k_min)
    for msg in notes:
        est.log.warning(msg)
    return Fit(z=z, logp=logp_from_z(z, est.two_sided), k=k, reported=reported, notes=notes, summary=summary)


def effect_z(y: np.ndarray, v: np.ndarray, tau2, clusters: Clusters) -> dict[str, np.ndarray]:
    """Cluster-robust pooling of g (``y``) with weights ``1 / (v + τ²)`` (``tau2``: 0 for fixed effects,
    else per voxel): :func:`cr2_intercept`."""
    ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ok, 1.0 / (np.where(ok, v, 1.0) + tau2), np.nan)
    return cr2_intercept(np.where(ok, y, np.nan), w, clusters)


def jackknife_z(
    est: Estimator, labels: np.ndarray, z_full: np.ndarray, plan, collections: dict
) -> list[dict]:
    """Leave-one-unit-out rows of ``jackknife.tsv`` for a cluster-robust z method, from its stack
    (the z refitted without each unit, chunk by chunk of the clusters' voxels)."""
    from nvmeta.meta.effects import _chunk_size
    from nvmeta.meta.estimators import jackknife_rows

    stack, clusters, w = est._cr
    ids = np.flatnonzero(labels > 0)
    step = _chunk_size(len(plan.units))
    zw_all = np.empty((len(plan.units), ids.size), np.float32)
    for a in range(0, ids.size, step):
        y, _ = stack.take(ids[a : a + step])
        for i in range(len(plan.units)):
            keep = y[i].copy()
            y[i] = np.nan
            zw_all[i, a : a + step] = cr2_intercept(y, w, clusters)["z"]
            y[i] = keep
    units = ((i, unit, None) for i, unit in enumerate(plan.units))
    return jackknife_rows(labels, ids, z_full, plan, collections, units,
                          lambda i, unit, _: zw_all[i].astype(np.float64))  # fmt: skip


def close(est: Estimator) -> None:
    """Remove the stack :func:`fit_z` kept on ``est`` (idempotent)."""
    kept = getattr(est, "_cr", None)
    if kept is not None:
        kept[0].close()
        est._cr = None
