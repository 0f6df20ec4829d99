"""Per-image effect sizes: Cohen's d, Hedges' g and its sampling variance from a t (or z) map and n.

Pure functions (numpy + ``scipy.special`` only: imported by every per-image job), plus
:func:`write_effect_maps`, the z-map job's hook that writes ``g.nii.gz`` and ``varg.nii.gz`` next to
``zmap.nii.gz``.

Designs (``conversion.design_images`` / ``design_collections``; default ``one_sample``)
--------------------------------------------------------------------------------------
``one_sample`` (a group map testing a mean against 0, NeuroVault's usual group t map)
    ``d = t / √n``; Hedges' small-sample correction ``J = 1 − 3 / (4 (n − 1) − 1)``; ``g = J d``;
    ``var(g) = (n − 1)(1 + n d²) J² / (n (n − 3)) − d²``, the exact variance of a noncentral-t
    based ``g`` with the estimate ``d`` in place of δ (Hedges 1981; Hedges & Olkin 1985, ch. 5),
    i.e. the formula of NiMARE's :func:`nimare.transforms.d_to_g` (``return_variance=True``), to
    which the tests compare it. Needs ``n >= 4``.
``two_sample`` (two independent groups of sizes ``n1``, ``n2``)
    ``d = t √(1/n1 + 1/n2)``; ``J = 1 − 3 / (4 (n1 + n2 − 2) − 1)``; ``g = J d``;
    ``var(g) = J² ((n1 + n2) / (n1 n2) + d² / (2 (n1 + n2)))`` (Hedges & Olkin 1985; Borenstein
    et al. 2009, eqs. 4.20 and 4.28). Which design a map has cannot be read from NeuroVault's
    metadata: the user declares it.

Z maps are converted back to t with the image's resolved df (:func:`z_to_t`, the exact inverse of
:func:`nvmeta.images.stats.t_to_z`). The effect maps are computed from the template-grid z-map (the one
resampling of the job), so z values and effect sizes come from the same resampled data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import special

__all__ = [
    "hedges_j",
    "one_sample",
    "two_sample",
    "z_to_t",
    "effect_sizes",
    "image_design",
    "write_effect_maps",
]

#: Below this one-sided p ``stdtrit`` is not usable (subnormal / underflow): bisection on t_to_z.
_FAR_TAIL_P = 1e-290


def hedges_j(df: Any) -> np.ndarray:
    """Hedges' small-sample correction ``J = 1 − 3 / (4 df − 1)`` (df = n − 1 for one sample)."""
    df = np.asarray(df, dtype=np.float64)
    return 1.0 - 3.0 / (4.0 * df - 1.0)


