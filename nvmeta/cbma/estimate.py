"""One NiMARE CBMA estimator with NiMARE's Monte-Carlo FWE correction on an analysis' peaks.

:func:`run_cbma` is the ``cbma`` rule: the peaks of one sign are grouped into experiments
(:func:`_experiments`, ``cbma.study``), fitted by the estimator :data:`ESTIMATORS` names, corrected by
``FWECorrector(method="montecarlo")``, and written as ``results/analyses/{a}/cbma/{method}/``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.cbma import _frozen_gc
from nvmeta.io import atomic_path, write_json, write_tsv
from nvmeta.workflow.quiet import Known, quiet

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_MAPS",
    "ESTIMATORS",
    "FWE_MAPS",
    "LEVEL_MAPS",
    "experiments_dataset",
    "run_cbma",
    "significant_mask",
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
    method : str
        A key of :data:`ESTIMATORS` (``ale`` takes its kernel width from each experiment's sample
        sizes).
    peaks_tsv : path-like
        ``results/analyses/{a}/cbma/peaks.tsv`` (:func:`nvmeta.cbma.peaks.peaks_table`).
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
    import pandas as pd

    from nvmeta.images.download import remove_stale_temps

    t0 = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = [f"{m}.nii.gz" for m in BASE_MAPS + FWE_MAPS] + ["clusters.tsv", "z.png", "summary.json"]
    remove_stale_temps(*(outdir / n for n in names))  # temporaries of a killed earlier attempt
    peaks = pd.read_csv(peaks_tsv, sep="\t")
    sign = str(cfg["sign"])
    exps, notes = _experiments_to_fit(method, peaks, cfg, log)
    n_maps_with_peaks = int(peaks.loc[peaks["sign"] == sign, "image_id"].nunique())
    est, imgs, seconds = _fit(method, exps, mask_img, cfg, n_cores, log)
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

    summary = _summary(method, cfg, exps, n_maps_with_peaks, n_cores, z, sig, table, notes)
    summary.update(
        seconds_fit=round(seconds[0], 3),
        seconds_fwe=round(seconds[1], 3),
        seconds=round(time.perf_counter() - t0, 3),
    )
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


def _experiments_to_fit(
    method: str, peaks: Any, cfg: dict, log: logging.Logger
) -> tuple[list[dict], list[str]]:
    """The experiments the estimator fits, and the warnings about them (also logged).

    ALE leaves out an experiment with a map without a sample size; no experiment at all is an error;
    fewer than ~17 experiments, or too few Monte-Carlo iterations for ``cluster_threshold``, a warning.
    """
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
    return exps, notes


def _fit(method, exps, mask_img, cfg, n_cores, log) -> tuple[Any, dict[str, Any], tuple[float, float]]:
    """Fit the estimator and correct it: (estimator, the maps of :data:`BASE_MAPS` and :data:`FWE_MAPS`,
    (seconds of the fit, seconds of the FWE correction))."""
    import nimare
    from nimare.correct import FWECorrector

    dset = experiments_dataset(exps, mask_img, with_sample_sizes=method == "ale")
    est = _estimator(method, cfg, n_cores)
    log.info(
        "%s: NiMARE %s on %d experiments, %d foci (%s peaks), n_iters=%d, n_cores=%d",
        method,
        type(est).__name__,
        len(exps),
        sum(len(e["x"]) for e in exps),
        cfg["sign"],
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
    return est, imgs, (t_corr - t_fit, t_done - t_corr)


def _summary(method, cfg, exps, n_maps_with_peaks, n_cores, z, sig, table, notes) -> dict[str, Any]:
    """``summary.json`` of one CBMA method (without its timings)."""
    import nimare
    import pandas as pd

    return {
        "method": method,
        "estimator": f"nimare.{ESTIMATORS[method][0].split('nimare.')[-1]}.{ESTIMATORS[method][1]}",
        "nimare_version": nimare.__version__,
        "study": cfg["study"],
        "sign": str(cfg["sign"]),
        "n_experiments": len(exps),
        "n_maps": n_maps_with_peaks,
        "n_foci": int(sum(len(e["x"]) for e in exps)),
        "n_iters": int(cfg["n_iters"]),
        "voxel_thresh": float(cfg["voxel_thresh"]),
        "cluster_threshold": float(cfg["cluster_threshold"]),
        "random_state": int(cfg["random_state"]),
        "n_cores": int(n_cores),
        "z_max": float(np.nanmax(z)),
        "n_significant_cluster_fwe": int(sig["cluster"].sum()),
        "n_significant_voxel_fwe": int(sig["voxel"].sum()),
        "n_clusters": int(pd.to_numeric(table["Cluster Size (mm3)"], errors="coerce").notna().sum())
        if len(table)
        else 0,
        "warnings": notes,
    }


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
