"""A methods paragraph for the paper, generated from the run, with the BibTeX of what it cites.

As NiMARE's boilerplate (``MetaResult.description_`` and ``bibtex_``), the text is written with LaTeX
citations (``\\citep{key}``) and the BibTeX comes from the keys it cites
(:func:`nvmeta.figures.citations.bibtex`). Every fact is read from the analysis' files (funnel,
QC table, each method's ``summary.json``, the CBMA and ICA summaries) or from the config the run used,
and the software versions from the environment that wrote it. :func:`write_methods` writes
``methods.html`` (the paragraph with author-year citations, then its LaTeX source) and
``references.bib``.
"""

from __future__ import annotations

import html
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from nvmeta.figures import facts
from nvmeta.figures.citations import CBMA_METHODS, IBMA_METHODS, REFS, bibtex, cite, short_cite
from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["SOFTWARE", "methods_text", "write_methods"]

_CSS = (
    "body { font-family: Georgia, serif; max-width: 48rem; margin: 1.5rem auto; padding: 0 1rem; "
    "line-height: 1.55; color: #0f172a; } pre { white-space: pre-wrap; font-size: .8rem; "
    "background: #f1f5f9; padding: .75rem; } h2 { font-size: 1.05rem; }"
)

#: Packages whose versions the paragraph gives (distribution names).
SOFTWARE = ("nvmeta", "snakemake", "nilearn", "nimare", "numpy", "scipy", "scikit-learn", "nibabel", "pandas")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _selection(spec: dict, nv: dict) -> str:
    """How the analysis selected its images, in words."""
    how = []
    if spec.get("collection_ids"):
        ids = ", ".join(str(i) for i in spec["collection_ids"])
        how.append(f"the images of collection{'s' * (len(spec['collection_ids']) != 1)} {ids}")
    if spec.get("image_ids"):
        how.append(f"{facts.plural(len(spec['image_ids']), 'image')} given by id")
    if not how:
        terms = {**(spec.get("image_terms") or {}), **(spec.get("collection_terms") or {})}
        text = "; ".join(f"{k} {v}" for k, v in terms.items()) or "no filter term"
        how.append(f"the images whose metadata matched the terms ({text})")
        if spec["default_terms"]:
            how[-1] += " and nilearn's default NeuroVault terms"
    if spec.get("max_images"):
        how.append(f"at most {spec['max_images']} images")
    src = nv.get("dump") or nv.get("url")
    return ", ".join(how) + f" (source: {src}, mode {nv.get('mode')})"


def _conversion(qc_tsv: str | os.PathLike, conversion: dict, template: str) -> str:
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", keep_default_na=False, dtype=str)
    inc = qc[qc["status"].str.strip() == "included"]
    t = inc[inc.get("df_source", pd.Series("", index=inc.index)).astype(str).str.strip() != ""]
    sources = t["df_source"].value_counts()
    n_z = len(inc) - len(t)

    def source(name: str) -> str:
        if name == str(conversion["df"]):
            return f"the rule {name} on the map's sample size"
        return {"statistic_parameters": "the map's own statistic_parameters"}.get(name, name)

    df = "; ".join(f"{source(s)} for {facts.plural(n, 'map')}" for s, n in sources.items())
    text = (
        f"{facts.plural(len(t), 'included T map')} were converted to z by matching tail probabilities, "
        f"computed in log space {cite(REFS['t_to_z'])}"
        + (f", with degrees of freedom from {df}" if len(t) else "")
        + (f"; {facts.plural(n_z, 'Z map')} were used as they were" if n_z else "")
        + f". Every map was resampled with linear interpolation onto the grid of the template mask ({template}) "
        f"{cite(REFS['template'])} with nilearn {cite(REFS['nilearn'])}; voxels without data stayed missing."
    )
    return text


def _qc(qc_cfg: dict, qc_tsv, funnel_tsv) -> str:
    rows = facts.funnel_rows(funnel_tsv)
    shown, n_other, k_other = facts.excluded_reasons(qc_tsv, top=1000)
    chain = ", ".join(f"{int(r['count']):,} {r['stage']}" for r in rows)
    text = (
        f"Maps were excluded when they covered less than {qc_cfg['min_coverage']:g} of the template mask, when "
        f"their maximum |z| was below {qc_cfg['min_max_abs_z']:g} or above {qc_cfg['max_abs_z']:g}, when their "
        f"sample size exceeded {qc_cfg['max_n']:g} or max |t| / √n exceeded {qc_cfg['max_t_per_sqrt_n']:g}, "
        f"or when they duplicated (or were a sign-flipped copy of) an earlier map (|r| > {qc_cfg['duplicate_r']:g}). "
        f"Images: {chain}."
    )
    if shown:
        text += " Exclusions: " + "; ".join(f"{r} ({n})" for r, n in shown) + "."
    return text


