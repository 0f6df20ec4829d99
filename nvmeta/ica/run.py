"""The ICA job: an analysis' included z-maps in, components, mixing, term labels and summary out.

:func:`run_ica` reads the included maps into the on-disk data matrix (:mod:`nvmeta.ica.matrix`),
decomposes it (:mod:`nvmeta.ica.fastica`), fails on an unconverged FastICA run unless
``ica.allow_unconverged``, labels the components (:mod:`nvmeta.ica.terms`, or decoding against the task
atlas) and writes every output atomically. The component figures are jobs of their own
(:mod:`nvmeta.figures.ica_maps`), drawn from ``components.nii.gz`` and the titles and thresholds that
``summary.json`` records here.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.ica.fastica import Decomposition, decompose
from nvmeta.ica.matrix import build_matrix, iter_masked_maps, mask_and_affine, select_voxels

__all__ = ["FIGURE_PERCENTILE", "OUTPUT_NAMES", "TMP_PREFIX", "NotConverged", "remove_stale_temps", "run_ica"]

logger = logging.getLogger(__name__)

#: Prefix of the job's temporary directory (the memory-mapped data matrix) inside its output directory.
TMP_PREFIX = ".ica_tmp_"

#: What the ICA job writes into its output directory.
OUTPUT_NAMES = ("components.nii.gz", "mixing.tsv", "terms.tsv", "summary.json", "stability.tsv")

#: A component figure shows the voxels above this percentile of the component's absolute values.
FIGURE_PERCENTILE = 90.0


class NotConverged(RuntimeError):
    """FastICA stopped at ``max_iter`` before reaching ``tol`` (and ``allow_unconverged`` is false)."""


def remove_stale_temps(outdir: str | os.PathLike) -> list[Path]:
    """Remove what a killed ICA job left in its own output directory.

    Only this job's temporaries: directories named ``.ica_tmp_XXXXXXXX`` (:data:`TMP_PREFIX` plus
    :func:`tempfile.mkdtemp`'s 8 characters; the memory-mapped data matrix) and the atomic-write
    temporaries of its own outputs (:data:`OUTPUT_NAMES`, :func:`nvmeta.images.download.remove_stale_temps`).
    Nothing else in the directory is touched (the component figures' jobs sweep their own).

    Returns
    -------
    list of Path
        What was removed.
    """
    from nvmeta.images.download import remove_stale_temps as remove_output_temps

    outdir = Path(outdir)
    removed: list[Path] = []
    rx = re.compile(re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{8}")
    if outdir.is_dir():
        for entry in outdir.iterdir():
            if entry.is_dir() and not entry.is_symlink() and rx.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    removed += remove_output_temps(*(outdir / name for name in OUTPUT_NAMES))
    return removed


def _included_ids(qc_tsv: str | os.PathLike, n_components: int) -> list[int]:
    """Image ids of the rows of ``qc.tsv`` whose status is "included", in file order; enough of them."""
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    if "image_id" not in qc.columns or "status" not in qc.columns:
        raise ValueError(f"{qc_tsv}: needs image_id and status columns")
    rows = qc[qc["status"].astype(str).str.strip() == "included"]
    ids = [int(i) for i in rows["image_id"]]
    if len(ids) < 2:
        raise ValueError(f"ICA needs at least 2 included maps; {qc_tsv} has {len(ids)}")
    if len(ids) < n_components:
        raise ValueError(
            f"ICA: n_components={n_components} is more than the {len(ids)} included maps; lower ica.n_components"
        )
    return ids


@dataclass
class _Fit:
    """The decomposition of the included maps and what it used."""

    dec: Decomposition
    columns: np.ndarray
    n_mask: int
    n_used: int
    warnings: list[str]


def _fit(
    image_ids: list[int],
    zmap_path_for: Callable[[int], Path],
    mask: np.ndarray,
    affine: np.ndarray,
    cfg: dict,
    tmpdir: Path,
    threads: int,
    log: logging.Logger,
) -> _Fit:
    """Build the data matrix in ``tmpdir``, select its voxels and decompose it, on ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    n_maps, n_mask = len(image_ids), int(mask.sum())
    warn: list[str] = []
    # the BLAS libraries are loaded (run_ica) before threadpool_limits: a library first loaded inside it
    # would run unlimited in that first call only, and the first run's bits would differ from later ones
    with threadpool_limits(limits=threads):
        matrix = build_matrix(
            iter_masked_maps([zmap_path_for(i) for i in image_ids], mask, threads, affine),
            n_maps,
            n_mask,
            tmpdir / "data.f32",
            standardize=bool(cfg["standardize"]),
            labels=image_ids,
        )
        warn += matrix.problems
        empty = [image_ids[i] for i in np.flatnonzero(matrix.n_finite == 0)]
        if empty:
            warn.append(f"{len(empty)} maps have no data in the mask: {empty[:10]}")
        columns = select_voxels(matrix.count, n_maps, str(cfg["nodata"]), float(cfg["min_fraction"]))
        n_used = int(columns.sum())
        log.info("ICA: %d of %d mask voxels used (nodata=%s)", n_used, n_mask, cfg["nodata"])
        if n_used < int(cfg["n_components"]):
            raise ValueError(
                f"ICA: only {n_used} voxels have data in enough maps (nodata={cfg['nodata']!r}, "
                f"min_fraction={cfg['min_fraction']}); need at least n_components={cfg['n_components']}"
            )
        dec = decompose(matrix, columns, cfg, logger=log)
    return _Fit(dec, columns, n_mask, n_used, warn)


def _check_convergence(info: dict, cfg: dict, log: logging.Logger) -> str | None:
    """Raise :class:`NotConverged` when a FastICA run stopped at ``max_iter``; the warning text if allowed."""
    converged = info["converged"]
    if all(converged):
        return None
    bad = [i + 1 for i, ok in enumerate(converged) if not ok]
    what = (
        f"FastICA did not converge in {len(bad)} of {len(converged)} runs (run {', '.join(map(str, bad))}: "
        f"stopped at ica.max_iter={cfg['max_iter']} iterations with the unmixing matrix still changing by "
        f"more than ica.tol={cfg['tol']:g}); its components depend on the thread count and on rounding"
    )
    if cfg["allow_unconverged"]:
        msg = f"{what} (kept because ica.allow_unconverged is true)"
        log.warning("ICA: %s", msg)
        return msg
    msg = (
        f"{what}. Raise ica.max_iter, or loosen ica.tol, or lower ica.n_components; "
        "or set ica.allow_unconverged: true to keep unconverged components with a warning"
    )
    log.error("ICA: %s", msg)
    raise NotConverged(msg)


def _unmask(values: np.ndarray, mask: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Components (k x selected voxels) to a float32 (X, Y, Z, k) volume, NaN outside the voxels used."""
    k = values.shape[0]
    out = np.full(mask.shape + (k,), np.nan, dtype=np.float32)
    full = np.full((int(mask.sum()), k), np.nan, dtype=np.float32)
    full[columns] = values.T
    out[mask] = full
    return out


def _write_maps(
    volume: np.ndarray, affine: np.ndarray, mixing: np.ndarray, image_ids: list[int], outdir: Path
):
    """``components.nii.gz`` (float32, template grid) and ``mixing.tsv`` (one row per map, one column per IC)."""
    import nibabel as nib
    import pandas as pd

    from nvmeta.io import atomic_path, write_tsv

    img = nib.Nifti1Image(volume, affine)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    with atomic_path(outdir / "components.nii.gz") as tmp:
        nib.save(img, tmp)
    table = pd.DataFrame(mixing, columns=[f"IC{k}" for k in range(mixing.shape[1])])
    table.insert(0, "image_id", image_ids)
    write_tsv(outdir / "mixing.tsv", table)


@dataclass
class _Labels:
    """Each component's top terms, where they came from, and what the labelling had to say."""

    tops: list[list[tuple[str, float]]]
    sources: list[str]
    weights: Any  # nvmeta.ica.terms.TermWeights
    warnings: list[str]


def _label(
    image_ids: list[int],
    mixing: np.ndarray,
    volume: np.ndarray,
    metadata_path_for: Callable[[int], Path],
    cfg: dict,
    client_factory: Callable[[], Any] | None,
    neurosynth_cache_for: Callable[[int], Path] | None,
    labeler: Callable[[np.ndarray], Any] | None,
    log: logging.Logger,
) -> _Labels:
    """Term labels of the components (image texts, or decoding when a ``labeler`` is given)."""
    from nvmeta.ica import terms as termlib

    tw = termlib.image_term_weights(
        image_ids, metadata_path_for, cfg, client_factory, neurosynth_cache_for, logger=log
    )
    loadings = termlib.component_term_loadings(mixing, tw.matrix)
    tops = termlib.top_terms(loadings, tw.vocabulary, int(cfg["n_terms"]))
    tops, sources, decoded_note = termlib.decoded_labels(tops, labeler, volume)
    warn = [decoded_note] if decoded_note else []
    warn += tw.warnings
    if tw.fallback:
        warn.append(tw.fallback)
    same = termlib.indistinct_labels(tops)
    if same:
        warn.append(same)
    return _Labels(tops, sources, tw, warn)


def _write_terms(labels: _Labels, path: Path) -> None:
    """``terms.tsv``: component, rank, term, weight (r for decoded labels)."""
    import pandas as pd

    from nvmeta.io import write_tsv

    rows = [
        {"component": k, "rank": rank + 1, "term": term, "weight": weight}
        for k, picked in enumerate(labels.tops)
        for rank, (term, weight) in enumerate(picked)
    ]
    write_tsv(path, pd.DataFrame(rows, columns=["component", "rank", "term", "weight"]))


def _titles(labels: _Labels) -> list[str]:
    """Each component's figure title: its terms (with r when they come from decoding)."""
    titles = []
    for k, picked in enumerate(labels.tops):
        shown = [f"{t} (r={w:.2f})" if labels.sources[k] == "atlas" else t for t, w in picked]
        titles.append(f"IC{k}: " + ", ".join(shown) if picked else f"IC{k} (no term loads positively)")
    return titles


def _write_stability(dec: Decomposition, n_runs: int, path: Path) -> None:
    """``stability.tsv``: each component's mean and min matched |r| with the reruns; empty with one run."""
    import pandas as pd

    from nvmeta.io import write_tsv

    k_out = dec.components.shape[0]
    stab = dec.stability
    table = pd.DataFrame(
        {
            "component": np.arange(k_out),
            "mean_abs_corr": stab.mean(axis=1) if stab is not None else np.full(k_out, np.nan),
            "min_abs_corr": stab.min(axis=1) if stab is not None else np.full(k_out, np.nan),
            "n_runs": n_runs,
        }
    )
    write_tsv(path, table)


def _summary(fit: _Fit, labels: _Labels, image_ids: list[int], cfg: dict, warn: list[str]) -> dict[str, Any]:
    """The content of ``summary.json``."""
    dec, tw = fit.dec, labels.weights
    summary: dict[str, Any] = {
        "n_maps": len(image_ids),
        "n_mask_voxels": fit.n_mask,
        "n_voxels_used": fit.n_used,
        "n_components": dec.components.shape[0],
        "random_state": int(cfg["random_state"]),
        "nodata": str(cfg["nodata"]),
        "min_fraction": float(cfg["min_fraction"]),
        "standardize": bool(cfg["standardize"]),
        "reduced": dec.reduced,
        "pca": dec.info.get("pca"),
        "max_iter": int(cfg["max_iter"]),
        "tol": float(cfg["tol"]),
        "n_iter": dec.info["n_iter"],
        "converged": dec.info["converged"],
        "allow_unconverged": bool(cfg["allow_unconverged"]),
        "n_runs": int(cfg["n_runs"]),
        "term_source_requested": tw.requested,
        "term_source": tw.source,
        "term_fallback": tw.fallback,
        "label_sources": labels.sources,
        "n_vocabulary": int(len(tw.vocabulary)),
        "neurosynth": tw.info or None,
        "titles": _titles(labels),
        # the components have unit variance over the voxels used: the figures show the largest |values|
        "figure_thresholds": [float(np.percentile(np.abs(c), FIGURE_PERCENTILE)) for c in dec.components],
        "warnings": warn,
    }
    if dec.stability is not None:
        summary["stability_mean_abs_corr"] = [float(x) for x in dec.stability.mean(axis=1)]
    return summary


def run_ica(
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], Path],
    metadata_path_for: Callable[[int], Path],
    mask_img: Any,
    cfg: dict,
    outdir: str | os.PathLike,
    logger: logging.Logger | None = None,
    client_factory: Callable[[], Any] | None = None,
    threads: int = 1,
    neurosynth_cache_for: Callable[[int], Path] | None = None,
    labeler: Callable[[np.ndarray], list[list[tuple[str, float]]] | None] | None = None,
) -> dict:
    """Cross-study ICA of an analysis' included z-maps, with term labels; writes every output into ``outdir``.

    Outputs: ``components.nii.gz`` (4-D, template grid, float32, NaN outside the voxels used),
    ``mixing.tsv``, ``terms.tsv``, ``stability.tsv`` (correlations empty with ``n_runs: 1``) and
    ``summary.json`` (with each component figure's title and threshold). The same inputs and config give
    byte-identical outputs (fixed seeds, deterministic block order, float32 writes, deterministic gzip),
    given the same BLAS; a converged run gives the same components whatever the thread count.

    Parameters
    ----------
    qc_tsv : path-like
        ``results/analyses/{a}/qc.tsv``; rows with ``status == "included"`` are used, in file order.
    zmap_path_for : callable
        ``image_id -> Path`` of the template-grid z-map.
    metadata_path_for : callable
        ``image_id -> Path`` of ``metadata.json`` (term labels).
    mask_img : nibabel image or path-like
        Template mask; its grid is the z-maps' and the outputs' grid.
    cfg : dict
        The analysis' validated ``ica`` block, every key present (``{**nvmeta.workflow.config.defaults("ica"), ...}``).
    outdir : path-like
        ``results/analyses/{a}/ica/``.
    logger : logging.Logger, optional
        Defaults to this module's logger.
    client_factory : callable, optional
        ``() -> client`` with ``get_json_url`` (``lambda: nvmeta.neurovault.make_client(config["neurovault"])``);
        only used with ``terms: neurosynth``.
    threads : int
        Reader threads and BLAS threads.
    neurosynth_cache_for : callable, optional
        ``image_id -> Path`` of the per-image Neurosynth cache (default: ``neurosynth.json`` next to the
        image's ``metadata.json``).
    labeler : callable, optional
        ``components volume (X, Y, Z, k) -> [[(term, r), ...] per component]`` or None: labels from
        decoding against the task atlas (:func:`nvmeta.decode.decoding.top_labels`). A component it
        gives no term keeps its image-text label; None (no decodable term) keeps them all.

    Returns
    -------
    dict
        The content written to ``summary.json``.

    Raises
    ------
    ValueError
        Fewer than 2 included maps, or fewer maps / voxels than ``n_components`` (the outputs would not be
        meaningful).
    NotConverged
        A FastICA run stopped at ``ica.max_iter`` and ``ica.allow_unconverged`` is false (nothing is
        written).
    """
    # loaded before threadpool_limits (see _fit)
    import scipy.linalg  # noqa: F401
    import sklearn.decomposition  # noqa: F401

    from nvmeta.io import write_json

    log = logger if logger is not None else logging.getLogger(__name__)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temps(outdir):
        log.info("ICA: removed a stale temporary of an earlier, killed run: %s", path)
    image_ids = _included_ids(qc_tsv, int(cfg["n_components"]))
    log.info("ICA: %d included maps", len(image_ids))
    mask, affine = mask_and_affine(mask_img)
    tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=outdir))
    try:
        fit = _fit(image_ids, zmap_path_for, mask, affine, cfg, tmpdir, max(1, int(threads)), log)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    warn = list(fit.warnings)
    unconverged = _check_convergence(fit.dec.info, cfg, log)
    if unconverged:
        warn.append(unconverged)
    warn += fit.dec.info["warnings"]
    volume = _unmask(fit.dec.components, mask, fit.columns)
    _write_maps(volume, affine, fit.dec.mixing, image_ids, outdir)
    labels = _label(
        image_ids, fit.dec.mixing, volume, metadata_path_for, cfg, client_factory, neurosynth_cache_for,
        labeler, log,
    )  # fmt: skip
    _write_terms(labels, outdir / "terms.tsv")
    warn += labels.warnings
    summary = _summary(fit, labels, image_ids, cfg, warn)
    _write_stability(fit.dec, int(cfg["n_runs"]), outdir / "stability.tsv")
    for msg in warn:
        if msg is not unconverged:  # already logged
            log.warning("ICA warning: %s", msg)
    write_json(outdir / "summary.json", _jsonable(summary))
    log.info("ICA: done (%d components; terms from %s)", summary["n_components"], labels.weights.source)
    return summary


def _jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
