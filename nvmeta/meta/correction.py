"""Multiple-comparison corrections of an estimator's p map (NiMARE's FDRCorrector/FWECorrector model).

Each corrector takes the per-voxel p-values of the reported voxels and returns which are
significant at ``alpha``; the outputs module writes the thresholded maps (``z_fdr``, ``z_bonf``,
``z_fwe``) and their cluster tables. In one-sided mode only positive effects can be significant.

- :class:`FDRCorrector`: Benjamini–Hochberg (:func:`scipy.stats.false_discovery_control`) over
  the reported voxels; also returns the q map.
- :class:`BonferroniCorrector`: ``p < alpha / V`` (``V`` reported voxels).
- :class:`FWECorrector`: the estimator's own family-wise-error p map (``permutation``'s
  max-statistic ``p_fwe``) at ``p_fwe < alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q), via scipy."""
    from scipy.stats import false_discovery_control

    if p.size == 0:
        return p.copy()
    return false_discovery_control(np.clip(p, 0.0, 1.0), method="bh")


@dataclass
class Correction:
    """A correction's result over the mask voxels."""

    name: str  # file suffix: fdr, bonf, fwe
    significant: np.ndarray  # bool
    q: np.ndarray | None = None  # FDR q-values (NaN outside the reported voxels)


class _Corrector:
    name = ""

    def __init__(self, alpha: float, two_sided: bool) -> None:
        self.alpha = float(alpha)
        self.two_sided = bool(two_sided)

    def _sided(self, sig: np.ndarray, z: np.ndarray) -> np.ndarray:
        if not self.two_sided:  # one-sided: only positive effects can be significant
            sig &= z > 0
        return sig


class FDRCorrector(_Corrector):
    """Benjamini–Hochberg FDR over the reported voxels."""

    name = "fdr"

    def transform(self, z: np.ndarray, p: np.ndarray, reported: np.ndarray) -> Correction:
        q = np.full(z.shape, np.nan)
        q[reported] = bh_q(p[reported])
        return Correction(self.name, self._sided(reported & (q < self.alpha), z), q)


class BonferroniCorrector(_Corrector):
    """Bonferroni over the reported voxels."""

    name = "bonf"

    def transform(self, z: np.ndarray, p: np.ndarray, reported: np.ndarray) -> Correction:
        n_rep = int(reported.sum())
        return Correction(self.name, self._sided(reported & (p < self.alpha / max(n_rep, 1)), z))


class FWECorrector(_Corrector):
    """The estimator's family-wise-error p map (permutation max statistic)."""

    name = "fwe"

    def transform(self, z: np.ndarray, p_fwe: np.ndarray, reported: np.ndarray) -> Correction:
        return Correction(self.name, self._sided(reported & (p_fwe < self.alpha), z))
