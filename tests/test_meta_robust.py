"""The robust effect-size estimators (nvmeta.meta.robust), voxel arrays in memory.

References: scipy's Yuen trimmed t (``scipy.stats.ttest_ind(..., trim=γ)`` against a constant
sample, whose variance is 0, is the one-sample Yuen test on ``h − 1`` df), scipy's
``median_abs_deviation`` and ``trim_mean``, a numerical integral of the winsorised normal, the
fixed-effects variance ``1 / Σ w``, and planted truth (random-effects data with a known mean).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from nvmeta.images.effectsize import one_sample
from nvmeta.meta.effects import pool
from nvmeta.meta.robust import MAD_EFFICIENCY, pool_robust, variance_sums

Z975 = stats.norm.ppf(0.975)


def _columns(rng, k_max, n, spread, v):
    """Effect sizes of n voxels, a different number of maps (5 .. k_max) in each column."""
    y = 0.4 + spread * rng.standard_t(4, size=(k_max, n))
    ks = rng.integers(5, k_max + 1, size=n)
    y[np.arange(k_max)[:, None] >= ks] = np.nan
    vv = np.where(np.isfinite(y), v, np.nan)
    return y, vv, ks


@pytest.mark.parametrize("trim", [0.1, 0.2, 0.3])
def test_trimmed_mean_is_yuens_test_where_the_spread_sets_the_variance(trim):
    """Sampling variances far below the spread: est, se, df and p are scipy's Yuen one-sample test."""
    rng = np.random.default_rng(5)
    y, v, ks = _columns(rng, 15, 300, 0.3, 1e-5)
    r = pool_robust("trimmed_mean", y, ks, variance_sums(v), trim)
    assert not r["floored"].any()
    for j in range(y.shape[1]):
        col = y[: ks[j], j]
        ref = stats.ttest_ind(col, np.zeros(ks[j]), trim=trim, equal_var=False)
        assert r["est"][j] == pytest.approx(stats.trim_mean(col, trim), rel=1e-12)
        assert r["est"][j] / r["se"][j] == pytest.approx(ref.statistic, rel=1e-10)
        assert r["df"][j] == pytest.approx(ref.df, rel=1e-12)  # h - 1
        assert r["df"][j] == ks[j] - 2 * math.floor(trim * ks[j]) - 1
        assert 2 * stats.norm.sf(abs(r["z"][j])) == pytest.approx(ref.pvalue, rel=1e-8)


def test_median_spread_is_the_mad_and_its_df_the_mads_equivalent_df():
    rng = np.random.default_rng(6)
    y, v, ks = _columns(rng, 21, 300, 0.3, 1e-5)
    r = pool_robust("median", y, ks, variance_sums(v))
    assert not r["floored"].any()
    for j in range(y.shape[1]):
        col = y[: ks[j], j]
        mad = stats.median_abs_deviation(col, scale="normal")  # 1 / Φ⁻¹(3/4) = 1.482602...
        assert r["est"][j] == pytest.approx(np.median(col), rel=1e-12)
        assert r["se"][j] ** 2 == pytest.approx(math.pi / (2 * ks[j]) * mad**2, rel=1e-5)
        assert r["df"][j] == pytest.approx(MAD_EFFICIENCY * (ks[j] - 1), rel=1e-12)
        p_ref = 2 * stats.t.sf(abs(r["est"][j] / r["se"][j]), r["df"][j])
        assert 2 * stats.norm.sf(abs(r["z"][j])) == pytest.approx(p_ref, rel=1e-8)


@pytest.mark.parametrize("k", [5, 15, 51])
def test_the_mad_variance_has_the_equivalent_df_of_its_efficiency(k):
    """The median's df: a variance estimate with efficiency e relative to s² (k − 1 df) has the
    spread of a χ² on e (k − 1) df; measured on normal samples, ν = 2 E[σ̂²]² / Var(σ̂²)."""
    x = np.random.default_rng(k).normal(size=(100_000, k))
    med = np.median(x, axis=1, keepdims=True)
    s2 = (1.4826 * np.median(np.abs(x - med), axis=1)) ** 2
    nu = 2 * s2.mean() ** 2 / s2.var()
    assert nu == pytest.approx(MAD_EFFICIENCY * (k - 1), rel=0.1)


def _winsorised_normal_variance_by_quadrature(gamma: float) -> float:
    q = stats.norm.isf(gamma)
    inside = integrate.quad(lambda x: x * x * stats.norm.pdf(x), -q, q)[0]
    return inside + 2 * gamma * q * q


