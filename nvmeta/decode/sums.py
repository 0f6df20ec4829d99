"""Per-term sufficient statistics: a reference map as sums over its maps, so that maps can be taken out.

The atlas' reference maps are combined with one of nvmeta's streaming z estimators
(:mod:`nvmeta.meta.estimators`: ``stouffer``, ``weighted_stouffer``, ``fisher``, ``ttest``). Each of
them is a function of per-voxel *sums* over the maps with data (and the count of those maps):

==================  =================================  =========================================
method              summed per map (``fields``)        z per voxel
==================  =================================  =========================================
stouffer            ``z``                              ``Σz / √k``
weighted_stouffer   ``w z``, ``w²`` (``w = √n``)       ``Σwz / √Σw²``
fisher              ``ln Φ(−z)``, ``ln Φ(z)``          concordant two-sided Fisher (as ``fisher``)
ttest               ``z``, ``z²``                      one-sample t over the maps, ``df = k − 1``
==================  =================================  =========================================

Because the statistics are sums, a reference *without* some of its maps (the leave-out that keeps an
analysis from decoding against its own maps) is the stored sums minus those maps' contributions:
exact, and it costs reading the maps left out only, not the term's other maps
(:func:`Sums.without`). The same sums, accumulated over random draws of maps, give the null
references of :mod:`nvmeta.decode.null`. The effect-size methods (DerSimonian-Laird and the others of
:mod:`nvmeta.meta.effects`) are not offered: their between-study variance τ² is a non-additive
function of every map, so each leave-out reference would be a refit over all of the term's remaining
maps, and each null draw a refit too.

Sums are float64; a reference voxel is reported where at least ``max(min_k, ⌈min_fraction · k⌉)`` of
the term's ``k`` maps have data (``min_k`` is 2 for ``ttest``, else 1) and its z is finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["METHODS", "Sums", "contributions", "finish", "min_count", "weight"]

#: method -> the per-map quantities summed (besides the count of maps with data).
METHODS: dict[str, tuple[str, ...]] = {
    "stouffer": ("z",),
    "weighted_stouffer": ("wz", "w2"),
    "fisher": ("lp_pos", "lp_neg"),
    "ttest": ("z", "z2"),
}
_MIN_K = {"ttest": 2}


def weight(method: str, n: float | None) -> float | None:
    """A map's weight: ``√n`` for ``weighted_stouffer`` (None when ``n`` is unknown), else 1."""
    if method != "weighted_stouffer":
        return 1.0
    if n is None or not math.isfinite(n) or n <= 0:
        return None
    return math.sqrt(n)


def contributions(method: str, z: np.ndarray, w: float = 1.0) -> dict[str, np.ndarray]:
    """What one map (or each row of a maps × voxels array) adds to the sums; 0 where it has no data.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    z : ndarray
        z values (any shape; NaN = no data).
    w : float
        The map's weight (:func:`weight`); only ``weighted_stouffer`` uses it.

    Returns
    -------
    dict
        ``{field: float64 array}`` for every field of the method, plus ``"count"`` (0/1).
    """
    from scipy import special

    z = np.asarray(z, dtype=np.float64)
    ok = np.isfinite(z)
    z0 = np.where(ok, z, 0.0)
    out: dict[str, np.ndarray] = {"count": ok.astype(np.float64)}
    if method == "stouffer":
        out["z"] = z0
    elif method == "weighted_stouffer":
        out["wz"] = w * z0
        out["w2"] = np.where(ok, w * w, 0.0)
    elif method == "fisher":
        out["lp_pos"] = np.where(ok, special.log_ndtr(-z0), 0.0)
        out["lp_neg"] = np.where(ok, special.log_ndtr(z0), 0.0)
    elif method == "ttest":
        out["z"] = z0
        out["z2"] = z0 * z0
    else:
        raise ValueError(f"atlas method {method!r}: expected one of {', '.join(METHODS)}")
    return out


def min_count(method: str, k: int, min_fraction: float) -> int:
    """Fewest maps with data a voxel of a ``k``-map reference needs to be reported."""
    need = math.ceil(min_fraction * k - 1e-9) if k > 0 else 1
    return max(_MIN_K.get(method, 1), need, 1)


