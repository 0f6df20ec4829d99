"""Effect-size estimators: pooling per-image Hedges' g maps (``g.nii.gz``, ``varg.nii.gz``).

Each image's g and var(g) come from its t (or z) map and its one resolved sample size
(:mod:`nvmeta.effectsize`). Per voxel, over the ``k`` units with data (``y_i`` = g, ``v_i`` =
var g, ``w_i = 1 / v_i``):

``fixed_effects_hedges``
    Inverse-variance pooling with τ² = 0, NiMARE's ``FixedEffectsHedges`` (Hedges & Olkin 1985):
    ``est = Σ w y / Σ w``, ``se = 1 / √Σ w``.
``dersimonian_laird``
    Random effects with the DerSimonian & Laird (1986) moment estimator
    ``τ² = max(0, (Q − (k − 1)) / (Σ w − Σ w² / Σ w))``, ``Q = Σ w (y − est_FE)²``, then
    ``w*_i = 1 / (v_i + τ²)``, ``est = Σ w* y / Σ w*``, ``se = 1 / √Σ w*`` (PyMARE's
    ``DerSimonianLaird``).
``hedges``
    Random effects with Hedges' (1983) τ² estimator ``τ² = max(0, s²_y − mean(v))`` (``s²_y``
    the unweighted variance of the y), then pooled as above (PyMARE's ``Hedges``). REML is not
    offered: it needs an iterative fit per voxel (Fisher scoring, tens of passes over every map)
    and would break the fan-in's budget of about twice the Stouffer time; DL is the standard
    non-iterative choice (and PyMARE's and NiMARE's default).
``median``
    The median of the y (robust to outlying studies; Peraza et al. 2025), with
    ``var = π / (2k) · (1.4826 · MAD)²`` (the large-sample variance of a normal sample's median,
    with the MAD as a robust σ).
``trimmed_mean``
    The γ-trimmed mean (``meta.trim``, default 0.2: ``floor(γ k)`` values cut from each end, as
    :func:`scipy.stats.trim_mean`), with the Tukey–McLaughlin / Yuen variance
    ``s²_w / ((1 − 2γ)² k)`` from the winsorised sample variance ``s²_w``.

Every method reports ``est`` (pooled g), ``se``, ``z = est / se`` with its log-space p,
``Q`` and ``I² = max(0, (Q − (k − 1)) / Q)`` (Higgins & Thompson 2002; from the fixed-effect fit),
``k`` and ``tau2``: the random-effects methods' own τ²; for ``fixed_effects_hedges`` (which
assumes τ² = 0) and the robust estimators (which do not use the variances) the DL moment τ², as a
heterogeneity descriptor next to their Q and I² (both from the fixed-effect fit).

Memory and passes: the maps' files are read once; while they are read, the fixed-effect and moment
sums are accumulated per voxel (memory O(voxels)) and g / var(g) are appended to a float32 stack on
disk (a temporary next to the outputs, swept if the job is killed). ``fixed_effects_hedges`` needs
nothing more; the random-effects methods need one more pass, over the stack, for their
``1 / (v + τ²)`` weights; the robust methods and the jackknife read the stack in voxel chunks whose
size follows the number of maps (about :data:`CHUNK_BYTES` of arrays in memory).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from nvmeta.meta.estimators import ESTIMATORS, Estimator, Fit, logp_from_z
from nvmeta.meta.units import Source

#: Working memory of one voxel chunk: about 16 arrays of k × chunk float64 are alive at once in
#: :func:`pool` (measured: 256 MB with the divisor 8 gave a 0.8 GB peak at k = 1000).
CHUNK_BYTES = 192 * 2**20
#: The leave-one-out jackknife refits once per unit: skipped (with a note) above this many units.
JACKKNIFE_MAX_UNITS = 300

_MAD_SCALE = 1.4826
#: The robust estimators' variances come from the spread of the g values themselves (MAD,
#: winsorised variance): with 2-4 maps at a voxel two near-equal values give a near-zero se and an
#: absurd z (seen at the edge of the demo's coverage: z = 4250 from 2 maps), so they need 5 maps.
ROBUST_MIN_K = 5


def _chunk_size(k: int) -> int:
    return max(256, int(CHUNK_BYTES / (max(k, 1) * 8 * 16)))


def pool_fixed(y: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed-effect (inverse-variance) pooling of ``y`` (k × n, NaN = no data) with variances ``v``."""
    ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
    k = ok.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
        yy = np.where(ok, y, 0.0)
        sw = w.sum(axis=0)
        est = (w * yy).sum(axis=0) / sw
        q = (w * (yy - est) ** 2).sum(axis=0)
        c = sw - (w * w).sum(axis=0) / sw
        se = 1.0 / np.sqrt(sw)
    df = k - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        i2 = np.where(q > 0, np.maximum(0.0, (q - df) / q), 0.0)
    bad = k < 1
    for a in (est, q, se, i2, c):
        a[bad] = np.nan
    return {"est": est, "se": se, "Q": q, "I2": i2, "k": k, "_c": c, "_w": w, "_ok": ok}


