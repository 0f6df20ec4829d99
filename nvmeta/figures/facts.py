"""What an analysis found, one line each, read from the files the run wrote (nothing recomputed).

The overview page, the report's landing page and the methods paragraph all state results through
these functions, from the analysis' ``funnel.tsv``, ``qc.tsv``, each method's ``summary.json`` and
thresholded map, the CBMA summaries and ``overlap.tsv``, the ICA ``summary.json``, ``terms.tsv`` and
``stability.tsv``. A method whose ``summary.json`` says its result failed the plausibility check
(``plausibility.peak_ok`` false) is never headlined with a count or a peak: the line says so instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nvmeta.figures.citations import CBMA_METHODS, IBMA_METHODS

__all__ = [
    "Line",
    "cbma_line",
    "effects_line",
    "excluded_reasons",
    "funnel_line",
    "group_warnings",
    "ica_line",
    "inputs_line",
    "method_line",
    "overlap_line",
    "peak_of",
]


@dataclass
class Line:
    """One line of the overview: a title, a plain-text result, its figures, and whether to worry."""

    title: str
    text: str
    figures: list[tuple[Path, str]] = field(default_factory=list)
    status: str = "ok"  # "ok", "none" (nothing to report), "warn", "fail" (implausible: not headlined)
    kind: str = "section"  # "method" for a meta-analysis method's line
    section: str = ""  # the report's subcategory that holds the figures in full


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 map"``, ``"2 maps"`` (thousands separated)."""
    return f"{int(n):,} {word if int(n) == 1 else (many or word + 's')}"


def label(method: str) -> str:
    """The reader's name of a meta-analysis or CBMA method (its registry name when unknown)."""
    text = IBMA_METHODS.get(method) or CBMA_METHODS.get(method)
    return text.label if text else method


def read_json(path: str | os.PathLike | None) -> dict | None:
    """A JSON file's content, None when the path is None or missing."""
    if path is None or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())


def peak_of(z_img_path: str | os.PathLike) -> tuple[float, tuple[float, float, float]] | None:
    """The voxel of largest \\|z\\| of a thresholded map: (z, MNI (x, y, z) mm), None when it is empty.

    Sub-threshold voxels are 0 or NaN in nvmeta's thresholded maps.
    """
    import nibabel as nib
    import numpy as np

    img = nib.load(z_img_path)
    data = np.asarray(img.dataobj, dtype=np.float64)
    finite = np.isfinite(data) & (data != 0)
    if not finite.any():
        return None
    a = np.where(finite, np.abs(data), -np.inf)
    ijk = np.unravel_index(int(np.argmax(a)), data.shape)
    xyz = img.affine[:3, :3] @ np.array(ijk, dtype=float) + img.affine[:3, 3]
    return float(data[ijk]), (float(xyz[0]), float(xyz[1]), float(xyz[2]))


def _peak_text(peak) -> str:
    z, (x, y, zz) = peak
    return f"peak z = {z:.1f} at MNI ({x:.0f}, {y:.0f}, {zz:.0f}) mm"


def funnel_rows(funnel_tsv: str | os.PathLike) -> list[dict]:
    import pandas as pd

    return pd.read_csv(funnel_tsv, sep="\t", keep_default_na=False).to_dict("records")


def excluded_reasons(qc_tsv: str | os.PathLike, top: int = 3) -> tuple[list[tuple[str, int]], int, int]:
    """The ``top`` commonest exclusion reasons with their counts; images and reasons beyond them."""
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str, "reason": str}, keep_default_na=False)
    out = qc[qc["status"].str.strip() != "included"]
    counts = out["reason"].replace("", "no reason recorded").value_counts()
    top = (
        len(counts) if len(counts) <= top + 1 else top
    )  # "1 more for 1 other reason" says less than the reason
    shown = [(str(r), int(n)) for r, n in counts.head(top).items()]
    return shown, int(counts.iloc[top:].sum()), max(0, len(counts) - top)


def funnel_line(funnel_tsv: str | os.PathLike, qc_tsv: str | os.PathLike) -> Line:
    """Selected → included, with the commonest exclusion reasons."""
    rows = funnel_rows(funnel_tsv)
    counts = [(str(r["stage"]), int(r["count"])) for r in rows]
    selected = counts[0][1] if counts else 0
    included = counts[-1][1] if counts else 0
    chain = " → ".join(f"{n:,} {stage}" for stage, n in counts)
    text = f"{plural(selected, 'image')} selected, {included:,} included ({chain})."
    if selected > included:
        shown, n_other, k_other = excluded_reasons(qc_tsv)
        parts = [f"{n} × {r}" for r, n in shown]
        if n_other:
            parts.append(f"{n_other} more for {plural(k_other, 'other reason')} (see the funnel table)")
        text += f" {selected - included:,} left out: " + "; ".join(parts) + "."
    return Line("Inputs", text, status="ok" if included else "fail")


