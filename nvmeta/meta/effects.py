"""Effect-size estimators: pooling per-image Hedges' g maps (``g.nii.gz``, ``varg.nii.gz``).

Each image's g and var(g) come from its t (or z) map and its one resolved sample size
(:mod:`nvmeta.images.effectsize`). Per voxel, over the ``k`` units with data (``y_i`` = g, ``v_i`` =
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
``median``, ``trimmed_mean``
    The median and the γ-trimmed mean of the y (robust to outlying studies; Peraza et al. 2025),
    with a variance that is never below what the maps' sampling variances imply and p-values from
    Student's t (Yuen 1974 for the trimmed mean): :mod:`nvmeta.meta.robust`.

Every method reports ``est`` (pooled g), ``se``, ``z`` with its log-space p (``z = est / se``;
for the robust methods the normal deviate of the Student-t p of ``est / se``),
``Q`` and ``I² = max(0, (Q − (k − 1)) / Q)`` (Higgins & Thompson 2002; from the fixed-effect fit),
``k`` and ``tau2``: the random-effects methods' own τ²; for ``fixed_effects_hedges`` (which
assumes τ² = 0) and the robust estimators the DL moment τ², as a heterogeneity descriptor next to
their Q and I² (both from the fixed-effect fit).

Memory and passes: the maps' files are read once; while they are read, the fixed-effect and moment
sums are accumulated per voxel (memory O(voxels)) and what a second pass needs goes to a float32
stack on disk (a temporary next to the outputs, swept if the job is killed, laid out by voxel chunk:
:class:`_Stack`). ``fixed_effects_hedges`` needs nothing more (no stack, unless the jackknife runs);
the random-effects methods need one more pass, over g and var(g), for their ``1 / (v + τ²)``
weights; the robust methods over g alone (their variance floor needs only sums of the v, taken in
pass 1); they and the jackknife read the stack in voxel chunks
whose size follows the number of maps (about :data:`CHUNK_BYTES` of arrays in memory).

With ``meta.dependence: cluster_robust`` the inverse-variance and random-effects methods keep
their estimate and weights, and take ``se`` from the CR2 sandwich over collections with p from
Student's t on Satterthwaite df (:mod:`nvmeta.meta.dependence`), in pass 2 (``fixed_effects_hedges``
then keeps g and var(g) too).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from nvmeta.meta import dependence
from nvmeta.meta.estimators import Estimator, Fit, jackknife_rows, logp_from_z
from nvmeta.meta.robust import ROBUST_METHODS, pool_robust, variance_sums
from nvmeta.meta.units import Source

#: Working memory of one voxel chunk: about 16 arrays of k × chunk float64 are alive at once in
#: :func:`pool` (measured: 256 MB with the divisor 8 gave a 0.8 GB peak at k = 1000).
CHUNK_BYTES = 192 * 2**20
#: The leave-one-out jackknife refits once per unit: skipped (with a note) above this many units.
JACKKNIFE_MAX_UNITS = 300
#: Maps buffered before the stack of g / var(g) is written, chunk by chunk (see :class:`_Stack`).
STACK_BUFFER_BYTES = 128 * 2**20

#: Fewest maps at a voxel for the robust estimators: below 5 values a 20 % trimmed mean trims
#: nothing and a median is no more robust than the mean of the two or three values it rests on.
ROBUST_MIN_K = 5


def will_jackknife(cfg: dict, n_units: int) -> bool:
    """Whether the meta job runs the leave-one-out jackknife (``meta.jackknife`` and at most
    :data:`JACKKNIFE_MAX_UNITS` units): the fit keeps the data it needs only then."""
    return bool(cfg["jackknife"]) and n_units <= JACKKNIFE_MAX_UNITS


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
    elif method in ROBUST_METHODS:
        r = pool_robust(method, np.where(ok, y, np.nan), k, variance_sums(np.where(ok, v, np.nan)), trim)
        out.update(est=r["est"], se=r["se"], z=r["z"], df=r["df"])
        return out
    else:
        raise ValueError(f"unknown effect-size method {method!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, est / se, np.nan)
    out.update(est=est, se=se, z=z)
    return out


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class _Stack:
    """The units' g (and var(g)) as float32, in a temporary file laid out by voxel chunk.

    Pass 2 needs every unit's values of one voxel chunk at a time, a transpose of the order in
    which the maps are read. Written map by map (a file of shape units x voxels), reading one
    chunk back cost one small read per map and field: 40,000 reads of 1 KB per chunk at 20,000
    maps, which the disk serves at about 24 MB/s once the stack outgrows the page cache (37.7 GB
    at 20,000 maps on 2 mm). So the maps are buffered in blocks of :attr:`block` (about
    :data:`STACK_BUFFER_BYTES`) and each block is written chunk by chunk: a chunk is then one
    contiguous read of ``block x fields x chunk`` values per block (~130 KB, read at the disk's
    full rate), and :meth:`take` gathers only the chunks a selection touches.

    Parameters
    ----------
    outdir : Path
        Where the temporary goes: the job's output directory, whose stale temporaries the next
        run of the job sweeps if it is killed (:func:`nvmeta.meta.outputs.sweep`).
    k, n_vox : int
        Units and mask voxels.
    fields : int
        1 (g only: the robust estimators) or 2 (g and var(g)).
    chunk : int
        Voxels per chunk (:func:`_chunk_size`).
    """

    def __init__(self, outdir: Path, k: int, n_vox: int, fields: int, chunk: int):
        self.k, self.n_vox, self.fields, self.chunk = k, n_vox, fields, max(1, chunk)
        self.block = max(1, min(k, STACK_BUFFER_BYTES // (fields * 4 * max(n_vox, 1))))
        self._buf = np.empty((self.block, fields, n_vox), np.float32)  # before the file exists
        # named like nvmeta.io.atomic_path's temporaries of est.nii.gz, so outputs.sweep removes it
        fd, name = tempfile.mkstemp(prefix=".est.nii.gz.", suffix=".part.stack", dir=outdir)
        self.fh = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._n = 0  # maps in the buffer
        self._blocks: list[tuple[int, int, int]] = []  # (first unit, units, byte offset) per block
        self._offset = 0

    def append(self, g: np.ndarray, v: np.ndarray | None = None) -> None:
        self._buf[self._n, 0] = g
        if self.fields == 2:
            self._buf[self._n, 1] = v
        self._n += 1
        if self._n == self.block:
            self._flush()

    def _flush(self) -> None:
        n = self._n
        if not n:
            return
        first = self._blocks[-1][0] + self._blocks[-1][1] if self._blocks else 0
        self._blocks.append((first, n, self._offset))
        buf = self._buf[:n]
        for a in range(0, self.n_vox, self.chunk):
            self.fh.write(np.ascontiguousarray(buf[:, :, a : a + self.chunk]).tobytes())
        self._offset += n * self.fields * self.n_vox * 4
        self._n = 0

    def finish(self) -> None:
        """Write the buffered maps and close the file (idempotent); checks that every unit came."""
        if not self.fh.closed:
            self._flush()
            self.fh.close()
            self._buf = None  # the write buffer is not needed any more
            if sum(b[1] for b in self._blocks) != self.k:
                raise RuntimeError(f"the stack holds {sum(b[1] for b in self._blocks)} units, not {self.k}")

    def take(self, sel) -> tuple[np.ndarray, np.ndarray | None]:
        """``(y, v)`` float64 arrays (k × n) of the voxels ``sel`` (a slice, or an index array that
        is strictly increasing); ``v`` is None for a one-field stack.

        Each touched chunk is read with one ``os.pread`` per block (a memory map instead kept its
        touched pages resident: 1.1 GB at 1,000 maps).
        """
        self.finish()
        cols = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else np.asarray(sel, np.int64)
        n = cols.size
        if n and (np.any(np.diff(cols) <= 0) or cols[0] < 0 or cols[-1] >= self.n_vox):
            raise ValueError("a stack selection must be strictly increasing voxel indices in the mask")
        out = [np.empty((self.k, n)) for _ in range(self.fields)]
        which = cols // self.chunk
        bounds = np.flatnonzero(np.diff(which)) + 1  # sel is sorted: runs of one chunk
        starts = np.concatenate(([0], bounds))
        stops = np.concatenate((bounds, [n]))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for s0, s1 in zip(starts.tolist(), stops.tolist(), strict=True):
                if s0 == s1:
                    continue
                c = int(which[s0])
                a = c * self.chunk
                width = min(self.chunk, self.n_vox - a)
                local = cols[s0:s1] - a
                whole = local.size == width
                for first, nb, offset in self._blocks:
                    size = nb * self.fields * width * 4
                    seg = np.frombuffer(os.pread(fd, size, offset + nb * self.fields * a * 4), np.float32)
                    if len(seg) * 4 != size:
                        raise OSError(f"short read from the stack {self.path.name}")
                    seg = seg.reshape(nb, self.fields, width)
                    for f in range(self.fields):
                        out[f][first : first + nb, s0:s1] = seg[:, f] if whole else seg[:, f, local]
        finally:
            os.close(fd)
        return out[0], (out[1] if self.fields == 2 else None)

    def close(self) -> None:
        self._buf = None
        try:
            if not self.fh.closed:
                self.fh.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class _EffectEstimator(Estimator):
    """Pools the units' g / var(g) (see the module docstring)."""

    needs = "effect"
    needs_n = True
    combine_label = "averaged (mean g)"

    def fit(self, source: Source, k_min: int) -> Fit:
        n_units, n_vox = source.n_units, source.n_vox
        step = _chunk_size(n_units)
        jackknife = will_jackknife(self.cfg, n_units)
        robust_se = dependence.is_cluster_robust(self.cfg)  # the sandwich needs g and var(g) in pass 2
        # what pass 2 and the jackknife read: fixed effects nothing (unless the jackknife runs),
        # the robust estimators g only (their floor needs pass 1's sums of v, 1/v and v^-1/2),
        # the random-effects methods and the jackknife g and var(g)
        stack = None
        if self.name != "fixed_effects_hedges" or jackknife or robust_se:
            fields = 2 if (self.random_effects or jackknife or robust_se) else 1
            workdir = Path(self.workdir or tempfile.gettempdir())
            stack = _Stack(workdir, n_units, n_vox, fields, step)
        self._stack, self._source = stack, source
        # pass 1 (the files, once): the stack, and the fixed-effect and moment sums per voxel
        robust = self.name in ROBUST_METHODS
        names = ("w", "wy", "wyy", "ww", "y", "yy", "v") + (("isd",) if robust else ())
        sums = {n: np.zeros(n_vox) for n in names}
        k = np.zeros(n_vox, dtype=np.int64)
        for i, (_unit, g, v) in enumerate(source.iter_effects()):
            if stack is not None:
                stack.append(g, v)
            ok = np.isfinite(g) & np.isfinite(v) & (v > 0)
            gi, vi = g[ok], v[ok]
            w = 1.0 / vi
            k[ok] += 1
            for name, val in (("w", w), ("wy", w * gi), ("wyy", w * gi * gi), ("ww", w * w), ("y", gi),
                              ("yy", gi * gi), ("v", vi)):  # fmt: skip
                sums[name][ok] += val
            if robust:
                sums["isd"][ok] += np.sqrt(w)
            if (i + 1) % 100 == 0:
                self.log.info(f"{self.name}: {i + 1}/{n_units} maps read")
        if stack is not None:
            stack.finish()  # frees the write buffer before pass 2 and the jackknife
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
        res = {"est": est_fe, "se": None, "z": None, "tau2": tau2_he if self.name == "hedges" else tau2_dl,
               "Q": q, "I2": i2}  # fmt: skip
        extra = {}
        if self.name == "fixed_effects_hedges" and not robust_se:
            with np.errstate(divide="ignore", invalid="ignore"):
                res["se"] = 1.0 / np.sqrt(sums["w"])
                res["z"] = np.where(res["se"] > 0, res["est"] / res["se"], np.nan)
        else:
            extra = self._pass2(stack, res, sums, step, n_vox if n_units else 0)
        for name in res:
            res[name] = np.where(none, np.nan, res[name])
        z = res.pop("z")
        logp = logp_from_z(z, self.two_sided)
        reported = (k >= k_min) & np.isfinite(z)
        summary = {"effect_size": "Hedges' g", "estimator_family": self.family}
        notes = []
        if robust_se:
            notes, more = dependence.report(self.name, {**extra, "k": k}, reported, self._clusters, k_min)
            summary.update(more)
            for msg in notes:
                self.log.warning(msg)
        if self.name == "trimmed_mean":
            summary["trim"] = float(self.cfg["trim"])
        with np.errstate(invalid="ignore"):
            if reported.any():
                summary["est_min"] = float(np.nanmin(res["est"][reported]))
                summary["est_max"] = float(np.nanmax(res["est"][reported]))
                summary["tau2_median"] = float(np.nanmedian(res["tau2"][reported]))
                summary["I2_median"] = float(np.nanmedian(res["I2"][reported]))
                if robust:
                    summary.update(_robust_summary(self.name, extra, reported))
        return Fit(z=z, logp=logp, k=k, reported=reported, maps=res, summary=summary, notes=notes)

    def _pass2(self, stack: _Stack, res: dict, sums: dict, step: int, n_vox: int) -> dict:
        """Pass 2 (the stack, in voxel chunks): random-effects weights, or the robust estimates
        (with pass 1's ``sums`` of v, 1 / v and v^-1/2 for their floor).

        Fills ``res``'s est, se and z; returns the robust methods' per-voxel ``df`` and
        ``floored`` (empty for the random-effects methods).
        """
        n = len(res["Q"])
        res["est"], res["se"], res["z"] = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        robust = {} if self.random_effects else {"df": np.full(n, np.nan), "floored": np.zeros(n, bool)}
        if dependence.is_cluster_robust(self.cfg):
            self._clusters = dependence.clusters_of(self._source.plan)
            robust = {
                "df": np.full(n, np.nan),
                "n_clusters": np.zeros(n, np.int64),
                "degenerate": np.zeros(n, bool),
            }
        for a in range(0, n_vox, step):
            b = min(n_vox, a + step)
            y, v = stack.take(slice(a, b))
            if "n_clusters" in robust:  # the method's weights, the CR2 sandwich over collections
                r = dependence.effect_z(
                    y, v, res["tau2"][a:b] if self.random_effects else 0.0, self._clusters
                )
                for name in ("est", "se", "z", "df", "n_clusters", "degenerate"):
                    (res if name in res else robust)[name][a:b] = r[name]
            elif self.random_effects:
                ok = np.isfinite(y) & np.isfinite(v) & (v > 0)
                est, se = _random(y, v, ok, res["tau2"][a:b])
                res["est"][a:b], res["se"][a:b] = est, se
                with np.errstate(divide="ignore", invalid="ignore"):
                    res["z"][a:b] = np.where(se > 0, est / se, np.nan)
            else:  # units without data at a voxel are NaN in g (Source.iter_effects)
                vsums = {name: sums[name][a:b] for name in ("v", "w", "isd")}
                r = pool_robust(self.name, y, np.isfinite(y).sum(axis=0), vsums, float(self.cfg["trim"]))
                for name in ("est", "se", "z"):
                    res[name][a:b] = r[name]
                robust["df"][a:b], robust["floored"][a:b] = r["df"], r["floored"]
        return robust

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
        if stack is None or stack.fields != 2:
            raise RuntimeError(f"{self.name}: the fit kept no g / var(g) stack for the jackknife")
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
                if dependence.is_cluster_robust(self.cfg):
                    tau2 = pool(self.name, y, v, trim)["tau2"] if self.random_effects else 0.0
                    zw_all[i, a : a + step] = dependence.effect_z(y, v, tau2, self._clusters)["z"]
                else:
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
    __doc__ = "Median of Hedges' g, its variance floored by the maps' var(g) (robust; nvmeta.meta.robust)."
    name = "median"
    family = "robust"
    no_sandwich = "the median of the g is not a weighted mean, so it has no sandwich form"
    min_k = ROBUST_MIN_K