def _meta(methods: Sequence[str], summaries: Sequence[dict], meta_cfg: dict) -> str:
    first = summaries[0]
    k_min = first.get("min_maps_effective", meta_cfg["min_maps"])
    described = "; ".join(
        f"{IBMA_METHODS[m].sentence} {cite(*IBMA_METHODS[m].cites)}" if m in IBMA_METHODS else m
        for m in methods
    )
    text = (
        f"The {facts.plural(first.get('k_maps', 0), 'included map')} were combined voxel by voxel wherever at "
        f"least {k_min} had data, with {described}."
    )
    if meta_cfg["combine_within"] == "collection":
        text += " The maps of each collection were first combined into one unit."
    from nvmeta.meta.registry import get_estimator

    if any(get_estimator(m).needs == "effect" for m in methods):
        text += (
            f" The effect-size methods pooled each map's Hedges' g, computed from its t value and sample size "
            f"{cite('hedges1985statistical')}; heterogeneity is given as I² {cite(REFS['i2'])}, a fraction (0–1)"
            + (
                f"; the trimmed mean cut {meta_cfg['trim']:g} at each end"
                if "trimmed_mean" in methods
                else ""
            )
            + "."
        )
    sided = "two-sided" if meta_cfg["two_sided"] else "one-sided"
    text += (
        f" p-values ({sided}) were thresholded at a false discovery rate of q < {meta_cfg['alpha']:g} "
        f"{cite(REFS['fdr'])} and with Bonferroni correction {cite(REFS['bonferroni'])}"
    )
    if "permutation" in methods:
        text += (
            f"; the permutation test used {int(meta_cfg['n_perm']):,} sign flips (seed {meta_cfg['random_state']}) and "
            f"its max-statistic family-wise error p < {meta_cfg['alpha']:g}"
        )
    text += (
        f". Clusters are face-connected sets of at least {meta_cfg['min_cluster_voxels']} significant voxels "
        f"(nilearn's get_clusters_table). Results: "
        + "; ".join(
            f"{ln.title}: {ln.text.rstrip('.')}"
            for ln in (facts.method_line(m, s, None) for m, s in zip(methods, summaries, strict=True))
        )
        + "."
    )
    return text


def _cbma(cbma_methods: Sequence[str], summaries: Sequence[dict], cfg: dict) -> str:
    first = summaries[0]
    ests = "; ".join(
        f"{CBMA_METHODS[m].sentence} ({CBMA_METHODS[m].label}) {cite(*CBMA_METHODS[m].cites)}"
        if m in CBMA_METHODS
        else m
        for m in cbma_methods
    )
    return (
        f"For a coordinate-based comparison, peaks were extracted from each included map (local maxima of |z| ≥ "
        f"{cfg['peak_threshold']:g} in clusters of at least {cfg['min_cluster_voxels']} voxels, sub-peaks "
        f"{cfg['peak_distance']:g} mm apart, {cfg['sign']} peaks kept; one experiment per {cfg['study']}: "
        f"{facts.plural(first.get('n_experiments', 0), 'experiment')}, {facts.plural(first.get('n_foci', 0), 'focus', 'foci')}) "
        f"and analysed with {ests} in NiMARE {first.get('nimare_version', '')} {cite(REFS['nimare'])}. Significance: "
        f"cluster-level family-wise error by Monte-Carlo simulation ({int(cfg['n_iters']):,} iterations, cluster-forming "
        f"p < {cfg['voxel_thresh']:g}, FWE p < {cfg['cluster_threshold']:g}) {cite('eickhoff2012activation')}. Results: "
        + "; ".join(
            f"{CBMA_METHODS.get(m, m).label if m in CBMA_METHODS else m} {facts.plural(int(s.get('n_clusters', 0)), 'cluster')} "
            f"({int(s.get('n_significant_cluster_fwe', 0)):,} voxels)"
            for m, s in zip(cbma_methods, summaries, strict=True)
        )
        + "."
    )


