"""Image-based meta-analysis of template-grid maps (fan-in of an analysis).

The package is split as NiMARE's ``ibma``: :mod:`~nvmeta.meta.units` (what is read: the included
maps grouped into units), :mod:`~nvmeta.meta.registry` (method name -> estimator class: one
class per method, the z-combination methods in :mod:`~nvmeta.meta.estimators`, the permutation test
in :mod:`~nvmeta.meta.permutation`, its memory and time in :mod:`~nvmeta.meta.budget`, the
effect-size methods in :mod:`~nvmeta.meta.effects`), :mod:`~nvmeta.meta.correction` (FDR,
Bonferroni, FWE), :mod:`~nvmeta.meta.outputs` (maps, cluster tables, figure) and
:mod:`~nvmeta.meta.run` (one job). Entry points used by the Snakemake scripts:

- :func:`run_method` runs one estimator over the maps an analysis included and writes
  ``results/analyses/{a}/meta/{method}/``: ``z, p, logp, k, q, z_fdr, z_bonf`` maps (``.nii.gz``; ``p`` float64, ``logp`` = −log10 p),
  ``clusters.tsv`` (FDR map) and ``clusters_bonf.tsv`` (Bonferroni map), ``z.png`` and
  ``summary.json``; ``permutation`` adds ``p_fwe``, ``z_fwe`` and ``clusters_fwe.tsv``.
  ``summary.json`` carries each method's plausibility check (:mod:`~nvmeta.meta.plausibility`).
- :func:`sensitivity` compares the FDR-thresholded maps of several methods (Dice overlap).

Estimators (``meta.methods``)
-----------------------------
``stouffer``
    ``z = Σ z_i / √k`` over the ``k`` maps that have data at the voxel. On maps that all
    cover every voxel this is the formula of nilearn's NeuroVault stop-go example,
    ``np.sum(z, axis=3) / np.sqrt(K)``.
``weighted_stouffer``
    ``z = Σ w_i z_i / √(Σ w_i²)`` with ``w_i = √n_i`` (``n`` = the image's resolved sample size,
    ``qc.json``'s ``n``, including ``conversion.n_images`` overrides), as
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
    :func:`nvmeta.images.stats.t_to_z`. Tests consistency across studies rather than combined
    evidence.
``permutation``
    Sign-flipping permutation test of the mean z (one-sample t statistic) with
    max-statistic family-wise error correction: nilearn's
    :func:`~nilearn.mass_univariate.permuted_ols` test (``two_sided_test``, ``n_perm``,
    ``random_state`` from the config) with the sign flips it draws with ``n_jobs=1``, computed
    as matrix products over blocks of maps, so memory does not grow with the maps (1 GiB of
    permutations × voxels per pass over the maps; a clear :class:`MemoryError` up front when
    even that does not fit) and the result does not depend on the threads (BLAS threads). The
    test needs complete data, so this method is restricted to the voxels where *every* map
    (or collection) has data. Its ``z``/``p``
    maps are the parametric conversion of the same t statistic (``t_to_z`` with
    ``df = k − 1``, i.e. equal to ``ttest`` on those voxels); ``p_fwe`` is the permutation
    FWE p-value and ``z_fwe`` the z map thresholded at ``p_fwe < alpha``. ``n_jobs`` (the
    rule's threads) is recorded in ``summary.json``.

Effect-size methods (``dersimonian_laird``, ``hedges``, ``fixed_effects_hedges``, ``median``,
``trimmed_mean``) pool the per-image Hedges' g maps: see :mod:`nvmeta.meta.effects`.

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
``summary.json``. ``meta.dependence: cluster_robust`` instead keeps every map and clusters the
inference by collection: CR2 sandwich standard errors with Satterthwaite df for the weighted-mean
methods, whole-collection sign flips for ``permutation`` (:mod:`~nvmeta.meta.dependence`).

Memory
------
All z estimators except ``permutation`` stream over the maps with running sums (float64
vectors over the mask voxels): memory is O(voxels) whatever the number of maps.
"""

from nvmeta.meta.budget import available_memory_bytes, permutation_memory_bytes, permutation_runtime_minutes
from nvmeta.meta.correction import BonferroniCorrector, FDRCorrector, FWECorrector
from nvmeta.meta.estimators import Estimator, Fit, combine, log_chi2_sf_even
from nvmeta.meta.outputs import clusters_table, frozen_gc
from nvmeta.meta.registry import ESTIMATORS, get_estimator
from nvmeta.meta.run import run_method
from nvmeta.meta.sensitivity import sensitivity
from nvmeta.meta.units import read_included

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Fit",
    "FDRCorrector",
    "BonferroniCorrector",
    "FWECorrector",
    "get_estimator",
    "run_method",
    "sensitivity",
    "read_included",
    "combine",
    "log_chi2_sf_even",
    "available_memory_bytes",
    "permutation_memory_bytes",
    "permutation_runtime_minutes",
    "clusters_table",
    "frozen_gc",
]