class TrimmedMean(_EffectEstimator):
    __doc__ = "γ-trimmed mean of Hedges' g, Yuen's variance floored by the maps' var(g) (nvmeta.meta.robust)."
    name = "trimmed_mean"
    family = "robust"
    no_sandwich = (
        "the trimmed mean of the g is not a weighted mean of all of them, so it has no sandwich form"
    )
    min_k = ROBUST_MIN_K


def _robust_summary(method: str, robust: dict, reported: np.ndarray) -> dict:
    """``summary.json`` entries of a robust method: its p distribution, df and how often the
    sampling-variance floor, not the spread of the g, set the variance."""
    df = robust["df"][reported]
    fin = df[np.isfinite(df)]
    ref = "Yuen's trimmed t, df = h - 1" if method == "trimmed_mean" else "t, df = 0.3675 (k - 1)"
    return {
        "p_distribution": f"Student t ({ref}; Satterthwaite df where the sampling-variance floor binds)",
        "df_min": float(fin.min()) if fin.size else None,
        "df_median": float(np.median(fin)) if fin.size else None,
        "se_floor_fraction": float(robust["floored"][reported].mean()),
    }


#: The effect-size estimators, in the order :data:`nvmeta.meta.registry.ESTIMATORS` lists them.
EFFECT_ESTIMATORS = (FixedEffectsHedges, DerSimonianLaird, Hedges, Median, TrimmedMean)