def _ica(s: dict, cfg: dict) -> str:
    return (
        f"A spatial independent component analysis of the included maps, FastICA {cite(REFS['ica'])} in "
        f"scikit-learn {cite(REFS['sklearn'])} as in nilearn's cross-study example {cite(REFS['ica_brain'])}, "
        f"extracted {facts.plural(s.get('n_components', 0), 'component')} from {facts.plural(s.get('n_maps', 0), 'map')} "
        f"({facts.plural(s.get('n_voxels_used', 0), 'voxel')}; {facts.plural(int(cfg['n_runs']), 'run')} from seed "
        f"{cfg['random_state']}); each component is labelled with the terms of the images' metadata that load on it."
    )


def methods_text(
    analysis: str,
    inputs: Mapping[str, Any],
    config: dict,
    methods: Sequence[str] = (),
    cbma_methods: Sequence[str] = (),
) -> str:
    """The methods paragraph of one analysis, with ``\\citep{}`` citations (see the module docstring).

    Parameters
    ----------
    analysis : str
        Analysis name (its block of ``config["analyses"]``).
    inputs : mapping
        Paths by role: ``funnel``, ``qc``; ``summaries`` (one per method), ``cbma_summaries`` (one per
        CBMA method), ``ica_summary`` when the analysis has those blocks.
    config : dict
        The run's (validated) config.
    methods, cbma_methods : sequence of str
        The configured meta-analysis and CBMA methods.
    """
    spec = config["analyses"][analysis]
    paras = [
        f"Statistical maps were selected from NeuroVault {cite(REFS['neurovault'])}: {_selection(spec, config['neurovault'])}. "
        + _conversion(inputs["qc"], config["conversion"], str(config["template"]["mask"])),
        _qc(config["qc"], inputs["qc"], inputs["funnel"]),
    ]
    summaries = [facts.read_json(p) for p in inputs.get("summaries") or []]
    if methods and summaries:
        paras.append(_meta(methods, summaries, spec["meta"]))
    cbma = [facts.read_json(p) for p in inputs.get("cbma_summaries") or []]
    if cbma_methods and cbma:
        paras.append(_cbma(cbma_methods, cbma, spec["cbma"]))
    ica = facts.read_json(inputs.get("ica_summary"))
    if ica is not None:
        paras.append(_ica(ica, spec["ica"]))
    versions = ", ".join(f"{d} {v}" for d in SOFTWARE if (v := _version(d)))
    paras.append(
        f"The analysis was run by the nvmeta workflow in Snakemake {cite(REFS['snakemake'])} "
        f"(Python {platform.python_version()}; {versions})."
    )
    return "\n\n".join(paras)


def write_methods(out_html: str | os.PathLike, out_bib: str | os.PathLike, analysis: str, text: str,
                  logger: logging.Logger | None = None) -> list[str]:  # fmt: skip
    """Write ``methods.html`` (author-year citations, then the LaTeX source) and ``references.bib``.

    Returns
    -------
    list of str
        Cited keys without a BibTeX entry (none expected; logged as a warning).
    """
    log = logger or globals()["logger"]
    bib, missing = bibtex(text)
    for key in missing:
        log.warning("methods paragraph of %s cites %s, which has no BibTeX entry", analysis, key)
    readable = "".join(f"<p>{html.escape(short_cite(p))}</p>" for p in text.split("\n\n"))
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(analysis)}: methods</title><style>{_CSS}</style></head><body>"
        f"<h1>Methods: analysis {html.escape(analysis)}</h1>{readable}"
        "<h2>LaTeX source (cites the keys of references.bib)</h2>"
        f"<pre>{html.escape(text)}</pre></body></html>\n"
    )
    with atomic_path(Path(out_html)) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    with atomic_path(Path(out_bib)) as tmp:
        Path(tmp).write_text(bib, encoding="utf-8")
    log.info("methods paragraph of %s: %d references", analysis, bib.count("\n@") + bib.startswith("@"))
    return missing


def methods_job(
    analysis: str,
    inputs: Mapping[str, Any],
    config: dict,
    methods: Sequence[str],
    cbma_methods: Sequence[str],
    out_html: str | os.PathLike,
    out_bib: str | os.PathLike,
    logger: logging.Logger | None = None,
) -> str:
    """Rule ``methods``: :func:`methods_text` of the analysis, written by :func:`write_methods`; the text."""
    text = methods_text(analysis, inputs, config, methods, cbma_methods)
    write_methods(out_html, out_bib, analysis, text, logger=logger)
    return text
