"""Coordinate-based meta-analysis (CBMA) of peaks extracted from an analysis' z-maps.

Entry points used by the Snakemake scripts:

- :func:`peaks_table` extracts the peaks of every included template-grid z-map and writes
  ``results/analyses/{a}/cbma/peaks.tsv``.
- :func:`run_cbma` runs one NiMARE CBMA estimator with NiMARE's Monte-Carlo FWE correction
  on those peaks and writes ``results/analyses/{a}/cbma/{method}/``.
- :func:`overlap` compares every IBMA method's FDR map with every CBMA method's FWE maps
  and writes ``results/analyses/{a}/overlap.tsv`` (+ per-cluster table and a figure).

Peaks
-----
:mod:`nvmeta.cbma.peaks`: by default the peaks of what survives each map's own corrected
inference (``cbma.peaks_from``, ``cbma.peak_correction``), as the authors would report them, from
nilearn's :func:`~nilearn.reporting.get_clusters_table` rows of each surviving cluster (at most
``cbma.max_peaks_per_cluster``, ``cbma.peak_distance`` mm apart). NiMARE has no peak extraction
of its own for statistical maps (its CBMA works from reported coordinates).

Negative peaks are their own contrast: a map's peaks with ``z < 0`` (deactivations) form a
separate experiment from its positive peaks. ``cbma.sign`` chooses which experiments enter
the CBMA (``positive`` by default); the other sign is still in ``peaks.tsv`` and in the
NiMARE export.

Experiments
-----------
With ``cbma.study: collection`` (the default) the peaks of every map of one NeuroVault
collection are pooled into one experiment (Turkeltaub et al. 2012: contrasts of one study
must not count as independent experiments); its sample sizes are the list of the maps' ``n``
(NiMARE's ALE kernel uses their mean). With ``image`` every map is its own experiment. The
sample size of a map is ``n`` from its ``qc.json`` (the one resolved sample size); ALE
leaves out, loudly, an experiment without one. A map without a peak is no experiment (its
null result cannot enter a CBMA): this is counted and reported.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.cbma.peaks import PEAK_COLUMNS, extract_peaks, peaks_table
from nvmeta.io import atomic_path, write_json, write_tsv
from nvmeta.workflow.quiet import Known, quiet

logger = logging.getLogger(__name__)

__all__ = [
    "ESTIMATORS",
    "FWE_MAPS",
    "PEAK_COLUMNS",
    "extract_peaks",
    "peaks_table",
    "experiments_dataset",
    "run_cbma",
    "significant_mask",
    "overlap",
    "read_included",
]

#: Registry of the CBMA estimators: config name -> (NiMARE module, class name).
ESTIMATORS: dict[str, tuple[str, str]] = {
    "ale": ("nimare.meta.cbma.ale", "ALE"),
    "mkda": ("nimare.meta.cbma.mkda", "MKDADensity"),
    "kda": ("nimare.meta.cbma.mkda", "KDA"),
}

#: NiMARE 0.22 (the version nvmeta pins) warns on every fit of a ``Dataset``, which NiMARE 1.0 will
#: drop; the fit itself is unchanged.
DATASET_DEPRECATED = Known(
    "Passing a Dataset to a NiMARE algorithm is deprecated",
    "NiMARE 0.22, which nvmeta pins, still fits a Dataset; the deprecation is for NiMARE 1.0",
    category=FutureWarning,
)

#: The FWE maps NiMARE's ``FWECorrector(method="montecarlo")`` returns, written with NiMARE's
#: own (BIDS-like) names.
FWE_MAPS = [
    "z_desc-size_level-cluster_corr-FWE_method-montecarlo",
    "logp_desc-size_level-cluster_corr-FWE_method-montecarlo",
    "z_desc-mass_level-cluster_corr-FWE_method-montecarlo",
    "logp_desc-mass_level-cluster_corr-FWE_method-montecarlo",
    "z_level-voxel_corr-FWE_method-montecarlo",
    "logp_level-voxel_corr-FWE_method-montecarlo",
]
#: Uncorrected maps written next to them (``stat`` is the ALE / OF value).
BASE_MAPS = ["z", "stat", "p"]
#: The significance levels compared in overlap.tsv -> the NiMARE -log10(p) map defining them.
LEVEL_MAPS = {
    "cluster": "logp_desc-size_level-cluster_corr-FWE_method-montecarlo",
    "voxel": "logp_level-voxel_corr-FWE_method-montecarlo",
}
_CLUSTER_COLUMNS = ["Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)", "Cluster Size (voxels)"]


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    # nilearn calls gc.collect() for every image it loads; freezing the heap that exists
    # before the block makes those collections cheap (see nvmeta.meta for the measurement).
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def read_included(qc_tsv: str | os.PathLike):
    """Included rows of an analysis' ``qc.tsv`` (``image_id``, ``collection_id`` as int).

    Parameters
    ----------
    qc_tsv : path-like
        ``results/analyses/{a}/qc.tsv``.

    Returns
    -------
    pandas.DataFrame
        One row per included image, in file order.
    """
    import pandas as pd

    df = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    df = df[df["status"].astype(str).str.strip() == "included"].reset_index(drop=True)
    df["image_id"] = df["image_id"].astype(int)
    df["collection_id"] = pd.to_numeric(df["collection_id"], errors="coerce").astype("Int64")
    return df


# ----------------------------------------------------------------------------------------
# CBMA through NiMARE
# ----------------------------------------------------------------------------------------


def _experiments(peaks: Any, study: str, sign: str) -> list[dict]:
    """Group the peaks of one sign into experiments (see the module docstring)."""
    sel = peaks[peaks["sign"] == sign]
    out = []
    if study == "collection":
        keys = sel["collection_id"].astype("Int64").astype(str)
        label = "collection"
    elif study == "image":
        keys = sel["image_id"].astype(str)
        label = "image"
    else:
        raise ValueError(f"cbma.study must be 'collection' or 'image', got {study!r}")
    for key, group in sel.groupby(keys, sort=False):
        per_map = group.drop_duplicates("image_id")
        ns = [int(v) for v in per_map["sample_size"] if not _missing(v)]
        out.append(
            {
                "id": f"{label}-{key}",
                "image_ids": [int(i) for i in per_map["image_id"]],
                "x": group["x"].astype(float).tolist(),
                "y": group["y"].astype(float).tolist(),
                "z": group["z"].astype(float).tolist(),
                "z_stat": group["z_value"].astype(float).tolist(),
                # every map of the experiment must have a sample size for ALE
                "sample_sizes": ns if len(ns) == len(per_map) else None,
            }
        )
    return out


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(np.isnan(float(value)))
    except (TypeError, ValueError):
        return True


def experiments_dataset(experiments: list[dict], mask_img: nib.Nifti1Image, with_sample_sizes: bool):
    """A NiMARE ``Dataset`` of CBMA experiments (one study with one contrast each).

    Parameters
    ----------
    experiments : list of dict
        From :func:`_experiments`.
    mask_img : nibabel.Nifti1Image
        The template mask (the Dataset's masker: outputs are on the template grid).
    with_sample_sizes : bool
        Put ``sample_sizes`` in the metadata (what NiMARE's ALE kernel reads).
    """
    from nimare.dataset import Dataset

    source = {}
    for exp in experiments:
        contrast: dict[str, Any] = {
            "coords": {
                "space": "MNI",
                "x": exp["x"],
                "y": exp["y"],
                "z": exp["z"],
                "z_stat": exp["z_stat"],
            },
            "metadata": {"image_ids": exp["image_ids"]},
        }
        if with_sample_sizes:
            contrast["metadata"]["sample_sizes"] = exp["sample_sizes"]
        source[exp["id"]] = {"contrasts": {"1": contrast}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Dataset is deprecated in NiMARE 0.22
        warnings.simplefilter("ignore", FutureWarning)
        return Dataset(source, target="mni152_2mm", mask=mask_img)


def _estimator(method: str, cfg: dict, n_cores: int):
    import importlib

    if method not in ESTIMATORS:
        raise ValueError(f"unknown cbma method {method!r}; expected one of {', '.join(ESTIMATORS)}")
    module, name = ESTIMATORS[method]
    cls = getattr(importlib.import_module(module), name)
    return cls(n_cores=n_cores, random_state=int(cfg["random_state"]))


def significant_mask(logp: np.ndarray, alpha: float) -> np.ndarray:
    """Voxels whose NiMARE FWE ``-log10(p)`` map says ``p < alpha`` (NaN = not significant)."""
    logp = np.nan_to_num(np.asarray(logp, dtype=np.float64), nan=0.0)
    # The maps are float32: p = alpha exactly (e.g. the floor 1/n_iters) must not pass as p < alpha.
    return logp > -math.log10(alpha) + 1e-6


def _save(img: nib.Nifti1Image, dest: Path) -> None:
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_data_dtype(np.float32)
    out.header.set_xyzt_units("mm")
    with atomic_path(dest) as tmp:
        nib.save(out, tmp)


def run_cbma(
    method: str,
    peaks_tsv: str | os.PathLike,
    mask_img: nib.Nifti1Image,
    cfg: dict,
    outdir: str | os.PathLike,
    *,
    n_cores: int = 1,
    log: logging.Logger | None = None,
) -> dict:
    """Run one NiMARE CBMA estimator plus Monte-Carlo FWE on an analysis' peaks.

    Parameters
    ----------
    method : {"ale", "mkda", "kda"}
        ``ale`` = NiMARE's ``ALE`` (kernel width from each experiment's sample sizes),
        ``mkda`` = ``MKDADensity``, ``kda`` = ``KDA`` (see :data:`ESTIMATORS`).
    peaks_tsv : path-like
        ``results/analyses/{a}/cbma/peaks.tsv`` (:func:`peaks_table`).
    mask_img : nibabel.Nifti1Image
        The template mask; the Dataset's masker, so every output is on the template grid.
    cfg : dict
        The analysis' ``cbma`` block (``study``, ``sign``, ``n_iters``, ``voxel_thresh``,
        ``cluster_threshold``, ``random_state``).
    outdir : path-like
        ``results/analyses/{a}/cbma/{method}/``: ``z.nii.gz``, ``stat.nii.gz``, ``p.nii.gz``,
        the :data:`FWE_MAPS` (``.nii.gz``), ``clusters.tsv`` (clusters significant at the
        cluster-level FWE ``cluster_threshold``), ``z.png`` and ``summary.json``.
    n_cores : int
        NiMARE's ``n_cores`` (the rule's threads).
    log : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    ValueError
        Unknown method, or no experiment to analyse (every map without a peak of the sign,
        or, for ALE, without a sample size).
    """
    import importlib

    import nilearn.plotting  # noqa: F401 - imported before the heap is frozen (see _frozen_gc)
    import nilearn.reporting  # noqa: F401
    import nimare.correct  # noqa: F401

    if method not in ESTIMATORS:
        raise ValueError(f"unknown cbma method {method!r}; expected one of {', '.join(ESTIMATORS)}")
    importlib.import_module(ESTIMATORS[method][0])
    # NiMARE's masker (nilearn) calls gc.collect() for every image it loads: with the heap
    # frozen those collections are cheap, and nothing else changes.
    with _frozen_gc():
        return _run_cbma(method, peaks_tsv, mask_img, cfg, outdir, n_cores, log or logger)


def _run_cbma(method, peaks_tsv, mask_img, cfg, outdir, n_cores, log) -> dict:
    import nimare
    import pandas as pd
    from nimare.correct import FWECorrector

    from nvmeta.images.download import remove_stale_temps

    t0 = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = [f"{m}.nii.gz" for m in BASE_MAPS + FWE_MAPS] + ["clusters.tsv", "z.png", "summary.json"]
    remove_stale_temps(*(outdir / n for n in names))  # temporaries of a killed earlier attempt
    peaks = pd.read_csv(peaks_tsv, sep="\t")
    sign = str(cfg["sign"])
    exps = _experiments(peaks, str(cfg["study"]), sign)
    notes: list[str] = []
    if method == "ale":
        dropped = [e for e in exps if not e["sample_sizes"]]
        if dropped:
            ids = [i for e in dropped for i in e["image_ids"]]
            msg = (
                f"ale: {len(dropped)} experiment(s) left out because a map has no sample size "
                f"(qc.json n is null; set conversion.n_images / n_collections): images {ids}"
            )
            notes.append(msg)
            log.warning(msg)
            exps = [e for e in exps if e["sample_sizes"]]
    n_maps_with_peaks = int(peaks.loc[peaks["sign"] == sign, "image_id"].nunique())
    if not exps:
        raise ValueError(
            f"cbma {method}: no experiment to analyse: no included map has a {sign} peak"
            + (" with a sample size" if method == "ale" else "")
            + " (see peaks.tsv; lower cbma.peak_threshold or cbma.min_cluster_voxels?)"
        )
    if len(exps) < 17:
        # Eickhoff et al. (2016, NeuroImage 137): ALE needs about 17-20 experiments for
        # results not driven by a single experiment.
        msg = (
            f"{method}: only {len(exps)} experiment(s) (cbma.study={cfg['study']}); CBMA results "
            "with fewer than ~17 experiments can be driven by one experiment (Eickhoff et al. 2016)"
        )
        notes.append(msg)
        log.warning(msg)
    if int(cfg["n_iters"]) * float(cfg["cluster_threshold"]) <= 1:
        msg = (
            f"{method}: cbma.n_iters={cfg['n_iters']} is too small for FWE p < cluster_threshold="
            f"{cfg['cluster_threshold']}: the smallest Monte-Carlo p is 1/n_iters, so nothing can be "
            "significant (use n_iters >= 5000 for a real run)"
        )
        notes.append(msg)
        log.warning(msg)
    dset = experiments_dataset(exps, mask_img, with_sample_sizes=method == "ale")
    est = _estimator(method, cfg, n_cores)
    log.info(
        "%s: NiMARE %s on %d experiments, %d foci (%s peaks), n_iters=%d, n_cores=%d",
        method,
        type(est).__name__,
        len(exps),
        sum(len(e["x"]) for e in exps),
        sign,
        cfg["n_iters"],
        n_cores,
    )
    t_fit = time.perf_counter()
    with quiet(DATASET_DEPRECATED, log=log):
        result = est.fit(dset)
    t_corr = time.perf_counter()
    corrector = FWECorrector(
        method="montecarlo",
        voxel_thresh=float(cfg["voxel_thresh"]),
        n_iters=int(cfg["n_iters"]),
        n_cores=n_cores,
    )
    cres = corrector.transform(result)
    t_done = time.perf_counter()
    missing = [m for m in BASE_MAPS + FWE_MAPS if m not in cres.maps]
    if missing:
        raise RuntimeError(f"{method}: NiMARE {nimare.__version__} returned no map(s) {missing}")
    imgs = {name: cres.get_map(name) for name in BASE_MAPS + FWE_MAPS}
    for name, img in imgs.items():
        _save(img, outdir / f"{name}.nii.gz")

    alpha = float(cfg["cluster_threshold"])
    z = np.asarray(imgs["z"].dataobj, dtype=np.float64)
    sig = {lvl: significant_mask(np.asarray(imgs[m].dataobj), alpha) for lvl, m in LEVEL_MAPS.items()}
    z_sig = np.where(sig["cluster"], z, 0.0).astype(np.float32)
    z_sig_img = nib.Nifti1Image(z_sig, imgs["z"].affine)
    table = _clusters_table(z_sig_img)
    write_tsv(outdir / "clusters.tsv", table)
    from nvmeta.figures.cbma_maps import plot_cbma

    plot_cbma(imgs["z"], z_sig_img, outdir / "z.png", f"{method.upper()} (NiMARE {type(est).__name__})",
          len(exps), alpha, cfg, n_clusters=len(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").dropna()))  # fmt: skip

    summary: dict[str, Any] = {
        "method": method,
        "estimator": f"nimare.{ESTIMATORS[method][0].split('nimare.')[-1]}.{ESTIMATORS[method][1]}",
        "nimare_version": nimare.__version__,
        "study": cfg["study"],
        "sign": sign,
        "n_experiments": len(exps),
        "n_maps": n_maps_with_peaks,
        "n_foci": int(sum(len(e["x"]) for e in exps)),
        "n_iters": int(cfg["n_iters"]),
        "voxel_thresh": float(cfg["voxel_thresh"]),
        "cluster_threshold": alpha,
        "random_state": int(cfg["random_state"]),
        "n_cores": int(n_cores),
        "z_max": float(np.nanmax(z)),
        "n_significant_cluster_fwe": int(sig["cluster"].sum()),
        "n_significant_voxel_fwe": int(sig["voxel"].sum()),
        "n_clusters": int(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").notna().sum())
        if len(table)
        else 0,
        "warnings": notes,
        "seconds_fit": round(t_corr - t_fit, 3),
        "seconds_fwe": round(t_done - t_corr, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(outdir / "summary.json", summary)
    log.info(
        "%s: %d voxels significant (cluster-level FWE p < %s), %d (voxel-level); fit %.1f s, FWE %.1f s",
        method,
        summary["n_significant_cluster_fwe"],
        alpha,
        summary["n_significant_voxel_fwe"],
        summary["seconds_fit"],
        summary["seconds_fwe"],
    )
    return summary


def _clusters_table(z_sig_img: nib.Nifti1Image) -> Any:
    """nilearn's cluster table of a thresholded (0 = not significant) positive map.

    Computed cluster by cluster (:func:`nvmeta.meta.clusters.peaks_table`, nilearn's rows).
    """
    import pandas as pd

    from nvmeta.meta.clusters import peaks_table

    table = peaks_table(
        np.asarray(z_sig_img.dataobj), z_sig_img.affine, lambda signed: signed > 0, signs=(1.0,)
    )
    return table[_CLUSTER_COLUMNS] if len(table) else pd.DataFrame(columns=_CLUSTER_COLUMNS)


# ----------------------------------------------------------------------------------------
# IBMA vs CBMA
# ----------------------------------------------------------------------------------------

OVERLAP_COLUMNS = [
    "ibma_method",
    "cbma_method",
    "cbma_level",
    "sign",
    "n_ibma",
    "n_cbma",
    "n_both",
    "dice",
    "n_cbma_clusters",
    "n_matched_clusters",
    "peak_distance_median_mm",
    "peak_distance_max_mm",
]
CLUSTER_MATCH_COLUMNS = [
    "ibma_method",
    "cbma_method",
    "cbma_level",
    "cbma_cluster",
    "cbma_voxels",
    "cbma_x",
    "cbma_y",
    "cbma_z",
    "ibma_voxels",
    "ibma_peak_x",
    "ibma_peak_y",
    "ibma_peak_z",
    "n_both",
    "peak_distance_mm",
]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    # Face connectivity, as nilearn's cluster tables.
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))


def _peak_xyz(values: np.ndarray, labels: np.ndarray, k: int, affine: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(labels.ravel() == k)
    best = idx[np.argmax(values.ravel()[idx])]
    ijk = np.array(np.unravel_index(best, labels.shape), dtype=float)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _local_maxima(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Voxels of ``found`` not exceeded by any of their 26 neighbours (a boolean map)."""
    from scipy import ndimage

    v = np.where(found, values, -np.inf)
    return found & (v >= ndimage.maximum_filter(v, size=3, mode="constant", cval=-np.inf))


def overlap(
    ibma_dirs: dict[str, Path],
    cbma_dirs: dict[str, Path],
    mask_img: nib.Nifti1Image,
    cfg: dict,
    out_tsv: str | os.PathLike,
    out_clusters_tsv: str | os.PathLike,
    out_png: str | os.PathLike | None = None,
    log: logging.Logger | None = None,
) -> Any:
    """Compare every IBMA method's FDR map with every CBMA method's FWE maps.

    An IBMA voxel is "found" where ``meta/{method}/z_fdr.nii.gz`` is finite and of the sign
    ``cbma.sign`` (positive: ``> 0``); a CBMA voxel where NiMARE's cluster-level (by size)
    or voxel-level FWE p is below ``cbma.cluster_threshold``. Both are restricted to the
    template mask. Dice = ``2 |A ∩ B| / (|A| + |B|)`` (empty when both are empty).

    Clusters (face-connected) are matched CBMA -> IBMA: each CBMA cluster's match is the IBMA
    cluster sharing most voxels with it (none when it shares none). The peak distance is from
    the CBMA cluster's maximum z to the nearest local maximum of the IBMA (signed) z in the
    matched cluster (a voxel no 26-neighbour exceeds), in mm: IBMA clusters of many maps are
    often one large cluster spanning several regions, whose single maximum says nothing about
    a given CBMA cluster.

    Parameters
    ----------
    ibma_dirs, cbma_dirs : dict
        ``method -> results/analyses/{a}/meta/{method}/`` and ``-> .../cbma/{method}/``.
    mask_img : nibabel.Nifti1Image
        Template mask.
    cfg : dict
        The analysis' ``cbma`` block (``sign``, ``cluster_threshold``).
    out_tsv : path-like
        ``overlap.tsv``, columns :data:`OVERLAP_COLUMNS`, one row per (IBMA method, CBMA
        method, level).
    out_clusters_tsv : path-like
        One row per CBMA cluster and IBMA method (:data:`CLUSTER_MATCH_COLUMNS`).
    out_png : path-like, optional
        Figure: the first IBMA method's FDR map with each CBMA method's cluster-FWE outline.
    log : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    pandas.DataFrame
        The overlap table.
    """
    import pandas as pd

    from nvmeta.images.download import remove_stale_temps

    remove_stale_temps(*(p for p in (out_tsv, out_clusters_tsv, out_png) if p is not None))
    log = log or logger
    mask = np.asarray(mask_img.dataobj) > 0
    affine = mask_img.affine
    sgn = 1.0 if cfg["sign"] == "positive" else -1.0
    alpha = float(cfg["cluster_threshold"])

    ibma: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, d in ibma_dirs.items():
        z = np.asarray(nib.load(Path(d) / "z_fdr.nii.gz").dataobj, dtype=np.float64)
        z = np.nan_to_num(z, nan=0.0) * sgn
        ibma[name] = (z, (z > 0) & mask)
    cbma: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for name, d in cbma_dirs.items():
        z = np.nan_to_num(np.asarray(nib.load(Path(d) / "z.nii.gz").dataobj, dtype=np.float64), nan=0.0)
        for level, map_name in LEVEL_MAPS.items():
            logp = np.asarray(nib.load(Path(d) / f"{map_name}.nii.gz").dataobj)
            cbma[(name, level)] = (z, significant_mask(logp, alpha) & mask)

    rows, match_rows = [], []
    for iname, (iz, imask) in ibma.items():
        ilab, _ = _components(imask)
        imax = _local_maxima(iz, imask)
        for (cname, level), (cz, cmask) in cbma.items():
            n_i, n_c = int(imask.sum()), int(cmask.sum())
            n_both = int((imask & cmask).sum())
            dice = 2.0 * n_both / (n_i + n_c) if n_i + n_c else np.nan
            clab, n_cl = _components(cmask)
            dists = []
            for k in range(1, n_cl + 1):
                in_k = clab == k
                shared = ilab[in_k & (ilab > 0)]
                cxyz = _peak_xyz(cz, clab, k, affine)
                row = {
                    "ibma_method": iname,
                    "cbma_method": cname,
                    "cbma_level": level,
                    "cbma_cluster": k,
                    "cbma_voxels": int(in_k.sum()),
                    "cbma_x": cxyz[0],
                    "cbma_y": cxyz[1],
                    "cbma_z": cxyz[2],
                    "ibma_voxels": None,
                    "ibma_peak_x": None,
                    "ibma_peak_y": None,
                    "ibma_peak_z": None,
                    "n_both": int(shared.size),
                    "peak_distance_mm": None,
                }
                if shared.size:
                    best = int(np.bincount(shared).argmax())
                    cand = np.argwhere(imax & (ilab == best)).astype(float)
                    cand_xyz = cand @ affine[:3, :3].T + affine[:3, 3]
                    ixyz = cand_xyz[np.argmin(np.linalg.norm(cand_xyz - cxyz, axis=1))]
                    dist = float(np.linalg.norm(cxyz - ixyz))
                    dists.append(dist)
                    row.update(
                        ibma_voxels=int((ilab == best).sum()),
                        ibma_peak_x=ixyz[0],
                        ibma_peak_y=ixyz[1],
                        ibma_peak_z=ixyz[2],
                        peak_distance_mm=round(dist, 3),
                    )
                match_rows.append(row)
            rows.append(
                {
                    "ibma_method": iname,
                    "cbma_method": cname,
                    "cbma_level": level,
                    "sign": cfg["sign"],
                    "n_ibma": n_i,
                    "n_cbma": n_c,
                    "n_both": n_both,
                    "dice": dice,
                    "n_cbma_clusters": int(n_cl),
                    "n_matched_clusters": len(dists),
                    "peak_distance_median_mm": float(np.median(dists)) if dists else np.nan,
                    "peak_distance_max_mm": float(np.max(dists)) if dists else np.nan,
                }
            )
            log.info(
                "overlap %s vs %s (%s FWE): Dice %.3f (%d IBMA, %d CBMA, %d shared voxels), "
                "%d/%d CBMA clusters matched",
                iname,
                cname,
                level,
                dice,
                n_i,
                n_c,
                n_both,
                len(dists),
                n_cl,
            )
    table = pd.DataFrame(rows, columns=OVERLAP_COLUMNS)
    write_tsv(out_tsv, table)
    write_tsv(out_clusters_tsv, pd.DataFrame(match_rows, columns=CLUSTER_MATCH_COLUMNS))
    if out_png is not None:
        first = next(iter(ibma_dirs))
        with _frozen_gc():
            from nvmeta.figures.cbma_maps import plot_overlap

            plot_overlap(ibma_dirs[first], first, cbma_dirs, table, mask_img, alpha, sgn, Path(out_png))
    return table
