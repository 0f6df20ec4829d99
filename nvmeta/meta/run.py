"""One meta-analysis job: plan the units, fit the estimator, correct, write the outputs."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nvmeta.io import write_json, write_tsv
from nvmeta.meta import dependence, outputs, plausibility
from nvmeta.meta.correction import BonferroniCorrector, FDRCorrector, FWECorrector
from nvmeta.meta.effects import JACKKNIFE_MAX_UNITS, will_jackknife
from nvmeta.meta.registry import get_estimator
from nvmeta.meta.units import Source, effect_size_problem, mask_data, plan_units, read_included, resolved_n

logger = logging.getLogger(__name__)

#: Figure titles.
LABELS = {
    "stouffer": "Stouffer", "weighted_stouffer": "Weighted Stouffer", "fisher": "Fisher", "ttest": "t-test",
    "permutation": "Permutation t-test", "dersimonian_laird": "DerSimonian-Laird", "hedges": "Hedges RE",
    "fixed_effects_hedges": "Fixed-effects Hedges", "median": "Median g", "trimmed_mean": "Trimmed mean g",
}  # fmt: skip
#: A cluster larger than this fraction of the reported voxels is reported with a warning.
HUGE_CLUSTER_FRACTION = 0.25


def _complete(cfg: dict | None) -> dict:
    """The meta block with every key: a block from ``check_config`` already has them all; callers
    outside the workflow (benchmarks, notebooks) may pass a partial block, completed from the
    schema's defaults (:func:`nvmeta.workflow.config.defaults`, the one place they live)."""
    from nvmeta.workflow.config import defaults

    return {**defaults("meta"), **(cfg or {})}


def run_method(
    method: str,
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], Path],
    mask_img: Any,
    cfg: dict | None,
    outdir: str | os.PathLike,
    log: logging.Logger | None = None,
    *,
    n_jobs: int = 1,
    qc_json_for: Callable[[int], Path] | None = None,
    effect_paths_for: Callable[[int], tuple[Path, Path]] | None = None,
) -> dict:
    """Run one meta-analysis estimator over an analysis' included maps and write its outputs.

    Parameters
    ----------
    method : str
        A registered estimator (:data:`nvmeta.meta.registry.ESTIMATORS`).
    qc_tsv : path-like
        The analysis' ``qc.tsv``; rows with ``status == "included"`` are used, in file order.
    zmap_path_for : callable
        ``image_id -> Path`` of the image's template-grid z-map (float32, NaN = no data).
    mask_img : nibabel image or path-like
        Template mask; its grid is the grid of the z-maps and of the outputs.
    cfg : dict
        The analysis' ``meta`` config block.
    outdir : path-like
        ``results/analyses/{a}/meta/{method}/`` (created).
    log : logging.Logger, optional
        Defaults to this module's logger.
    n_jobs : int, default=1
        Threads of the job (``permutation``), recorded in ``summary.json``.
    qc_json_for : callable, optional
        ``image_id -> Path`` of the image's ``qc.json``, whose ``n`` is the image's resolved sample
        size (methods that weight by n). Default: ``qc.json`` next to the z-map.
    effect_paths_for : callable, optional
        ``image_id -> (g path, var(g) path)`` (effect-size methods). Default: ``g.nii.gz`` and
        ``varg.nii.gz`` next to the z-map.

    Returns
    -------
    dict
        The summary also written to ``summary.json``: method, k_maps, k_units, n_voxels_mask,
        n_voxels_reported, min_maps_effective, p_sided, n_significant_fdr / _bonferroni
        (/ _fwe), z_min, z_max, n_clusters, warnings, n_jobs, ...

    Raises
    ------
    ValueError
        Unknown method / bad config, or a map off the template grid.
    MemoryError
        ``permutation`` when its accumulator (:func:`~nvmeta.meta.budget.permutation_memory_bytes`)
        would not fit in memory.
    """
    t0 = time.perf_counter()
    log = log or logger
    est_cls = get_estimator(method)
    cfg = _complete(cfg)
    dependence.check(method, cfg)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    outputs.sweep(outdir)
    mask_img, mask = mask_data(mask_img)
    if qc_json_for is None:
        qc_json_for = lambda i: Path(zmap_path_for(i)).with_name("qc.json")  # noqa: E731
    if effect_paths_for is None:
        effect_paths_for = lambda i: (  # noqa: E731
            Path(zmap_path_for(i)).with_name("g.nii.gz"),
            Path(zmap_path_for(i)).with_name("varg.nii.gz"),
        )

    estimator = est_cls(cfg, n_jobs=n_jobs, log=log, workdir=outdir)
    try:
        return _run(estimator, method, qc_tsv, zmap_path_for, qc_json_for, effect_paths_for,
                    mask_img, mask, cfg, outdir, log, n_jobs, t0)  # fmt: skip
    finally:
        estimator.close()


