"""First page of an analysis in the report: funnel, key figures and a plain-language summary.

:func:`write_overview` writes one self-contained HTML page (figures embedded as data URIs, no
external request) that Snakemake's report shows in its content pane. Every number on it is read from
the analysis' own outputs (``funnel.tsv``, ``qc.tsv``, each method's ``summary.json`` and
``z_fdr.nii.gz``, ICA ``terms.tsv``): nothing is recomputed differently from the files it cites.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["METHOD_TEXT", "analysis_summary", "peak_of", "write_overview"]

#: How each meta-analysis method is described to a reader (plain language).
METHOD_TEXT = {
    "stouffer": "Stouffer's method (the sum of the maps' z values divided by the square root of their number)",
    "weighted_stouffer": "Stouffer's method with each map weighted by the square root of its sample size",
    "fisher": "Fisher's method (combining the maps' p-values)",
    "ttest": "a random-effects one-sample t-test of the maps' z values",
    "permutation": "a sign-flipping permutation test of the mean z (family-wise error corrected)",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #0f172a; background: #fff;
       margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; line-height: 1.5; }
h1 { font-size: 1.6rem; margin: 0 0 .5rem; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 .5rem; border-bottom: 1px solid #cbd5e1; }
p.summary { font-size: 1.05rem; background: #f1f5f9; border-left: 4px solid #0f766e; padding: .75rem 1rem; }
p.warn { background: #fef3c7; border-left: 4px solid #b45309; padding: .5rem 1rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #cbd5e1; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #e2e8f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e8f0; }
figcaption { font-size: .9rem; color: #334155; }
"""


def _fmt_int(x: Any) -> str:
    return f"{int(x):,}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{_fmt_int(n)} {word if n == 1 else (plural or word + 's')}"


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


def _funnel(funnel_tsv: str | os.PathLike):
    import pandas as pd

    return pd.read_csv(funnel_tsv, sep="\t", keep_default_na=False)


def _excluded_reasons(qc_tsv: str | os.PathLike, top: int = 3) -> list[tuple[str, int]]:
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str, "reason": str}, keep_default_na=False)
    out = qc[qc["status"].str.strip() != "included"]
    counts = out["reason"].replace("", "no reason recorded").value_counts()
    return [(str(r), int(n)) for r, n in counts.head(top).items()] + (
        [(f"{len(counts) - top} other reasons", int(counts.iloc[top:].sum()))] if len(counts) > top else []
    )


def analysis_summary(
    analysis: str,
    funnel_tsv: str | os.PathLike,
    qc_tsv: str | os.PathLike,
    meta: dict[str, dict] | None = None,
    ica_terms_tsv: str | os.PathLike | None = None,
) -> str:
    """One plain-language paragraph: selected -> included, how they were combined, what survived.

    Parameters
    ----------
    analysis : str
        Analysis name.
    funnel_tsv, qc_tsv : path-like
        The analysis' funnel and QC table.
    meta : dict, optional
        method -> {"summary": the method's ``summary.json`` (dict), "peak": :func:`peak_of` of its
        ``z_fdr.nii.gz`` (or None)}, in the configured order.
    ica_terms_tsv : path-like, optional
        The ICA's ``terms.tsv`` (columns component, rank, term).

    Returns
    -------
    str
        Plain text (no markup).
    """
    funnel = _funnel(funnel_tsv)
    counts = [(str(r["stage"]), int(r["count"])) for r in funnel.to_dict("records")]
    selected = counts[0][1] if counts else 0
    included = counts[-1][1] if counts else 0
    chain = " → ".join(f"{_fmt_int(n)} {stage}" for stage, n in counts)
    parts = [
        f"Analysis {analysis}: {_plural(selected, 'image')} selected, {_fmt_int(included)} included ({chain})."
    ]
    if selected > included:
        reasons = _excluded_reasons(qc_tsv)
        parts.append(
            f"{_plural(selected - included, 'image was', 'images were')} left out: "
            + "; ".join(f"{n} × {r}" for r, n in reasons)
            + "."
        )
    for method, res in (meta or {}).items():
        s = res["summary"]
        k = s.get("k_maps", included)
        text = METHOD_TEXT.get(method, method)
        units = s.get("k_units")
        per = f" ({units} independent units)" if units is not None and units != k else ""
        alpha = s.get("alpha", 0.05)
        n_fdr = s.get("n_significant_fdr")
        n_mask = s.get("n_voxels_mask")
        if method == next(iter(meta)):
            sentence = f"The {_plural(int(k), 'map')}{per} were combined voxel by voxel with {text}."
        else:
            sentence = f"Combined with {text} instead:"
        plaus = s.get("plausibility") or {}
        if plaus.get("peak_ok") is False:  # summary.json's check (nvmeta.meta.plausibility)
            parts.append(
                f"{sentence} Its result fails the plausibility check, so no count or peak of it is given here: "
                f"{plaus.get('message', '')}."
            )
            continue
        if n_fdr is None:
            sentence += " No FDR result was recorded."
        elif n_fdr == 0:
            sentence += f" No voxel survived the false discovery rate threshold (q < {alpha:g})."
        else:
            share = (
                f" ({100 * n_fdr / n_mask:.0f} % of the {_fmt_int(n_mask)} brain voxels)" if n_mask else ""
            )
            clusters = s.get("n_clusters_fdr")
            in_clusters = f" in {_plural(int(clusters), 'cluster')}" if clusters is not None else ""
            sentence += f" At a false discovery rate of q < {alpha:g}, {_fmt_int(n_fdr)} voxels survived{share}{in_clusters}"
            peak = res.get("peak")
            if peak is not None:
                z, (x, y, zz) = peak
                sentence += f"; the strongest is z = {z:.1f} at MNI ({x:.0f}, {y:.0f}, {zz:.0f}) mm"
            sentence += "."
            n_bonf = s.get("n_significant_bonferroni")
            if n_bonf is not None:
                sentence += f" With the stricter Bonferroni correction, {_fmt_int(n_bonf)} voxels survived."
        if plaus.get("ok") is False:
            sentence += (
                f" ({_plural(int(plaus.get('n_voxels_over_bound', 0)), 'voxel')} of it failed the plausibility "
                "check: see the warnings.)"
            )
        parts.append(sentence)
    if ica_terms_tsv is not None and Path(ica_terms_tsv).exists():
        import pandas as pd

        terms = pd.read_csv(ica_terms_tsv, sep="\t")
        labels = []
        for comp, rows in terms.sort_values(["component", "rank"]).groupby("component", sort=True):
            labels.append(f"IC{comp}: {', '.join(rows['term'].astype(str).head(3))}")
        n_comp = terms["component"].nunique()
        parts.append(
            f"A spatial ICA found {_plural(int(n_comp), 'component')} with terms"
            + (f" ({'; '.join(labels)})" if labels else "")
            + "."
        )
    return " ".join(parts)


