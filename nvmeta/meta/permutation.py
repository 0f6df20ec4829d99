"""The sign-flipping permutation test of the mean z with max-statistic FWE (``permutation``).

nilearn's :func:`~nilearn.mass_univariate.permuted_ols` test (intercept only) computed as matrix
products of sign vectors and maps, in passes whose size :mod:`nvmeta.meta.budget` sets; its
parametric z is the ``ttest`` estimator's (:class:`nvmeta.meta.estimators.TTest`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from nvmeta.meta import budget, dependence
from nvmeta.meta.estimators import Estimator, Fit, TTest, _StoufferSums, _TTestSums, logp_from_z
from nvmeta.meta.units import Source


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
    :data:`~nvmeta.meta.budget.PERMUTATION_CACHE_BYTES`, else accumulated block by block of maps,
    in as many passes over the maps as :data:`~nvmeta.meta.budget.PERMUTATION_ACC_BYTES` requires,
    so memory does not grow with the number of maps
    (:func:`~nvmeta.meta.budget.permutation_memory_bytes`). The method is restricted to the voxels
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
        summary["maps_in_memory"] = budget.maps_in_memory(n_units, n_vox)
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
        """The sign-flip test: pass after pass of permutations, then the FWE p-values.

        Returns ``(z, k, full, p_fwe, notes)``: ``ttest``'s z on the complete voxels, the units
        per voxel, the complete voxels, the FWE p-values and the warnings.
        """
        n_units, n_vox = source.n_units, source.n_vox
        n_perm, two_sided = int(self.cfg["n_perm"]), bool(self.cfg["two_sided"])
        _check_memory(n_units, n_vox, n_perm)
        notes: list[str] = []
        cache = budget.maps_in_memory(n_units, n_vox)
        per_pass = budget.permutations_per_pass(n_units, n_vox)
        rows_per_pass = min(per_pass, n_perm)
        flips = self._sign_flips(source, n_perm, two_sided, notes)
        h0 = np.empty(n_perm)
        observed = _Observed(n_vox, two_sided)
        products = _CachedProducts(n_units, n_vox) if cache else _StreamedProducts(n_units, n_vox)
        done = self._passes = 0
        while done < n_perm:
            p = min(per_pass, n_perm - done)
            signs = np.stack([next(flips) for _ in range(p)])  # p x n_units, int8
            first = done == 0
            if first or not cache:
                self._passes += 1
                products.read(source, signs, rows_per_pass, observed if first else None)
            if first:
                full, t0, degenerate, inv_scale = observed.statistic(n_units)
                self.log.info(
                    f"permutation: sign flips of {n_units} maps x {int(full.sum())} voxels, n_perm={n_perm}, "
                    + ("maps in memory" if cache else f"{-(-n_perm // per_pass)} pass(es) over the maps")
                    + f", {self.n_jobs} BLAS thread(s)"
                )
                if degenerate.any():
                    msg = (
                        f"permutation: {int(degenerate.sum())} voxel(s) where every map has the same |z| "
                        "(or z = 0) left unreported (their sign flips have no variance)"
                    )
                    notes.append(msg)
                    self.log.warning(msg)
                products.keep(np.flatnonzero(full)[~degenerate], inv_scale, rows_per_pass)
            acc = products.product(signs)
            _maxima(acc, products.cols, products.inv_scale, two_sided, n_units, h0[done : done + p])
            _exact_ties(signs, t0, two_sided, h0[done : done + p])
            done += p
        del products, acc  # the maps and the accumulator
        p_fwe = np.full(n_vox, np.nan)
        p_fwe[full] = _fwe_p(h0, np.fabs(t0) if two_sided else t0, n_perm)
        z, _logp = observed.sums.finish()
        z[~full] = np.nan
        z[np.flatnonzero(full)[degenerate]] = np.nan
        return z, observed.sums.k, full, p_fwe, notes

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


def _check_memory(n_units: int, n_vox: int, n_perm: int) -> None:
    """``MemoryError`` naming the fix when the test's peak memory
    (:func:`nvmeta.meta.budget.permutation_memory_bytes`) exceeds 90 % of what is available."""
    need = budget.permutation_memory_bytes(n_units, n_vox, n_perm)
    have = budget.available_memory_bytes()
    if need > 0.9 * have:
        raise MemoryError(
            f"meta method 'permutation' needs about {need / 2**30:.1f} GiB for {n_units} maps x {n_vox} "
            f"voxels, but only {have / 2**30:.1f} GiB is available. Use a machine with more memory, or "
            "drop 'permutation' from meta.methods (the other methods need O(voxels) memory)."
        )


class _Observed:
    """The unflipped data, summed in the first pass: ``ttest``'s running sums (its t, and k), the
    sums of z and z² (for the normalised statistic) and the range of |z| (NaN ignored)."""

    def __init__(self, n_vox: int, two_sided: bool):
        self.sums = _TTestSums(n_vox, two_sided)
        self.total = np.zeros(n_vox)
        self.sumsq = np.zeros(n_vox)
        self.amax = np.zeros(n_vox)
        self.amin = np.full(n_vox, np.inf)

    def add(self, zvec: np.ndarray, n: float | None) -> None:
        self.sums.add(zvec, n)
        ok = ~np.isnan(zvec)
        self.total[ok] += zvec[ok]
        self.sumsq[ok] += zvec[ok] ** 2
        az = np.abs(zvec)
        np.fmax(self.amax, az, out=self.amax)
        np.fmin(self.amin, az, out=self.amin)

    def statistic(self, n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(full, t0, degenerate, inv_scale)``: the voxels where every unit has data, their
        observed t (NaN where degenerate), the complete voxels where every map has the same |z|,
        and ``1 / (‖y‖ √n)`` of the others (``ValueError`` when no voxel is complete)."""
        full = self.sums.k == n_units
        if not full.any():
            raise ValueError("permutation: no voxel has data in every map")
        scale = np.sqrt(self.sumsq[full] * n_units)  # ‖y‖ √n
        with np.errstate(invalid="ignore", divide="ignore"):
            t0 = _normalised_t(self.total[full] / scale, n_units)
        # Where every map has the same |z| (all zero included), the flips that line the signs up
        # give |b| = 1, an infinite t (or, rounded past 1, NaN in nilearn, which then skips the
        # voxel): such voxels have no permutation distribution worth the name and would set the
        # maxima of every other voxel. They are left out.
        degenerate = (self.amax - self.amin)[full] <= 1e-6 * self.amax[full]
        t0[degenerate] = np.nan
        return full, t0, degenerate, 1.0 / scale[~degenerate]