def _not_computed(s: dict) -> str | None:
    """Why a method reported nothing at all (too few usable maps, no voxel with enough maps), else None."""
    k_units, k_min = s.get("k_units", s.get("k_maps")), s.get("min_maps_effective")
    if k_units is not None and k_min is not None and k_units < k_min:
        return f"not computed: {plural(k_units, 'usable map')} (at least {k_min} needed)"
    if s.get("n_voxels_reported") == 0:
        return f"not computed: no voxel has data in at least {k_min} maps"
    return None


def method_line(method: str, s: dict, peak, png: Path | None = None, est_png: Path | None = None) -> Line:
    """One meta-analysis method: maps, what survives its correction(s), the peak.

    Permutation: its own family-wise error result first (what its figure shows), then FDR and
    Bonferroni. A failed plausibility check (``summary.json`` ``plausibility``) replaces the counts
    and the peak by the check's message; a partial failure is said after them.
    """
    k = int(s.get("k_maps", 0))
    units = s.get("k_units")
    maps = plural(k, "map") + (f" in {plural(units, 'unit')}" if units is not None and units != k else "")
    figures = [(p, f"{label(method)}: z map") for p in (png,) if p is not None]
    figures += [(p, f"{label(method)}: pooled g and I²") for p in (est_png,) if p is not None]
    head = f"{label(method)} ({maps})"

    plaus = s.get("plausibility") or {}
    if plaus.get("peak_ok") is False:
        msg = str(plaus.get("message") or "its peak z exceeds what its maps can give").rstrip(".")
        return Line(
            head,
            f"result not headlined: it fails the plausibility check ({msg}).",
            figures,
            "fail",
            "method",
            "Meta-analysis",
        )
    why = _not_computed(s)
    if why:
        return Line(head, why + ".", figures, "none", "method", "Meta-analysis")
    alpha = float(s.get("alpha", 0.05))
    n_mask = s.get("n_voxels_mask")
    parts = []

    def count(n, corr, clusters=None):
        share = f" ({100 * n / n_mask:.0f} % of {n_mask:,} brain voxels)" if n and n_mask else ""
        where = f" in {plural(clusters, 'cluster')}" if n and clusters is not None else ""
        return f"{n:,} voxels at {corr}{share}{where}" if n else f"no voxel survives {corr}"

    if s.get("n_significant_fwe") is not None:
        parts.append(
            count(int(s["n_significant_fwe"]), f"FWE p < {alpha:g} (permutation)", s.get("n_clusters_fwe"))
        )
        parts.append(f"FDR q < {alpha:g}: {int(s.get('n_significant_fdr') or 0):,}")
    else:
        parts.append(
            count(int(s.get("n_significant_fdr") or 0), f"FDR q < {alpha:g}", s.get("n_clusters_fdr"))
        )
    if s.get("n_significant_bonferroni") is not None:
        parts.append(f"Bonferroni: {int(s['n_significant_bonferroni']):,}")
    if peak is not None:
        parts.append(_peak_text(peak))
    text = "; ".join(parts) + "."
    status = "ok" if peak is not None else "none"
    if plaus.get("ok") is False:
        text += f" {plural(int(plaus.get('n_voxels_over_bound', 0)), 'voxel')} fail the plausibility check (see the warnings)."
        status = "warn"
    return Line(head, text, figures, status, "method", "Meta-analysis")


def effects_line(effects: Mapping[str, dict], est_pngs: Mapping[str, Path]) -> Line | None:
    """Effect sizes, one line: the pooled g range and median I² (a fraction) of each effect-size method."""
    if not effects:
        return None
    parts = []
    for method, s in effects.items():
        if _not_computed(s) or s.get("est_min") is None:
            parts.append(f"{label(method)}: not computed")
            continue
        text = f"{label(method)}: g {s['est_min']:.2f} to {s['est_max']:.2f}"
        if s.get("I2_median") is not None:
            text += f", median I² {s['I2_median']:.2f}"
        parts.append(text)
    figures = [(p, f"{label(m)}: pooled g and I²") for m, p in est_pngs.items()]
    return Line(
        "Effect sizes (Hedges' g)",
        "; ".join(parts) + " (g over the reported voxels; I² as a fraction, 0–1).",
        figures,
        section="Meta-analysis",
    )


def cbma_line(cbma: Mapping[str, dict], pngs: Mapping[str, Path]) -> Line | None:
    """CBMA, one line: experiments, foci, iterations, and each method's cluster-level FWE clusters."""
    if not cbma:
        return None
    first = next(iter(cbma.values()))
    parts = []
    for method, s in cbma.items():
        n_cl, n_vox = int(s.get("n_clusters", 0)), int(s.get("n_significant_cluster_fwe", 0))
        parts.append(
            f"{label(method)} {plural(n_cl, 'cluster')} ({n_vox:,} voxels)"
            if n_cl
            else f"{label(method)} no cluster"
        )
    text = (
        f"NiMARE on the peaks of {plural(first.get('n_maps', 0), 'map')} ({plural(first.get('n_experiments', 0), 'experiment')}, "
        f"{plural(first.get('n_foci', 0), 'focus', 'foci')}, {int(first.get('n_iters', 0)):,} Monte-Carlo iterations): "
        + "; ".join(parts)
        + f" at cluster-level FWE p < {float(first.get('cluster_threshold', 0.05)):g}."
    )
    status = "warn" if any(s.get("warnings") for s in cbma.values()) else "ok"
    figures = [(p, f"{label(m)}: CBMA z map") for m, p in pngs.items()]
    return Line("CBMA (coordinate-based)", text, figures, status, section="IBMA vs CBMA")


