"""QC figure of an analysis: each map's correlation with the consensus, with the QC thresholds.

One dot per map the consensus rules judged (included maps, and maps they excluded), sorted by
its r with the consensus (:mod:`nvmeta.images.consensus`); inverted contrasts in red, outliers in
orange, labelled with their image id. Lines: the inverted threshold ``qc.inverted_r``, the lower
IQR fence (applied) and the upper one (shown, not applied); the band is Q1-Q3.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)

#: Colours of the map classes.
COLOURS = {"kept": "#4c72b0", "inverted contrast": "#c44e52", "outlier": "#dd8452"}
#: Up to this many maps every dot is labelled with its image id (above, only the flagged ones).
LABEL_ALL_MAX = 30


def _kind(text: str) -> str:
    if "inverted contrast" in text:
        return "inverted contrast"
    if "outlier" in text:
        return "outlier"
    return "kept"


def judged_maps(qc_tsv: str | os.PathLike) -> Any:
    """The rows of ``qc.tsv`` the consensus rules judged, with their class, sorted by ``consensus_r``.

    Included maps and maps excluded as inverted contrasts or outliers that have a ``consensus_r``;
    column ``kind`` is ``kept``, ``inverted contrast`` or ``outlier``.
    """
    import pandas as pd

    qc = pd.read_csv(
        qc_tsv, sep="\t", dtype={"status": str, "reason": str, "flags": str}, keep_default_na=False
    )
    r = pd.to_numeric(qc.get("consensus_r", pd.Series(dtype=float)), errors="coerce")
    qc = qc.assign(consensus_r=r)
    text = qc["flags"].astype(str) + " " + qc["reason"].astype(str)
    judged = (qc["status"] == "included") | text.str.contains("inverted contrast|outlier", regex=True)
    out = qc[judged & r.notna()].copy()
    out["kind"] = [_kind(t) for t in text[out.index]]
    return out.sort_values("consensus_r", kind="stable").reset_index(drop=True)


def plot_consensus(
    qc_tsv: str | os.PathLike,
    consensus_json: str | os.PathLike,
    out_png: str | os.PathLike,
    analysis: str = "",
    dpi: int = 100,
    logger: logging.Logger | None = None,
) -> Path:
    """Write the QC figure (PNG, atomically); a one-line figure says why when there is no consensus.

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' ``qc.tsv`` (``consensus_r``, ``flags``, ``reason``).
    consensus_json : path-like
        ``qc_consensus.json`` (fences, thresholds, or why the consensus was not computed).
    out_png : path-like
        Output PNG.
    analysis : str
        Analysis name (title).
    dpi : int
        Resolution.
    logger : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    pathlib.Path
        ``out_png``.
    """
    from matplotlib.figure import Figure

    log = logger or globals()["logger"]
    info = json.loads(Path(consensus_json).read_text())
    out_png = Path(out_png)
    if info.get("status") != "computed":
        fig = Figure(figsize=(8, 1.6))
        fig.text(
            0.5,
            0.5,
            f"{analysis}: no consensus ({info.get('reason', 'not computed')})",
            ha="center",
            va="center",
        )
        _save(fig, out_png, dpi)
        log.info("QC figure: no consensus (%s)", info.get("reason"))
        return out_png
    maps = judged_maps(qc_tsv)
    n = len(maps)
    fig = Figure(figsize=(max(6.0, min(16.0, 2.0 + 0.25 * n)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(1, n + 1)
    if np.isfinite(info.get("q1") or np.nan) and np.isfinite(info.get("q3") or np.nan):
        ax.axhspan(info["q1"], info["q3"], color="0.92", zorder=0, label="Q1-Q3")
    _hline(
        ax,
        info.get("lower_fence"),
        COLOURS["outlier"],
        "--",
        f"lower fence (Q1 - {info['iqr_factor']:g} IQR)",
    )
    if (info.get("upper_fence") or np.inf) <= 1.0:  # above 1 it bounds nothing
        _hline(ax, info.get("upper_fence"), COLOURS["outlier"], ":", "upper fence (not applied)")
    if info.get("inverted_r") is not None:  # None: qc.inverted is off
        label = f"inverted: r < {info['inverted_r']:g}"
        _hline(ax, info["inverted_r"], COLOURS["inverted contrast"], "--", label)
    for kind, colour in COLOURS.items():
        sel = (maps["kind"] == kind).to_numpy()
        if sel.any():
            ax.scatter(x[sel], maps["consensus_r"].to_numpy()[sel], s=28, color=colour, zorder=3, label=kind)
    for xi, row in zip(x, maps.itertuples(index=False), strict=True):
        if n <= LABEL_ALL_MAX or row.kind != "kept":
            ax.annotate(str(row.image_id), (xi, row.consensus_r), xytext=(0, 5), textcoords="offset points",
                        ha="center", fontsize=7, rotation=90)  # fmt: skip
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=1)
    ax.set_xlim(0, n + 1)
    ax.set_ylim(-1.05, 1.15)
    ax.set_xlabel("maps, sorted by r")
    ax.set_ylabel("r with the consensus")
    ax.set_title(
        f"{analysis}: each of {info['n_maps']} maps vs the voxelwise median z of the others "
        f"(~{info['n_signal_voxels']:,} signal voxels)",
        fontsize=10,
    )
    ax.legend(loc="lower right", fontsize=7, ncol=2, frameon=False)
    fig.tight_layout()
    _save(fig, out_png, dpi)
    log.info("QC figure: %d maps, %d inverted, %d outliers", n, info["n_inverted"], info["n_outliers"])
    return out_png


def _hline(ax: Any, y: float | None, colour: str, style: str, label: str) -> None:
    if y is not None and np.isfinite(y):
        ax.axhline(y, color=colour, ls=style, lw=1.2, zorder=2, label=label)


def _save(fig: Any, out_png: Path, dpi: int) -> None:
    import matplotlib

    # the figure's own size whatever the process' rcParams (NiMARE sets savefig.bbox = tight)
    with matplotlib.rc_context({"savefig.bbox": "standard"}), atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi, facecolor="white", format="png")