class _CachedProducts:
    """The maps held in memory, read once: each pass is one product ``S @ maps`` of the sign
    vectors and the maps, restricted to the voxels with a statistic and normalised once."""

    cols = None  # the maps themselves are restricted to the voxels with a statistic ...
    inv_scale = None  # ... and normalised

    def __init__(self, n_units: int, n_vox: int):
        self.maps = np.empty((n_units, n_vox))
        self.acc_buf: np.ndarray | None = None

    def read(self, source: Source, signs: np.ndarray, rows_per_pass: int, observed: _Observed) -> None:
        for j, (unit, zvec) in enumerate(source.iter_z()):
            observed.add(zvec, unit.n)
            self.maps[j] = np.nan_to_num(zvec, nan=0.0)

    def keep(self, live: np.ndarray, inv_scale: np.ndarray, rows_per_pass: int) -> None:
        if len(live) < self.maps.shape[1]:
            self.maps = np.ascontiguousarray(self.maps[:, live])
        self.maps *= inv_scale
        self.acc_buf = np.empty((rows_per_pass, len(live)))

    def product(self, signs: np.ndarray) -> np.ndarray:
        acc = self.acc_buf[: len(signs)]
        np.matmul(signs.astype(np.float64), self.maps, out=acc)
        return acc


class _StreamedProducts:
    """The maps read again every pass, block by block of :data:`nvmeta.meta.budget.PERMUTATION_BLOCK_UNITS`,
    into the permutations × voxels accumulator of the pass (normalised when the maxima are taken)."""

    def __init__(self, n_units: int, n_vox: int):
        self.n_units, self.n_vox = n_units, n_vox
        self.block = np.empty((min(budget.PERMUTATION_BLOCK_UNITS, n_units), n_vox))
        self.acc_buf: np.ndarray | None = None
        self.acc: np.ndarray | None = None
        self.cols: np.ndarray | None = None
        self.inv_scale: np.ndarray | None = None

    def read(self, source: Source, signs: np.ndarray, rows_per_pass: int, observed: _Observed | None) -> None:
        from scipy.linalg.blas import dgemm

        if self.acc_buf is None:  # once: fresh pages cost more than refilling them
            self.acc_buf = np.empty((rows_per_pass, self.n_vox))
        acc = self.acc = self.acc_buf[: len(signs)]
        acc.fill(0.0)
        block, i = self.block, 0
        for j, (unit, zvec) in enumerate(source.iter_z()):
            if observed is not None:
                observed.add(zvec, unit.n)
            block[i] = np.nan_to_num(zvec, nan=0.0)
            i += 1
            if i == len(block) or j == self.n_units - 1:
                # acc += S[:, maps] @ block, in place (acc.T is Fortran-ordered; a numpy product
                # would allocate a second accumulator)
                flip = np.asfortranarray(signs[:, j + 1 - i : j + 1].T, dtype=np.float64)
                dgemm(1.0, block[:i].T, flip, beta=1.0, c=acc.T, overwrite_c=1)
                i = 0

    def keep(self, live: np.ndarray, inv_scale: np.ndarray, rows_per_pass: int) -> None:
        if len(live) < self.n_vox:
            self.cols = live
        self.inv_scale = inv_scale

    def product(self, signs: np.ndarray) -> np.ndarray:
        return self.acc