def overlap_line(overlap_tsv: str | os.PathLike | None, png: Path | None, ibma: str) -> Line | None:
    """IBMA vs CBMA, one line: Dice and peak distances of the first IBMA method against each CBMA method."""
    import pandas as pd

    if overlap_tsv is None or not Path(overlap_tsv).exists():
        return None
    t = pd.read_csv(overlap_tsv, sep="\t")
    t = t[(t["ibma_method"] == ibma) & (t["cbma_level"] == "cluster")]
    if t.empty:
        return None
    parts = []
    for r in t.to_dict("records"):
        text = f"{label(r['cbma_method'])} Dice {r['dice']:.2f}"
        if r["n_cbma_clusters"]:
            text += f", {int(r['n_matched_clusters'])}/{int(r['n_cbma_clusters'])} clusters on IBMA ones"
            if pd.notna(r["peak_distance_median_mm"]):
                text += f" (median peak distance {r['peak_distance_median_mm']:.1f} mm)"
        parts.append(text)
    figures = [(png, "IBMA vs CBMA")] if png is not None else []
    return Line(
        f"IBMA ({label(ibma)}, FDR) vs CBMA clusters", "; ".join(parts) + ".", figures, section="IBMA vs CBMA"
    )


def ica_line(summary: dict | None, terms_tsv, stability_tsv, pngs: Sequence[Path]) -> Line | None:
    """ICA, one line: components computed (from its summary), runs and stability, each one's top terms."""
    import pandas as pd

    if summary is None:
        return None
    n = int(summary["n_components"])
    titles = summary.get("titles") or [f"IC{k}" for k in range(n)]
    runs = int(summary.get("n_runs", 1))
    conv = summary.get("converged")
    conv_ok = all(conv) if isinstance(conv, list) else bool(conv)
    text = f"{plural(n, 'component')} from {plural(summary.get('n_maps', 0), 'map')} (FastICA, {plural(runs, 'run')}"
    if stability_tsv is not None and Path(stability_tsv).exists():
        st = pd.read_csv(stability_tsv, sep="\t")
        text += f"; stability: mean |r| with the other runs {st['mean_abs_corr'].min():.2f} to {st['mean_abs_corr'].max():.2f}"
    text += ")" + ("" if conv_ok else ", NOT CONVERGED") + ": " + "; ".join(str(t) for t in titles) + "."
    figures = [(Path(p), f"ICA component {k}") for k, p in enumerate(pngs)]
    return Line("ICA", text, figures, "ok" if conv_ok else "warn", section="ICA")


def decoding_line(decoding_tsv, png, summary: dict | None) -> Line | None:
    """Decoding, one line: each result map's closest atlas terms with r and the null's p, or why none."""
    if decoding_tsv is None or not Path(decoding_tsv).exists():
        return None
    from nvmeta.decode.decoding import describe_decoding

    lines = describe_decoding(decoding_tsv)
    decodable = [ln for ln in lines if " resembles " in ln]
    text = "; ".join(lines) + "." if lines else "no result map to decode."
    status = "ok" if decodable else "none"
    if summary and summary.get("warnings"):
        status = "warn" if decodable else status
    figures = [(Path(png), "Decoding: top atlas terms per result map")] if png is not None else []
    return Line("Decoding", text, figures, status, section="Decoding")


def inputs_line(n_maps: int, mean_z, coverage, correlation, full_coverage: float | None = None) -> Line:
    """Inputs, one line: the mean z, NiMARE's relative coverage / maps-per-voxel map, the similarity matrix."""
    parts = ["mean z", "coverage (maps per voxel and relative coverage)"]
    parts.append(
        "similarity matrix"
        if n_maps >= 2
        else f"no similarity matrix ({plural(n_maps, 'map')}: no pair to correlate)"
    )
    figures = [(Path(p), cap) for p, cap in ((mean_z, "Mean z of the included maps"),
                                             (coverage, "Coverage: maps with data per voxel (relative coverage)"),
                                             (correlation, "Similarity (correlation) of the input maps")) if p is not None]  # fmt: skip
    return Line("Input maps", ", ".join(parts) + ".", figures, section="Inputs")


_NUMBER = re.compile(r"\d[\d,.]*")
_FILE = re.compile(r"\b[\w.]+\.(?:tsv|nii\.gz|json|png)\b")


def group_warnings(warnings: Sequence[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Warnings ``(source, text)`` grouped by kind: same text once the source name, numbers and file names
    are set aside; groups in order of first appearance, identical (source, text) pairs kept once.

    Returns
    -------
    list of (example text, [(source, text), ...])
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for source, text in dict.fromkeys(warnings):
        body = text[len(source) + 2 :] if text.startswith(f"{source}: ") else text
        key = _NUMBER.sub("#", _FILE.sub("FILE", body))
        groups.setdefault(key, []).append((source, text))
    return [(members[0][1], members) for members in groups.values()]
