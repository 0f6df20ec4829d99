"""Robust pooling of effect sizes: the median and the γ-trimmed mean of Hedges' g, with a variance
that never claims more precision than the maps' own sampling variances allow.

Per voxel, over the ``k`` units with data (``y_i`` = g, ``v_i`` = var g):

``median``
    ``est`` = the median of the y. Its variance is that of the median of ``k`` normal values,
    ``π / (2k) · σ²`` (the large-sample variance; at ``k = 5`` it exceeds the exact one by 10 %),
    with ``σ² = max(σ̂², v̄ₕ)``: ``σ̂ = 1.4826 · MAD`` the robust spread of the y, and
    ``v̄ₕ = (mean_i v_i^(-1/2))^(-2)``, for which ``π / (2k) · v̄ₕ = 1 / (4 k f(μ)²)`` is the
    large-sample variance of the median of independent ``N(μ, v_i)`` (f their mean density).
``trimmed_mean``
    ``est`` = the γ-trimmed mean (``h = k − 2 floor(γ k)`` values kept, as
    :func:`scipy.stats.trim_mean`). Its variance is Yuen's (1974) ``(k − 1) s² / (h (h − 1))``
    with ``s² = max(s²_w, c_w · v̄)``: ``s²_w`` the winsorised sample variance of the y,
    ``c_w`` the variance of a standard normal winsorised at the same fraction ``floor(γ k) / k``
    (:func:`winsorised_normal_variance`), so ``c_w · v̄`` is the winsorised variance of values
    that differ only by sampling error.

Read as a random-effects model, both are the variance of the estimator for values of total
variance ``v̄ + τ̂²`` with the robust moment estimate ``τ̂² = max(0, spread − v̄)`` (Hedges' 1983
estimator with a robust spread; ``v̄ₕ`` for the median). The spread alone (MAD, winsorised
variance), on which the estimators used to rest, ignores the v_i and collapses when a few values
nearly coincide (``se = 0.002`` from 5 maps: ``z = 480``); ``v̄`` (``v̄ₕ``) is the variance the
maps' sampling error alone implies, the *floor*. The variance is finally never below the
fixed-effects variance ``1 / Σ (1 / v_i)`` of the same values (a guarantee: the floors are above
it for every k and γ), so a robust estimate is never more precise than the inverse-variance mean
of its maps.

p-values come from Student's t, ``est / se`` on ``ν`` degrees of freedom, converted to z with the
exact :func:`nvmeta.images.stats.t_to_z` (log-space in the far tail). Where the spread sets the variance,
``ν = ν₀``: Yuen's ``h − 1`` for the trimmed mean (as :func:`scipy.stats.ttest_ind` with
``trim``); for the median the equivalent degrees of freedom of the MAD variance,
``ν₀ = 0.3675 (k − 1)`` (the MAD's asymptotic efficiency at the normal, Rousseeuw & Croux 1993: a
variance estimate of efficiency e varies as s² does on e (k − 1) df; the tests check this on
simulated samples). Where the floor binds, only the spread part is estimated and the degrees of
freedom are Satterthwaite's (1946) ``ν = 2 V² / Var(V̂)`` with ``Var(V̂)`` taken as the spread
part's ``2 V²_spread / ν₀``, i.e. ``ν = ν₀ (V / V_spread)²`` (V the variance used): ``ν₀`` when
the spread sets V, growing to the normal limit as the spread collapses below the floor. The
coverage of ``est ± t_ν se`` on random-effects data with a known mean is checked at ``k = 5, 10,
50`` (``tests/test_meta_effects.py``; README).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from nvmeta.images.stats import t_to_z

_MAD_SCALE = 1.4826
#: Asymptotic efficiency of the MAD as an estimate of a normal σ relative to the SD (Rousseeuw &
#: Croux 1993, 36.75 %): the share of the k − 1 degrees of freedom of s² its variance estimate has.
MAD_EFFICIENCY = 0.3675
ROBUST_METHODS = ("median", "trimmed_mean")


def winsorised_normal_variance(gamma) -> np.ndarray:
    """Variance of a standard normal winsorised at its ``γ`` and ``1 − γ`` quantiles.

    ``(1 − 2γ) − 2 q φ(q) + 2 γ q²`` with ``q = Φ⁻¹(1 − γ)`` (1 at ``γ = 0``).
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = -special.ndtri(gamma)
        phi = np.exp(-0.5 * q * q) / math.sqrt(2.0 * math.pi)
        out = (1.0 - 2.0 * gamma) - 2.0 * q * phi + 2.0 * gamma * q * q
    return np.where(gamma > 0, out, 1.0)


def variance_sums(vs: np.ndarray) -> dict[str, np.ndarray]:
    """The per-column sums of the sampling variances ``vs`` (k × n, NaN = no data) that the floors
    need: ``v`` = Σ v_i, ``w`` = Σ 1 / v_i, ``isd`` = Σ v_i^(-1/2). The effect-size fit accumulates
    the same sums while it reads the maps, so pass 2 needs no var(g) for them."""
    has = np.isfinite(vs)
    v = np.where(has, vs, 1.0)
    return {"v": np.where(has, v, 0.0).sum(axis=0), "w": np.where(has, 1.0 / v, 0.0).sum(axis=0),
            "isd": np.where(has, 1.0 / np.sqrt(v), 0.0).sum(axis=0)}  # fmt: skip


