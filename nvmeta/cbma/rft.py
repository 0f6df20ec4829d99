"""Cluster-extent family-wise inference by Gaussian random field theory, as SPM and FSL do it.

Most published fMRI results are clusters formed at a voxel threshold (z > 3.1, p < 0.001) and kept
when their size is significant at FWE p < 0.05 under random field theory (Friston et al. 1994,
"Assessing the significance of focal activations using their spatial extent"; Worsley et al.
1996). Neither nilearn nor NiMARE implements it (nilearn's ``cluster_threshold`` is a fixed
size), so it is written here from the published formulas, those of FSL's ``cluster``:

- smoothness, per axis, from the map itself (Forman et al. 1995; FSL's ``smoothest -z``): for a
  stationary field with Gaussian autocorrelation, the lag-1 correlation of the standardised map
  is ``rho = 1 - E[(z_i - z_{i+1})^2] / 2`` and ``FWHM = sqrt(-2 ln 2 / ln rho)`` voxels. Signal
  raises the map's variance more than its differences, so on a map with signal the FWHM is
  over-estimated rather than under-estimated, which makes the test conservative;
- resels ``R = V / (FWHM_x FWHM_y FWHM_z)``; expected number of clusters above ``u``
  (3-D Euler characteristic density, the term FSL uses):
  ``E[m] = R (4 ln 2)^(3/2) (2 pi)^-2 (u^2 - 1) exp(-u^2 / 2)``;
- expected cluster size ``E[n] = V Phi(-u) / E[m]``; ``P(n >= k) = exp(-beta k^(2/3))`` with
  ``beta = (Gamma(5/2) / E[n])^(2/3)``; ``P_FWE(k) = 1 - exp(-E[m] P(n >= k))``.

The critical size is the smallest ``k`` with ``P_FWE(k) <= alpha``. Tested against simulated null
fields and planted foci (tests/test_cbma.py).
"""

from __future__ import annotations

import math

import numpy as np

#: Lag-1 correlations outside (0, 1) mean a map rougher than white noise or constant: no estimate.
_RHO_RANGE = (1e-6, 1 - 1e-9)


def smoothness_fwhm(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """FWHM (voxels) of a statistic map along each axis, from the variance of its first differences.

    Parameters
    ----------
    z : ndarray, (I, J, K)
        The map (values outside ``valid`` are ignored).
    valid : ndarray of bool
        Its voxels with data.

    Returns
    -------
    ndarray, (3,)
        FWHM along each array axis, in voxels (NaN when it cannot be estimated).
    """
    vals = z[valid].astype(np.float64)
    out = np.full(3, np.nan)
    if vals.size < 3 or not vals.std() > 0:
        return out
    zs = np.where(valid, (z.astype(np.float64) - vals.mean()) / vals.std(), 0.0)
    for axis in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis], lo[axis] = slice(1, None), slice(None, -1)
        both = valid[tuple(hi)] & valid[tuple(lo)]
        if not both.any():
            continue
        d2 = float(np.mean((zs[tuple(hi)] - zs[tuple(lo)])[both] ** 2))
        rho = 1.0 - d2 / 2.0
        if _RHO_RANGE[0] < rho < _RHO_RANGE[1]:
            out[axis] = math.sqrt(-2.0 * math.log(2.0) / math.log(rho))
    return out


def expected_clusters(n_voxels: int, fwhm: np.ndarray, u: float) -> float:
    """``E[m]``: expected number of clusters above ``u`` of a null field (3-D EC density term)."""
    resels = n_voxels / float(np.prod(fwhm))
    return resels * (4 * math.log(2)) ** 1.5 * (2 * math.pi) ** -2 * (u * u - 1) * math.exp(-u * u / 2)


def cluster_fwe_p(k: float, n_voxels: int, fwhm: np.ndarray, u: float) -> float:
    """Family-wise p of a cluster of ``k`` voxels formed at ``z > u`` (Friston et al. 1994)."""
    from scipy.special import gamma
    from scipy.stats import norm

    em = expected_clusters(n_voxels, fwhm, u)
    en = n_voxels * float(norm.sf(u)) / em
    beta = (gamma(2.5) / en) ** (2.0 / 3.0)
    return 1.0 - math.exp(-em * math.exp(-beta * k ** (2.0 / 3.0)))


def critical_cluster_size(n_voxels: int, fwhm: np.ndarray, u: float, alpha: float) -> int:
    """Smallest cluster size (voxels) with family-wise p <= ``alpha`` at cluster-forming threshold ``u``.

    Returns 1 when every cluster passes (``E[m]`` so small that one cluster is already rare).
    """
    from scipy.special import gamma
    from scipy.stats import norm

    if not (np.all(np.isfinite(fwhm)) and u > 1):
        raise ValueError(f"cluster-extent inference needs a finite smoothness and u > 1 (FWHM {fwhm}, u {u})")
    em = expected_clusters(n_voxels, fwhm, u)
    q = -math.log(1.0 - alpha) / em  # P(n >= k) at the critical size
    if q >= 1.0:
        return 1
    en = n_voxels * float(norm.sf(u)) / em
    beta = (gamma(2.5) / en) ** (2.0 / 3.0)
    k = (-math.log(q) / beta) ** 1.5
    return max(1, math.ceil(k - 1e-9))