def test_floor_binds_when_the_values_agree_better_than_their_sampling_error():
    """Spread far below the sampling variances: the variance is the floor, computed here by hand
    (the winsorised normal variance by quadrature; the median's density at μ), with normal p."""
    rng = np.random.default_rng(7)
    k, n = 9, 50
    y = 0.5 + 1e-3 * rng.normal(size=(k, n))
    v = rng.uniform(0.03, 0.12, size=(k, n))
    kk = np.full(n, k)
    tm = pool_robust("trimmed_mean", y, kk, variance_sums(v), 0.2)
    med = pool_robust("median", y, kk, variance_sums(v))
    g, h = 1, 7  # floor(0.2 * 9) cut at each end
    cw = _winsorised_normal_variance_by_quadrature(g / k)
    floor_tm = (k - 1) / (h * (h - 1)) * cw * v.mean(axis=0)
    floor_med = math.pi / (2 * k) / np.mean(1 / np.sqrt(v), axis=0) ** 2
    assert tm["floored"].all() and med["floored"].all()
    np.testing.assert_allclose(tm["se"] ** 2, floor_tm, rtol=1e-9)
    np.testing.assert_allclose(med["se"] ** 2, floor_med, rtol=1e-12)
    for r in (tm, med):  # Satterthwaite: the spread is ~1e-6 of the variance, so df ~ 1e10+: normal
        assert (r["df"] > 1e8).all()
        np.testing.assert_allclose(r["z"], r["est"] / r["se"], rtol=1e-7)


def _realistic(rng, k, n_vox, clustered):
    """g and var(g) of k one-sample studies (n 15-60); ``clustered`` voxels: g nearly equal."""
    ns = rng.integers(15, 61, size=(k, 1))
    delta = 0.6 + 0.3 * rng.normal(size=(k, n_vox))
    delta[:, clustered] = 0.9 + 1e-3 * rng.normal(size=(k, int(clustered.sum())))
    t = delta * np.sqrt(ns)
    g = np.empty_like(t)
    v = np.empty_like(t)
    for i, n in enumerate(ns[:, 0]):
        _, g[i], v[i] = one_sample(t[i], float(n))
    return g, v


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
@pytest.mark.parametrize("k", [5, 6, 9, 21])
def test_a_robust_estimate_is_never_more_precise_than_fixed_effects(method, k):
    """A few near-coincident g with realistic var(g) made the spread-only se collapse (se = 0.002
    from 5 maps, z in the hundreds, on the demo's pain maps): se is never below the fixed-effects se
    of the same maps, and |z| never above √k · max |g / √var g|, what k maps as strong as the
    strongest give."""
    rng = np.random.default_rng(100 + k)
    n_vox = 400
    clustered = np.arange(n_vox) < 100
    g, v = _realistic(rng, k, n_vox, clustered)
    out = pool(method, g, v)
    se_fe = 1 / np.sqrt((1 / v).sum(axis=0))
    assert (out["se"] >= se_fe * (1 - 1e-12)).all()
    bound = np.sqrt(k) * np.max(np.abs(g) / np.sqrt(v), axis=0)
    assert (np.abs(out["z"]) <= bound).all()
    fe = pool("fixed_effects_hedges", g, v)
    assert np.abs(out["z"][clustered]).max() <= np.abs(fe["z"][clustered]).max() * 1.01


@pytest.mark.parametrize("k", [5, 10, 50])
def test_interval_coverage_is_near_nominal_on_random_effects_data(k):
    """Planted truth: y_i ~ N(μ, v_i + τ²) with v_i of studies of 15-60 subjects and τ² from 0 to
    4 v̄. The method's own p-value, testing the true μ, is below 0.05 in about 5 % of 8,000
    replications. Tolerance: coverage in [0.93, 0.985] with heterogeneity (Yuen's test itself, the
    reference, covers 0.937-0.94 at k = 5; the Monte Carlo error is 0.0024) and at most 0.995 with
    τ² = 0, where the floor is the true variance but nothing in 5-10 maps says τ² = 0."""
    rng = np.random.default_rng(2026 + k)
    reps, mu = 8000, 0.5
    got = {}
    for ratio in (0.0, 0.5, 1.0, 4.0):
        n = rng.integers(15, 61, size=(k, reps))
        v = 1.0 / n + mu**2 / (2 * n)
        y = mu + rng.normal(size=(k, reps)) * np.sqrt(v + ratio * v.mean())
        for method in ("median", "trimmed_mean"):
            z = pool(method, y - mu, v)["z"]  # shift-equivariant: z tests the true mean
            got[method, ratio] = float(np.mean(np.abs(z) <= Z975))
    for (method, ratio), cov in got.items():
        hi = 0.995 if ratio == 0 else 0.985
        assert 0.93 <= cov <= hi, (method, ratio, cov, got)