def _run(estimator, method, qc_tsv, zmap_path_for, qc_json_for, effect_paths_for, mask_img, mask, cfg,
         outdir, log, n_jobs, t0) -> dict:  # fmt: skip
    est_cls = type(estimator)
    affine = mask_img.affine
    n_vox = int(mask.sum())
    alpha = float(cfg["alpha"])
    two_sided = bool(cfg["two_sided"])
    plan, k_min, notes = _plan(est_cls, method, qc_tsv, qc_json_for, cfg, n_vox, log)
    n_units = len(plan.units)
    source = Source(plan, zmap_path_for, mask_img, mask, effect_paths_for)
    fit = estimator.fit(source, k_min)
    notes += fit.notes
    reported, k = fit.reported, fit.k

    t_est = time.perf_counter() - t0
    z, logp, p, q, (sig_fdr, sig_bonf), (z_fdr, z_bonf) = _corrected(fit, alpha, two_sided)
    n_rep = int(reported.sum())
    if n_rep == 0:
        msg = f"{method}: no voxel has data in at least {k_min} maps"
        notes.append(msg)
        log.warning(msg)

    def save(values, name, **kw):
        outputs.save_img(outputs.to_img(values, mask, affine, **kw), outdir / f"{name}.nii.gz")

    save(z, "z")
    # p as float64 (float32 flushes p < 1.2e-38 to 0 and loses precision from 1e-38 down), and
    # -log10 p (float32) as NiMARE's "logp" map: finite wherever p is, even far beyond float64.
    save(p, "p", dtype=np.float64)
    save(-logp / math.log(10.0), "logp")
    save(k, "k", fill=0, dtype=np.int16 if n_units < 32000 else np.int32)
    for name, values in (("q", q), ("z_fdr", z_fdr), ("z_bonf", z_bonf)):
        save(values, name)
    for name, values in fit.maps.items():
        save(np.where(reported, values, np.nan), name)

    def tabulate(zthr: np.ndarray, label: str, name: str):
        return _tabulate(zthr, label, outdir / name, method, mask, affine, cfg, n_rep, notes, log)

    q_txt = f"q < {alpha:g}"
    table, z_fdr_clusters = tabulate(z_fdr, f"FDR {q_txt}", "clusters.tsv")
    table_bonf, _ = tabulate(z_bonf, f"Bonferroni p < {alpha:g}/{n_rep}", "clusters_bonf.tsv")

    summary = _summary(method, plan, cfg, k_min, n_vox, z, (sig_fdr, sig_bonf), (table, table_bonf), notes,
                       n_jobs)  # fmt: skip
    summary.update(fit.summary)
    summary["plausibility"] = check = plausibility.check(method, z, k, reported, source.evidence_bound(k),
                                                         two_sided)  # fmt: skip
    if check["message"]:  # a z no k maps could give: a warning, and the overview does not headline it
        notes.append(check["message"])
        log.warning(check["message"])
    # The mosaic shows what survives the method's correction (FDR; permutation: its FWE map)
    shown, corr = z_fdr, f"FDR {q_txt}"
    if fit.p_fwe is not None:
        shown, corr = _fwe(fit, z, alpha, two_sided, save, tabulate, summary)

    _jackknife(estimator, z, z_fdr_clusters, plan, mask, affine, cfg, outdir, summary, log)
    _figures(
        method, fit, plan, shown, corr, mask, affine, cfg, outdir, est_cls.needs == "effect", (k_min, n_rep)
    )
    summary["seconds_estimation"] = round(t_est, 3)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(outdir / "summary.json", summary)
    log.info(f"{method}: {n_rep} voxels reported, {int(sig_fdr.sum())} FDR-significant, "
             f"{int(sig_bonf.sum())} Bonferroni-significant")  # fmt: skip
    return summary