def finish(method: str, sums: dict[str, np.ndarray], count: np.ndarray) -> np.ndarray:
    """z per voxel from the sums (NaN where no map has data or the statistic is undefined)."""
    from nvmeta.meta.estimators import LOG2, log_chi2_sf_even

    count = np.asarray(count, dtype=np.float64)
    has = count > 0
    z = np.full(count.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "stouffer":
            z[has] = sums["z"][has] / np.sqrt(count[has])
        elif method == "weighted_stouffer":
            z[has] = sums["wz"][has] / np.sqrt(sums["w2"][has])
        elif method == "fisher":
            from scipy import special

            kk = count[has]
            lp_pos = log_chi2_sf_even(-2.0 * sums["lp_pos"][has], kk)
            lp_neg = log_chi2_sf_even(-2.0 * sums["lp_neg"][has], kk)
            lp = np.minimum(0.0, LOG2 + np.minimum(lp_pos, lp_neg))
            zz = -special.ndtri_exp(lp - LOG2)
            z[has] = np.where(lp_neg < lp_pos, -zz, zz)
        elif method == "ttest":
            from nvmeta.images.stats import t_to_z

            two = count >= 2
            k = count[two]
            mean = sums["z"][two] / k
            var = (sums["z2"][two] - k * mean * mean) / (k - 1.0)
            # rounding can leave a constant sample's variance a hair above 0: call it 0
            var = np.where(var > 1e-12 * np.maximum(1.0, sums["z2"][two] / k), var, np.nan)
            t = mean / np.sqrt(var / k)
            z[two] = t_to_z(t, k - 1.0)
        else:
            raise ValueError(f"atlas method {method!r}: expected one of {', '.join(METHODS)}")
    return z


@dataclass
class Sums:
    """Running sums of one reference over the mask voxels (float64), and the maps they hold.

    Attributes
    ----------
    method : str
    fields : dict
        ``{field: array}`` as :data:`METHODS` names them.
    count : ndarray
        Maps with data per voxel.
    k : int
        Maps summed (those with a weight, for ``weighted_stouffer``).
    """

    method: str
    fields: dict[str, np.ndarray]
    count: np.ndarray
    k: int = 0

    @classmethod
    def empty(cls, method: str, n_vox: int) -> Sums:
        if method not in METHODS:
            raise ValueError(f"atlas method {method!r}: expected one of {', '.join(METHODS)}")
        return cls(method, {f: np.zeros(n_vox) for f in METHODS[method]}, np.zeros(n_vox), 0)

    def add(self, z: np.ndarray, w: float = 1.0, sign: int = 1) -> None:
        """Add (``sign=1``) or take out (``sign=-1``) one map's contributions."""
        c = contributions(self.method, z, w)
        for f in self.fields:
            self.fields[f] += sign * c[f]
        self.count += sign * c["count"]
        self.k += sign

    def without(self, maps: list[tuple[np.ndarray, float]]) -> Sums:
        """A copy with the given ``(z, weight)`` maps taken out (exact: the sums minus theirs)."""
        out = Sums(self.method, {f: v.copy() for f, v in self.fields.items()}, self.count.copy(), self.k)
        for z, w in maps:
            out.add(z, w, sign=-1)
        # a count that went below 0 means a map was taken out that was never in
        if np.any(out.count < -0.5) or out.k < 0:
            raise ValueError("leave-out removed a map that the reference does not hold")
        np.maximum(out.count, 0.0, out=out.count)
        return out

    def reference(self, min_fraction: float) -> np.ndarray:
        """The reference z per voxel, NaN where fewer maps than :func:`min_count` have data."""
        z = finish(self.method, self.fields, self.count)
        z[self.count < min_count(self.method, self.k, min_fraction) - 0.5] = np.nan
        return z

    def save(self, path, **extra) -> None:
        """Write the sums (``.npz``, uncompressed) with ``extra`` arrays beside them."""
        from nvmeta.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                method=np.array(self.method),
                k=np.array(self.k),
                count=self.count,
                **{f"sum_{f}": v for f, v in self.fields.items()},
                **extra,
            )

    @classmethod
    def load(cls, path) -> tuple[Sums, dict[str, np.ndarray]]:
        """Read :meth:`save`'s file: the sums and the extra arrays."""
        with np.load(path, allow_pickle=False) as data:
            method = str(data["method"])
            fields = {f: data[f"sum_{f}"].astype(np.float64) for f in METHODS[method]}
            sums = cls(method, fields, data["count"].astype(np.float64), int(data["k"]))
            known = {"method", "k", "count", *(f"sum_{f}" for f in fields)}
            extra = {key: data[key] for key in data.files if key not in known}
        return sums, extra