def pool_robust(method: str, ys: np.ndarray, k: np.ndarray, vsums: dict, trim: float = 0.2) -> dict:
    """A robust estimate per column of ``ys`` (k × n, NaN = no data), its variance and its z.

    Parameters
    ----------
    method : str
        ``median`` or ``trimmed_mean``.
    ys : ndarray
        Effect sizes, NaN where a unit has no data.
    k : ndarray of int
        Finite values per column.
    vsums : dict
        :func:`variance_sums` of the same values' sampling variances (per column).
    trim : float
        γ of ``trimmed_mean``.

    Returns
    -------
    dict
        ``est``, ``se``, ``z`` (of the Student-t p), ``df`` (ν), ``var_spread`` (the spread-based
        variance alone), ``var_floor`` (what the sampling variances imply) and ``floored`` (the
        floor set the variance).
    """
    kf = k.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        vbar = vsums["v"] / kf
        var_fe = 1.0 / vsums["w"]
        if method == "median":
            est = colmedian(ys, k)
            mad = colmedian(np.abs(ys - est), k)
            factor = math.pi / (2.0 * kf)
            var_spread = factor * (_MAD_SCALE * mad) ** 2
            # the large-sample variance of the median of independent N(mu, v_i): 1 / (4 k f(mu)^2)
            var_floor = factor / (vsums["isd"] / kf) ** 2
            nu0 = MAD_EFFICIENCY * (kf - 1.0)
        elif method == "trimmed_mean":
            est, s2w, g, h = trimmed(ys, k, trim)
            factor = (kf - 1.0) / (h * (h - 1.0))
            var_spread = factor * s2w
            var_floor = factor * winsorised_normal_variance(g / kf) * vbar
            nu0 = h - 1.0
        else:
            raise ValueError(f"{method!r} is not a robust estimator")
        var = np.fmax(np.fmax(var_spread, var_floor), var_fe)
        nu = np.where(var_spread > 0, nu0 * (var / var_spread) ** 2, np.inf)
        se = np.sqrt(var)
    ok = (k >= 2) & np.isfinite(var_spread) & (se > 0) & (nu0 > 0)
    for a in (se, nu, var_spread, var_floor):
        a[~ok] = np.nan
    est[k < 1] = np.nan
    z = np.full(est.shape, np.nan)
    if ok.any():
        z[ok] = t_to_z(est[ok] / se[ok], nu[ok])
    floored = ok & (var > var_spread)
    return {"est": est, "se": se, "z": z, "df": nu, "var_spread": var_spread, "var_floor": var_floor,
            "floored": floored}  # fmt: skip


def colmedian(ys: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Median of each column over its ``k`` finite values (NaN = no data), by one sort.

    Equal to :func:`numpy.nanmedian` (the tests compare), which falls back on a per-column Python
    loop when some values are NaN and was the slowest step of the median method.
    """
    s = np.sort(ys, axis=0)  # NaN last
    cols = np.arange(s.shape[1])
    lo = s[np.clip((k - 1) // 2, 0, s.shape[0] - 1), cols]
    hi = s[np.clip(k // 2, 0, s.shape[0] - 1), cols]
    out = 0.5 * (lo + hi)
    out[k < 1] = np.nan
    return out


def trimmed(ys: np.ndarray, k: np.ndarray, trim: float) -> tuple[np.ndarray, ...]:
    """γ-trimmed mean, winsorised sample variance, values cut per end ``g`` and kept ``h``, per column.

    After one sort, the winsorised sample is the ``k − 2g`` kept values plus ``g`` copies of each
    of the extreme kept values ``lo`` and ``hi``: its mean and its (two-pass) sum of squares are
    sums over the kept values plus those two terms, so no winsorised copy is built (``np.nanvar``
    of such a copy cost three times the sort). A constant winsorised sample has a variance of
    exactly 0 (not rounding noise).
    """
    s = np.sort(ys, axis=0)  # NaN last
    n_rows, n = s.shape
    g = np.floor(trim * k).astype(np.int64)  # values cut at each end (scipy.stats.trim_mean)
    idx = np.arange(n_rows)[:, None]
    keep = (idx >= g) & (idx < (k - g))
    kept = (k - 2 * g).astype(np.float64)
    kf = k.astype(np.float64)
    gf = g.astype(np.float64)
    cols = np.arange(n)
    lo = s[np.minimum(g, n_rows - 1), cols]
    hi = s[np.clip(k - g - 1, 0, n_rows - 1), cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(keep, s, 0.0)
        sum_kept = t.sum(axis=0)
        mean = sum_kept / kept
        mw = (sum_kept + gf * (lo + hi)) / kf  # the winsorised mean
        np.subtract(s, mw, out=t, where=keep)  # deviations of the kept values; 0 elsewhere
        ss = np.einsum("ij,ij->j", t, t) + gf * ((lo - mw) ** 2 + (hi - mw) ** 2)
        ss[lo == hi] = 0.0
        s2w = ss / (kf - 1.0)
    mean[k < 1] = np.nan
    s2w[k < 2] = np.nan
    return mean, s2w, gf, kept
