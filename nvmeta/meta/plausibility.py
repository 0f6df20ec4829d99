"""Is a meta-analytic z plausible given the maps it comes from?

At every reported voxel a method's z is compared with the *evidence bound*
``√k · max_i |s_i|`` (:meth:`nvmeta.meta.units.Source.evidence_bound`): the Stouffer z of ``k``
units each as strong as the strongest one there, ``s`` the units' own statistic (their z, or
``g / √var(g)`` for the effect-size methods). Stouffer, weighted Stouffer, the fixed- and
random-effects pooling of g cannot exceed it (Cauchy–Schwarz); Fisher's test only near z = 0
(below any threshold); a median or trimmed mean only when its variance claims more precision than
its maps have; a t-test only when a few maps nearly coincide (its z measures consistency). A z
above it is a defect or an artefact of the inputs, never a finding: ``summary.json`` carries the
check (``plausibility``), a warning names the voxels, and the overview does not headline a peak
that fails it.
"""

from __future__ import annotations

import numpy as np

#: Relative slack of the comparison (rounding: Stouffer of equal z equals the bound exactly).
RTOL = 1e-6


def check(
    method: str, z: np.ndarray, k: np.ndarray, reported: np.ndarray, bound: np.ndarray | None, two_sided: bool
) -> dict:
    """The ``plausibility`` entry of ``summary.json``.

    Parameters
    ----------
    method : str
        Method name (messages).
    z, k, reported : ndarray
        The method's z, units per voxel and reported voxels.
    bound : ndarray or None
        The evidence bound per voxel (None: not available, nothing checked).
    two_sided : bool
        Check ``|z|`` (two-sided) or ``z`` (one-sided: only positive z can be significant).

    Returns
    -------
    dict
        ``ok`` (no reported voxel over the bound), ``peak_ok`` (the voxel of largest statistic,
        the one a summary headlines, is within it), ``n_voxels_over_bound``, ``z_peak``,
        ``bound_at_peak``, ``k_at_peak``, ``worst`` (the voxel furthest over: ``z``, ``bound``,
        ``k``), ``rule`` and ``message`` (empty when ok).
    """
    rule = "|z| <= sqrt(k) * max_i |z_i| (z_i: each unit's z, or g / sqrt(var g) for effect sizes)"
    if bound is None:
        return {"ok": None, "peak_ok": None, "rule": rule, "message": f"{method}: plausibility not checked"}
    stat = np.abs(z) if two_sided else z
    live = reported & np.isfinite(stat) & np.isfinite(bound)
    over = live & (stat > bound * (1.0 + RTOL))
    n_over = int(over.sum())
    out: dict = {"ok": n_over == 0, "peak_ok": True, "n_voxels_over_bound": n_over, "rule": rule}
    if not live.any():
        out["message"] = ""
        return out
    peak = int(np.argmax(np.where(live, stat, -np.inf)))
    out.update(z_peak=float(z[peak]), bound_at_peak=float(bound[peak]), k_at_peak=int(k[peak]),
               peak_ok=not bool(over[peak]))  # fmt: skip
    message = ""
    if n_over:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(over, stat / bound, -np.inf)
        w = int(np.argmax(ratio))
        out["worst"] = {"z": float(z[w]), "bound": float(bound[w]), "k": int(k[w])}
        message = (
            f"{method}: {n_over} reported voxel(s) have |z| above what k maps each as strong as the strongest "
            f"one there give (sqrt(k) * max |z_i|); furthest over: z = {z[w]:.1f} from k = {int(k[w])} "
            f"where the bound is {bound[w]:.1f}. Such a z is not a finding (a variance that collapsed, "
            "or near-identical maps)"
        )
        if not out["peak_ok"]:
            message += f"; the peak z = {z[peak]:.1f} is one of them and is not headlined"
    out["message"] = message
    return out