def _img_tag(path: str | os.PathLike, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _funnel_table(funnel_tsv: str | os.PathLike) -> str:
    funnel = _funnel(funnel_tsv)
    rows = []
    for r in funnel.to_dict("records"):
        rows.append(
            f"<tr><td>{html.escape(str(r['stage']))}</td><td class='num'>{_fmt_int(r['count'])}</td>"
            f"<td class='num'>{_fmt_int(r.get('excluded_here') or 0)}</td><td>{html.escape(str(r.get('reasons', '')))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>stage</th><th>images</th><th>excluded here</th><th>reasons</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def write_overview(
    out_html: str | os.PathLike,
    analysis: str,
    funnel_tsv: str | os.PathLike,
    qc_tsv: str | os.PathLike,
    *,
    meta_dirs: dict[str, str | os.PathLike] | None = None,
    figures: Sequence[tuple[str | os.PathLike, str]] = (),
    ica_terms_tsv: str | os.PathLike | None = None,
    ica_figures: Sequence[str | os.PathLike] = (),
    logger: logging.Logger | None = None,
) -> str:
    """Write the analysis' first page (self-contained HTML); return its summary paragraph.

    Parameters
    ----------
    out_html : path-like
        Output (written atomically).
    analysis : str
        Analysis name.
    funnel_tsv, qc_tsv : path-like
        The analysis' funnel and QC table.
    meta_dirs : dict, optional
        method -> its ``meta/{method}`` folder (``summary.json``, ``z_fdr.nii.gz``, ``z.png``).
    figures : sequence of (png, caption)
        Further key figures (e.g. the inputs' mean z and coverage maps).
    ica_terms_tsv : path-like, optional
        The ICA's ``terms.tsv``.
    ica_figures : sequence of path-like
        ICA component figures (the first four are shown).
    logger : logging.Logger, optional
        Defaults to the module logger.
    """
    log = logger or _LOGGER
    meta = {}
    for method, d in (meta_dirs or {}).items():
        d = Path(d)
        meta[method] = {
            "summary": json.loads((d / "summary.json").read_text()),
            "peak": peak_of(d / "z_fdr.nii.gz"),
        }
    summary = analysis_summary(analysis, funnel_tsv, qc_tsv, meta, ica_terms_tsv)
    warnings = [w for res in meta.values() for w in res["summary"].get("warnings", [])]
    body = [
        f"<h1>Analysis {html.escape(analysis)}: overview</h1>",
        f"<p class='summary'>{html.escape(summary)}</p>",
    ]
    for w in dict.fromkeys(warnings):
        body.append(f"<p class='warn'>Warning: {html.escape(str(w))}</p>")
    body += ["<h2>Funnel: selected → included</h2>", _funnel_table(funnel_tsv), "<h2>Key figures</h2>"]
    for method, d in (meta_dirs or {}).items():
        png = Path(d) / "z.png"
        if png.exists():
            body.append(
                f"<figure>{_img_tag(png, f'{method} z map')}<figcaption>Meta-analytic z map, "
                f"{html.escape(METHOD_TEXT.get(method, method))}.</figcaption></figure>"
            )
    for png, caption in figures:
        body.append(
            f"<figure>{_img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    for png in list(ica_figures)[:4]:
        body.append(
            f"<figure>{_img_tag(png, Path(png).stem)}<figcaption>ICA {Path(png).stem}.</figcaption></figure>"
        )
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(analysis)}: overview</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    log.info("overview of %s written: %s", analysis, summary)
    return summary


_LOGGER = logger