def one_sample(t: Any, n: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's d, Hedges' g and var(g) of a one-sample t statistic (see the module docstring).

    Parameters
    ----------
    t : array_like
        t values.
    n : float
        Sample size (>= 4).

    Returns
    -------
    d, g, var_g : ndarray
    """
    n = float(n)
    if not n >= 4:
        raise ValueError(f"one-sample effect sizes need n >= 4, got {n}")
    d = np.asarray(t, dtype=np.float64) / math.sqrt(n)
    j = float(hedges_j(n - 1.0))
    g = j * d
    var_g = (n - 1.0) * (1.0 + n * d**2) * j**2 / (n * (n - 3.0)) - d**2
    return d, g, var_g


def two_sample(t: Any, n1: float, n2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's d, Hedges' g and var(g) of a two-sample (independent groups) t statistic."""
    n1, n2 = float(n1), float(n2)
    if not (n1 >= 2 and n2 >= 2):
        raise ValueError(f"two-sample effect sizes need n1, n2 >= 2, got {n1}, {n2}")
    d = np.asarray(t, dtype=np.float64) * math.sqrt(1.0 / n1 + 1.0 / n2)
    j = float(hedges_j(n1 + n2 - 2.0))
    g = j * d
    var_g = j**2 * ((n1 + n2) / (n1 * n2) + d**2 / (2.0 * (n1 + n2)))
    return d, g, var_g


def z_to_t(z: Any, df: float) -> np.ndarray:
    """t with the same tail probability as ``z`` (inverse of :func:`nvmeta.images.stats.t_to_z`).

    ``scipy.special.stdtrit`` on the one-sided tail ``Φ(−|z|)``; where that tail is below 1e-290
    (|z| > 36) a vectorised bisection on the exact, log-space :func:`nvmeta.images.stats.t_to_z`. NaN
    stays NaN.
    """
    from nvmeta.images.stats import t_to_z

    z = np.asarray(z, dtype=np.float64)
    az = np.abs(z)
    with np.errstate(invalid="ignore", under="ignore"):
        tail = special.ndtr(-az)
        t = -special.stdtrit(float(df), tail)
    far = np.isfinite(az) & ~(tail > _FAR_TAIL_P)
    if np.any(far):
        target = az[far]
        lo = np.full(target.shape, 1.0)
        hi = np.full(target.shape, 2.0)
        for _ in range(4000):  # bracket: t_to_z grows like log t for small df
            low = np.asarray(t_to_z(hi, float(df))) < target
            if not low.any():
                break
            hi = np.where(low, hi * 2.0, hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            below = np.asarray(t_to_z(mid, float(df))) < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
            if np.all(hi - lo <= 1e-13 * hi):
                break
        t[far] = 0.5 * (lo + hi)
    return np.where(np.isnan(z), np.nan, np.sign(z) * t)


def image_design(conversion: Mapping[str, Any], image_id: Any, collection_id: Any) -> dict:
    """The design of an image: ``conversion.design_images[id]``, else ``design_collections[cid]``,
    else ``{"design": "one_sample"}`` (:func:`nvmeta.images.stats.image_design`, the one lookup)."""
    from nvmeta.images.stats import image_design as lookup

    return lookup(conversion, image_id, collection_id)[0]


def effect_sizes(z: np.ndarray, df: float, n: float | None, design: dict) -> tuple[np.ndarray, np.ndarray]:
    """Hedges' g and var(g) from a z array, the image's df and n, and its design.

    Returns
    -------
    g, var_g : ndarray (float64, NaN where z is NaN)

    Raises
    ------
    ValueError
        Missing or too small sample size for the design, or a two_sample design whose ``n1 + n2`` is
        not ``n``.
    """
    if design["design"] == "two_sample":
        n1, n2 = design["n1"], design["n2"]
        if n is not None and n1 + n2 != n:
            # the image's n is resolved once (nvmeta.images.stats): weights and g must not disagree
            raise ValueError(f"n1 + n2 = {n1} + {n2} = {n1 + n2} is not the image's n = {n}")
        _, g, var_g = two_sample(z_to_t(z, df), n1, n2)
    else:
        if n is None:
            raise ValueError("no sample size")
        _, g, var_g = one_sample(z_to_t(z, df), n)
    return g, var_g


def write_effect_maps(
    zmap: np.ndarray | None,
    qc: dict,
    record: dict,
    conversion: Mapping[str, Any],
    mask_img: Any,
    out_g: str | os.PathLike,
    out_varg: str | os.PathLike,
    df: float | None = None,
) -> None:
    """The z-map job's hook: write ``g.nii.gz`` and ``varg.nii.gz`` and note the design in ``qc``.

    ``zmap`` is the template-grid z array of an included image (None when excluded: both maps are
    then all NaN). ``qc`` must already hold the image's resolved ``n`` and, for a t map, ``df``; a
    Z map's df (``qc["df"]`` is None) comes as ``df``, from the same one resolution
    (:func:`nvmeta.images.stats.resolve_sample_size`). ``record`` is not read again for n or df.
    Adds ``qc["design"]`` and ``qc["effect_size"]`` (``"ok"`` or why not).
    """
    import nibabel as nib

    from nvmeta.images.download import remove_stale_temps
    from nvmeta.io import atomic_path

    remove_stale_temps(out_g, out_varg)
    design = image_design(conversion, qc.get("image_id"), qc.get("collection_id"))
    qc["design"] = design["design"]
    shape = mask_img.shape[:3]
    g = var_g = None
    if zmap is None:
        qc["effect_size"] = "image excluded"
    else:
        df = qc["df"] if qc.get("df") is not None else df
        if df is None:
            qc["effect_size"] = "no degrees of freedom (no sample size)"
        else:
            try:
                g, var_g = effect_sizes(zmap, float(df), qc.get("n"), design)
                qc["effect_size"] = "ok"
            except (ValueError, KeyError) as exc:
                qc["effect_size"] = f"not computed: {exc}"
    for values, dest in ((g, out_g), (var_g, out_varg)):
        data = np.full(shape, np.nan, np.float32) if values is None else np.asarray(values, np.float32)
        img = nib.Nifti1Image(data, mask_img.affine)
        img.header.set_data_dtype(np.float32)
        img.header.set_xyzt_units("mm")
        with atomic_path(dest) as tmp:
            nib.save(img, tmp)