def _plan(est_cls, method, qc_tsv, qc_json_for, cfg, n_vox, log):
    """``(plan, k_min, notes)``: the units the estimator reads, the fewest units a voxel needs and
    the warnings so far (which ``summary.json`` lists)."""
    plan = plan_units(
        read_included(qc_tsv),
        str(cfg["combine_within"]),
        lambda i: resolved_n(qc_json_for(i)),
        needs_n=est_cls.needs_n,
        # an image whose g was not computed (n < 4, no df) has all-NaN effect maps: not a unit
        problem_for=(lambda i: effect_size_problem(qc_json_for(i))) if est_cls.needs == "effect" else None,
        method=method,
        combine_label=est_cls.combine_label,
        log=log,
        dependence=str(cfg["dependence"]),
    )
    n_units = len(plan.units)
    notes = list(plan.warnings)
    k_min = max(int(cfg["min_maps"]), int(math.ceil(float(cfg["min_fraction"]) * n_units - 1e-9)), 1)
    k_min = max(k_min, est_cls.min_k)
    log.info(f"{method}: {plan.n_maps} maps in {n_units} units, {n_vox} mask voxels, k_min={k_min}")
    if n_units < k_min:
        # Not an error: every image of an analysis can be excluded by QC. The outputs exist and
        # say "nothing reported" (NaN maps, empty tables), and the reason is in summary.json.
        msg = f"{method}: only {n_units} usable map(s), fewer than the {k_min} required: nothing reported"
        notes.append(msg)
        log.warning(msg)
    return plan, k_min, notes


def _corrected(fit, alpha: float, two_sided: bool):
    """The reported z, log p and p, FDR's q, the FDR and Bonferroni significance and their
    thresholded z maps (0 where not significant, NaN where not reported)."""
    reported = fit.reported
    z = np.where(reported, fit.z, np.nan)
    logp = np.where(reported, fit.logp, np.nan)
    p = np.exp(logp)
    fdr = FDRCorrector(alpha, two_sided).transform(z, p, reported)
    bonf = BonferroniCorrector(alpha, two_sided).transform(z, p, reported)
    sig_fdr, sig_bonf = fdr.significant, bonf.significant
    z_fdr = np.where(reported, np.where(sig_fdr, z, 0.0), np.nan)
    z_bonf = np.where(reported, np.where(sig_bonf, z, 0.0), np.nan)
    return z, logp, p, fdr.q, (sig_fdr, sig_bonf), (z_fdr, z_bonf)


def _fwe(fit, z, alpha: float, two_sided: bool, save, tabulate, summary: dict) -> tuple[np.ndarray, str]:
    """p_fwe, z_fwe and clusters_fwe.tsv of a method with FWE p-values (permutation), their counts
    in ``summary``; returns the FWE map and its label for the mosaic."""
    reported = fit.reported
    p_fwe = np.where(reported, fit.p_fwe, np.nan)
    sig_fwe = FWECorrector(alpha, two_sided).transform(z, p_fwe, reported).significant
    z_fwe = np.where(reported, np.where(sig_fwe, z, 0.0), np.nan)
    save(p_fwe, "p_fwe")
    save(z_fwe, "z_fwe")
    table_fwe, _ = tabulate(z_fwe, f"FWE p < {alpha:g} (permutation)", "clusters_fwe.tsv")
    summary["n_significant_fwe"] = int(sig_fwe.sum())
    summary["n_clusters_fwe"] = outputs.n_clusters(table_fwe)
    return z_fwe, f"FWE p < {alpha:g}"


def _summary(method, plan, cfg, k_min, n_vox, z, significant, tables, notes, n_jobs):
    """The first entries of ``summary.json`` (``warnings`` is ``notes`` itself: later notes join it)."""
    (sig_fdr, sig_bonf), (table, table_bonf) = significant, tables
    n_rep = int(np.isfinite(z).sum())
    summary: dict[str, Any] = {
        "method": method,
        "k_maps": plan.n_maps,
        "k_units": len(plan.units),
        "combine_within": str(cfg["combine_within"]),
        "min_maps_effective": k_min,
        "n_voxels_mask": n_vox,
        "n_voxels_reported": n_rep,
        "alpha": float(cfg["alpha"]),
        "p_sided": "two-sided" if cfg["two_sided"] else "one-sided (upper tail)",
        "n_significant_fdr": int(sig_fdr.sum()),
        "n_significant_bonferroni": int(sig_bonf.sum()),
        "z_min": float(np.nanmin(z)) if n_rep else None,
        "z_max": float(np.nanmax(z)) if n_rep else None,
        "n_clusters_fdr": outputs.n_clusters(table),
        "n_clusters_bonferroni": outputs.n_clusters(table_bonf),
        "warnings": notes,
        "fdr_min_abs_z": float(np.min(np.abs(z[sig_fdr]))) if sig_fdr.any() else None,
        "n_jobs": int(n_jobs),
        "cluster_threshold_z": cfg["cluster_threshold_z"],
        "cluster_connectivity": outputs.CONNECTIVITY,
    }
    return summary