def _random(y: np.ndarray, v: np.ndarray, ok: np.ndarray, tau2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ok, 1.0 / (np.where(ok, v, 1.0) + tau2), 0.0)
        sw = w.sum(axis=0)
        est = (w * np.where(ok, y, 0.0)).sum(axis=0) / sw
        se = 1.0 / np.sqrt(sw)
    return est, se


def pool(method: str, y: np.ndarray, v: np.ndarray, trim: float = 0.2) -> dict[str, np.ndarray]:
    """Pool one voxel chunk with ``method``: ``est, se, z, Q, I2, k`` (+ ``tau2``).

    Parameters
    ----------
    method : str
        ``fixed_effects_hedges``, ``dersimonian_laird``, ``hedges``, ``median`` or ``trimmed_mean``.
    y, v : ndarray, shape (k, n_voxels)
        Effect sizes and their sampling variances (NaN = no data).
    trim : float
        γ of ``trimmed_mean``.
    """
    fe = pool_fixed(y, v)
    ok, k = fe["_ok"], fe["k"]
    kf = k.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau2_dl = np.where(k >= 2, np.maximum(0.0, (fe["Q"] - (kf - 1.0)) / fe["_c"]), 0.0)
    out = {"Q": fe["Q"], "I2": fe["I2"], "k": k, "tau2": np.where(k >= 1, tau2_dl, np.nan)}
    if method == "fixed_effects_hedges":
        est, se = fe["est"], fe["se"]
    elif method in ("dersimonian_laird", "hedges"):
        if method == "dersimonian_laird":
            tau2 = tau2_dl
        else:
            yy = np.where(ok, y, np.nan)
            with np.errstate(divide="ignore", invalid="ignore"), warnings_off():
                s2 = np.nanvar(yy, axis=0, ddof=1)
                vbar = np.nanmean(np.where(ok, v, np.nan), axis=0)
            tau2 = np.where(k >= 2, np.maximum(0.0, s2 - vbar), 0.0)
        est, se = _random(y, v, ok, tau2)
        out["tau2"] = np.where(k >= 1, tau2, np.nan)
    elif method == "median":
        yy = np.where(ok, y, np.nan)
        est = _colmedian(yy, k)
        mad = _colmedian(np.abs(yy - est), k)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.sqrt(math.pi / (2.0 * kf)) * _MAD_SCALE * mad
    elif method == "trimmed_mean":
        est, se = _trimmed(np.where(ok, y, np.nan), k, trim)
    else:
        raise ValueError(f"unknown effect-size method {method!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, est / se, np.nan)
    out.update(est=est, se=se, z=z)
    return out


def _colmedian(ys: np.ndarray, k: np.ndarray) -> np.ndarray:
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


def _trimmed(ys: np.ndarray, k: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    """γ-trimmed mean and its winsorised standard error, per column (NaN = no data)."""
    s = np.sort(ys, axis=0)  # NaN last
    n_rows, n = s.shape
    g = np.floor(trim * k).astype(np.int64)  # values cut at each end (scipy.stats.trim_mean)
    idx = np.arange(n_rows)[:, None]
    keep = (idx >= g) & (idx < (k - g))
    kept = (k - 2 * g).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(keep, s, 0.0).sum(axis=0) / kept
        cols = np.arange(n)
        lo = s[np.minimum(g, n_rows - 1), cols]
        hi = s[np.clip(k - g - 1, 0, n_rows - 1), cols]
        valid = idx < k
        wins = np.where(valid, np.clip(s, lo, hi), np.nan)
        with warnings_off():
            sw2 = np.nanvar(wins, axis=0, ddof=1)
        kf = k.astype(np.float64)
        se = np.sqrt(sw2) / ((1.0 - 2.0 * trim) * np.sqrt(kf))
    mean[k < 1] = np.nan
    return mean, se


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def jackknife_rows(labels, ids, z_full, plan, collections, units, z_without) -> list[dict]:
    """Rows of ``jackknife.tsv`` from ``z_without(i, unit, data) -> z over ids`` for each unit.

    Per cluster and unit: the cluster's mean z with the unit left out and the unit's share, the
    mean over the cluster's voxels of ``1 − z_without / z_full`` (NaN ratios count as 0), as
    NiMARE's ``Jackknife``.
    """
    rows: list[dict] = []
    if ids.size == 0:
        return rows
    lab = labels[ids]
    n_cl = int(lab.max())
    size = np.bincount(lab, minlength=n_cl + 1).astype(float)
    zf = z_full[ids]
    for i, unit, data in units:
        zw = z_without(i, unit, data)
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.nan_to_num(zw / zf)
        fin = np.isfinite(zw)
        sum_z = np.bincount(lab[fin], weights=zw[fin], minlength=n_cl + 1)
        n_z = np.bincount(lab[fin], minlength=n_cl + 1)
        share = np.bincount(lab, weights=1.0 - prop, minlength=n_cl + 1)
        cid = {collections.get(j) for j in unit.image_ids}
        cid_s = ";".join(str(int(c)) for c in sorted(c for c in cid if c is not None and np.isfinite(c)))
        for c in range(1, n_cl + 1):
            if size[c]:
                rows.append({
                    "cluster": c, "unit": unit.label, "image_ids": ";".join(str(j) for j in unit.image_ids),
                    "collection_id": cid_s,
                    "z_mean_without": float(sum_z[c] / n_z[c]) if n_z[c] else float("nan"),
                    "share": float(share[c] / size[c]),
                })  # fmt: skip
    rows.sort(key=lambda r: r["cluster"])
    return rows


class _Stack:
    """The units' g and var(g), float32, in a temporary file of shape (k, 2, n_vox).

    Written row by row with plain file writes and read back in voxel chunks with ``os.pread``
    (:meth:`take`), so the job's resident memory stays O(k × chunk), not O(k × voxels).
    """

    def __init__(self, outdir: Path, k: int, n_vox: int):
        # named like nvmeta.io.atomic_path's temporaries of est.nii.gz, so outputs.sweep removes it
        fd, name = tempfile.mkstemp(prefix=".est.nii.gz.", suffix=".part.stack", dir=outdir)
        self.fh = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.k, self.n_vox = k, n_vox

    def append(self, g: np.ndarray, v: np.ndarray) -> None:
        self.fh.write(np.asarray(g, np.float32).tobytes())
        self.fh.write(np.asarray(v, np.float32).tobytes())

    def take(self, sel) -> tuple[np.ndarray, np.ndarray]:
        """``(y, v)`` float64 arrays (k × n) of the voxels ``sel`` (a slice or sorted index array).

        Each map's row is read with ``os.pread`` over the span of ``sel`` (a memory map instead kept
        its touched pages resident: 1.1 GB at 1,000 maps, against 0.19 GB this way at 300).
        """
        if not self.fh.closed:
            self.fh.close()
        if isinstance(sel, slice):
            lo, hi, idx = sel.start, sel.stop, None
        else:
            sel = np.asarray(sel)
            lo, hi = int(sel.min()), int(sel.max()) + 1
            idx = sel - lo
        n = (hi - lo) if idx is None else idx.size
        y = np.empty((self.k, n))
        v = np.empty((self.k, n))
        row = self.n_vox * 4
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(self.k):
                for out, base in ((y, 2 * i * row), (v, (2 * i + 1) * row)):
                    vals = np.frombuffer(os.pread(fd, (hi - lo) * 4, base + lo * 4), np.float32)
                    out[i] = vals if idx is None else vals[idx]
        finally:
            os.close(fd)
        return y, v

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _EffectEstimator(Estimator):
    """Pools the units' g / var(g) (see the module docstring)."""

    needs = "effect"
    needs_n = True
    combine_label = "averaged (mean g)"

    def fit(self, source: Source, k_min: int) -> Fit:
        n_units, n_vox = source.n_units, source.n_vox
        stack = _Stack(Path(self.workdir or tempfile.gettempdir()), n_units, n_vox)
        self._stack, self._source = stack, source
        # pass 1 (the files, once): the stack, and the fixed-effect and moment sums per voxel
        sums = {n: np.zeros(n_vox) for n in ("w", "wy", "wyy", "ww", "y", "yy", "v")}
        k = np.zeros(n_vox, dtype=np.int64)
        for i, (_unit, g, v) in enumerate(source.iter_effects()):
            stack.append(g, v)
            ok = np.isfinite(g) & np.isfinite(v) & (v > 0)
            gi, vi = g[ok], v[ok]
            w = 1.0 / vi
            k[ok] += 1
            for name, val in (("w", w), ("wy", w * gi), ("wyy", w * gi * gi), ("ww", w * w), ("y", gi),
                              ("yy", gi * gi), ("v", vi)):  # fmt: skip
                sums[name][ok] += val
            if (i + 1) % 100 == 0:
                self.log.info(f"{self.name}: {i + 1}/{n_units} maps read")
        kf = k.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            est_fe = sums["wy"] / sums["w"]
            q = np.maximum(0.0, sums["wyy"] - sums["wy"] * est_fe)
            c = sums["w"] - sums["ww"] / sums["w"]
            tau2_dl = np.where(k >= 2, np.maximum(0.0, (q - (kf - 1.0)) / c), 0.0)
            i2 = np.where(q > 0, np.maximum(0.0, (q - (kf - 1.0)) / q), 0.0)
            s2 = (sums["yy"] - sums["y"] ** 2 / kf) / (kf - 1.0)
            tau2_he = np.where(k >= 2, np.maximum(0.0, s2 - sums["v"] / kf), 0.0)
        none = k < 1
        res = {"est": est_fe, "se": None, "z": None, "tau2": tau2_dl, "Q": q, "I2": i2}
        if self.name == "fixed_effects_hedges":
            with np.errstate(divide="ignore", invalid="ignore"):
                res["se"] = 1.0 / np.sqrt(sums["w"])
        else:
            res["est"], res["se"] = np.full(n_vox, np.nan), np.full(n_vox, np.nan)
            if self.name == "hedges":
                res["tau2"] = tau2_he
            tau2 = res["tau2"]
            step = _chunk_size(n_units)
            # pass 2 (the stack, in voxel chunks): random-effects weights, or the robust estimates
            for a in range(0, n_vox if n_units else 0, step):
                b = min(n_vox, a + step)
                y, v = stack.take(slice(a, b))
                if self.random_effects:
                    ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
                    res["est"][a:b], res["se"][a:b] = _random(y, v, ok, tau2[a:b])
                else:
                    out = pool(self.name, y, v, float(self.cfg["trim"]))
                    res["est"][a:b], res["se"][a:b] = out["est"], out["se"]
        with np.errstate(divide="ignore", invalid="ignore"):
            res["z"] = np.where(res["se"] > 0, res["est"] / res["se"], np.nan)
        for name in res:
            res[name] = np.where(none, np.nan, res[name])
        z = res.pop("z")
        logp = logp_from_z(z, self.two_sided)
        reported = (k >= k_min) & np.isfinite(z)
        summary = {"effect_size": "Hedges' g", "estimator_family": self.family}
        if self.name == "trimmed_mean":
            summary["trim"] = float(self.cfg["trim"])
        with np.errstate(invalid="ignore"):
            if reported.any():
                summary["est_min"] = float(np.nanmin(res["est"][reported]))
                summary["est_max"] = float(np.nanmax(res["est"][reported]))
                summary["tau2_median"] = float(np.nanmedian(res["tau2"][reported]))
                summary["I2_median"] = float(np.nanmedian(res["I2"][reported]))
        return Fit(z=z, logp=logp, k=k, reported=reported, maps=res, summary=summary)

    random_effects: ClassVar[bool] = False
    family: ClassVar[str] = ""

    def close(self) -> None:
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()
            self._stack = None

    def jackknife(self, labels: np.ndarray, z_full: np.ndarray, plan, collections: dict) -> list[dict]:
        """Leave-one-out refit per cluster (NiMARE's ``Jackknife`` diagnostic for IBMA).

        Parameters
        ----------
        labels : ndarray of int, (n_vox,)
            Cluster number per mask voxel (0 = none).
        z_full : ndarray
            The method's z with every unit.

        Returns
        -------
        list of dict
            One row per cluster and unit: ``cluster, unit, image_ids, collection_id,
            z_mean_without`` (the cluster's mean z with that unit left out) and ``share``
            (the mean over the cluster's voxels of ``1 − z_without / z_full``, as NiMARE).
        """
        stack = self._stack
        ids = np.flatnonzero(labels > 0)
        step = _chunk_size(len(plan.units))  # voxel chunks: memory O(k x chunk), as the fit
        trim = float(self.cfg["trim"])

        # chunks outer, units inner: the stack is read once; the leave-one-out z are kept as
        # float32 (units x cluster voxels)
        zw_all = np.empty((len(plan.units), ids.size), np.float32)
        for a in range(0, ids.size, step):
            sel = ids[a : a + step]
            y, v = stack.take(sel)
            for i in range(len(plan.units)):
                keep = y[i].copy()
                y[i] = np.nan
                zw_all[i, a : a + step] = pool(self.name, y, v, trim)["z"]
                y[i] = keep

        def units():
            for i, unit in enumerate(plan.units):
                yield i, unit, None

        def z_without(i, unit, _):
            return zw_all[i].astype(np.float64)

        return jackknife_rows(labels, ids, z_full, plan, collections, units(), z_without)


class FixedEffectsHedges(_EffectEstimator):
    __doc__ = "Inverse-variance pooling of Hedges' g with τ² = 0 (NiMARE's FixedEffectsHedges)."
    name = "fixed_effects_hedges"
    family = "fixed effect"


class DerSimonianLaird(_EffectEstimator):
    __doc__ = "Random-effects pooling of Hedges' g, DerSimonian–Laird τ² (PyMARE's DerSimonianLaird)."
    name = "dersimonian_laird"
    family = "random effects"
    random_effects = True
    min_k = 2


class Hedges(_EffectEstimator):
    __doc__ = "Random-effects pooling of Hedges' g, Hedges' τ² estimator (PyMARE's Hedges)."
    name = "hedges"
    family = "random effects"
    random_effects = True
    min_k = 2


class Median(_EffectEstimator):
    __doc__ = "Median of Hedges' g with a MAD-based variance (robust; Peraza et al. 2025)."
    name = "median"
    family = "robust"
    min_k = ROBUST_MIN_K


class TrimmedMean(_EffectEstimator):
    __doc__ = "γ-trimmed mean of Hedges' g with the winsorised variance (robust; Peraza et al. 2025)."
    name = "trimmed_mean"
    family = "robust"
    min_k = ROBUST_MIN_K


EFFECT_ESTIMATORS = (FixedEffectsHedges, DerSimonianLaird, Hedges, Median, TrimmedMean)
ESTIMATORS.update({cls.name: cls for cls in EFFECT_ESTIMATORS})