def _maxima(acc, cols, inv_scale, two_sided: bool, n_units: int, out: np.ndarray) -> None:
    """Each permutation's maximum t (|t| if two-sided) into ``out``, from its row of normalised
    statistics ``b`` (``acc``, restricted to ``cols`` and scaled by ``inv_scale`` when given)."""
    # t is increasing in b, so a permutation's max |t| is the t of its max |b| over the voxels
    # that have a statistic (non-zero data)
    for r in range(0, len(acc), budget.PERMUTATION_ROWS):
        rows = acc[r : r + budget.PERMUTATION_ROWS]
        b = rows[:, cols] if cols is not None else rows  # a copy, or acc itself
        if inv_scale is not None:
            b *= inv_scale
        bmax = (np.abs(b, out=b) if two_sided else b).max(axis=1) if b.shape[1] else np.nan
        out[r : r + len(rows)] = _normalised_t(bmax, n_units)


def _exact_ties(signs: np.ndarray, t0: np.ndarray, two_sided: bool, out: np.ndarray) -> None:
    """Set the maximum of a flip of every map or of none to the largest observed statistic."""
    # such a flip is the data itself, up to the sign: its maximum *is* the largest voxel
    # statistic, a tie that a summation in another order would break
    for r in np.flatnonzero((signs == signs[:, :1]).all(axis=1)):
        out[r] = np.fmax.reduce(np.fabs(t0) if two_sided else t0 * float(signs[r, 0]), initial=-np.inf)


def _fwe_p(h0: np.ndarray, stat: np.ndarray, n_perm: int) -> np.ndarray:
    """FWE p-values ``(1 + #{perm: max T ≥ T_v}) / (1 + n_perm)`` of ``stat`` given the maxima ``h0``."""
    # nilearn's rank: how many permutations' maxima lie strictly below the voxel's statistic. A
    # maximum equal to it (a flip that changes only maps with z = 0 there, say) is a tie that
    # nilearn's one formula keeps exact; here the observed statistic and the permuted ones are
    # summed in different orders, so a tie is taken within 1e-10 (relative) of it.
    below = np.searchsorted(np.sort(h0[~np.isnan(h0)]), stat - 1e-10 * np.abs(stat), side="left")
    return np.where(np.isnan(stat), np.nan, (n_perm + 1 - below) / float(n_perm + 1))