def _tabulate(zthr, label, path, method, mask, affine, cfg, n_rep, notes, log):
    """Cluster table of a thresholded map (stricter with meta.cluster_threshold_z), written to
    ``path``; a warning in ``notes`` when one cluster is most of the reported voxels."""
    czt = cfg["cluster_threshold_z"]
    if czt is not None:
        zthr = np.where(
            np.abs(np.nan_to_num(zthr)) >= float(czt), zthr, np.where(np.isnan(zthr), np.nan, 0.0)
        )
        forming = f"{label} and |z| >= {float(czt):g} (meta.cluster_threshold_z)"
    else:
        nz = np.abs(zthr[np.nan_to_num(zthr) != 0])
        forming = f"{label} (|z| >= {float(nz.min()):.3f})" if nz.size else label
    with outputs.frozen_gc():
        table = outputs.clusters_table(outputs.to_img(zthr, mask, affine), bool(cfg["two_sided"]),
                                       cfg["min_cluster_voxels"], forming)  # fmt: skip
    write_tsv(path, table)
    sizes = pd.to_numeric(table["Cluster Size (voxels)"], errors="coerce") if len(table) else None
    if sizes is not None and n_rep and sizes.max() > HUGE_CLUSTER_FRACTION * n_rep:
        msg = (
            f"{method}: {path.name} has a cluster of {int(sizes.max())} voxels, "
            f"{100 * sizes.max() / n_rep:.0f}% of the reported voxels ({label}): it says little about where "
            "the effect is; set meta.cluster_threshold_z (e.g. 5) for a stricter cluster-forming threshold"
        )
        notes.append(msg)
        log.warning(msg)
    return table, zthr


def _figures(method, fit, plan, shown, corr, mask, affine, cfg, outdir, effect: bool, counts) -> None:
    """est.png (effect-size methods: pooled g and I²) and z.png (the corrected z map ``shown``);
    ``counts`` = (k_min, voxels reported) say why a figure is empty."""
    label = LABELS.get(method, method)
    k_min, n_rep = counts
    if effect:
        with outputs.frozen_gc():
            outputs.plot_effect(
                outputs.to_img(np.where(fit.reported, fit.maps["est"], np.nan), mask, affine),
                outputs.to_img(np.where(fit.reported, fit.maps["I2"], np.nan), mask, affine),
                outdir / "est.png",
                cfg,
                f"{label}: pooled Hedges' g (unthresholded), {plan.n_maps} map{'s' * (plan.n_maps != 1)}",
            )
    n_units = len(plan.units)
    title = outputs.z_title(label, plan.n_maps, n_units, corr, float(cfg["threshold"]))
    if n_units < k_min:
        empty = f"not computed: {n_units} usable map{'s' * (n_units != 1)} (at least {k_min} needed)"
    elif n_rep == 0:
        empty = f"not computed: no voxel has data in at least {k_min} maps"
    else:
        empty = f"no voxel survives {corr} with |z| > {float(cfg['threshold']):g}"
    with outputs.frozen_gc():
        outputs.plot_z(outputs.to_img(shown, mask, affine), outdir / "z.png", cfg, title, empty_note=empty)


def _jackknife(estimator, z, z_fdr, plan, mask, affine, cfg, outdir, summary, log) -> None:
    """jackknife.tsv: leave-one-out per FDR cluster (every method)."""
    columns = ["cluster", "peak_x", "peak_y", "peak_z", "size_voxels", "unit", "image_ids", "collection_id",
               "z_mean_without", "share"]  # fmt: skip
    rows: list[dict] = []
    n_units = len(plan.units)
    if not cfg["jackknife"]:
        summary["jackknife"] = "off (meta.jackknife: false)"
    elif not will_jackknife(cfg, n_units):  # the effect methods keep their stack by this test
        msg = f"{estimator.name}: jackknife skipped ({n_units} units > {JACKKNIFE_MAX_UNITS})"
        summary["warnings"].append(msg)
        summary["jackknife"] = msg
        log.warning(msg)
    else:
        labels, info = outputs.cluster_labels(z_fdr, mask, affine, int(cfg["min_cluster_voxels"]))
        for row in estimator.jackknife(labels, z, plan, plan.collections):
            c = info[row["cluster"]]
            rows.append(
                {**row, "peak_x": c["x"], "peak_y": c["y"], "peak_z": c["z"], "size_voxels": c["size"]}
            )
        summary["jackknife"] = f"{len(info)} cluster(s) x {n_units} units"
    write_tsv(outdir / "jackknife.tsv", pd.DataFrame(rows, columns=columns))
