"""Figures of the atlas (``atlas.png``) and of an analysis' decoding (``decoding.png``); matplotlib Agg."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.io import atomic_path

__all__ = ["atlas_figure", "decoding_figure"]

#: Terms drawn in the atlas' bar chart, and glass brains of the largest terms below it.
ATLAS_BARS = 30
ATLAS_BRAINS = 8


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> None:
    # NiMARE's import sets savefig.bbox to "tight" process-wide; the figure keeps its own size here
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches=None, facecolor="white")


def _hygiene_lines(funnel: dict | None) -> list[str]:
    if not funnel:
        return []
    lines = [f"selection: {funnel.get('selected', 0):,} maps of {funnel.get('images_examined', 0):,} examined "
             f"in {funnel.get('collections_passed', 0):,} of {funnel.get('collections_examined', 0):,} collections"]  # fmt: skip
    rejected = {**funnel.get("collections_rejected_by_term", {}), **funnel.get("images_rejected_by_term", {})}
    shown = [f"{k}: {v:,}" for k, v in rejected.items() if v]
    if shown:
        lines.append("left out by term: " + "; ".join(shown))
    return [textwrap.fill(x, 150) for x in lines]


def atlas_figure(
    table: Any, terms: Any, results: Path, out_png: str | os.PathLike, funnel: dict | None
) -> Path:
    """Bar chart of the terms' map counts (the largest :data:`ATLAS_BARS`) and glass brains of the
    largest :data:`ATLAS_BRAINS` reference maps."""
    plt = _plt()
    n_brains = min(ATLAS_BRAINS, len(table))
    rows_b = math.ceil(n_brains / 4)
    top = table.head(ATLAS_BARS)
    head = [f"Task atlas: {len(table)} reference map(s); {int((~terms['eligible']).sum())} term(s) below "
            "atlas.min_maps / min_collections"] + _hygiene_lines(funnel)  # fmt: skip
    head_h = 0.2 * sum(x.count("\n") + 1 for x in head) + 0.25
    bar_h = 0.28 * max(len(top), 1) + 0.4
    total_h = head_h + bar_h + 0.6 + 2.6 * rows_b
    fig = plt.figure(figsize=(16, total_h))
    fig.text(0.01, 1 - 0.1 / total_h, "\n".join(head), va="top", ha="left", fontsize=10)
    ax = fig.add_axes((0.32, (2.6 * rows_b + 0.6) / total_h, 0.6, bar_h / total_h))
    if len(top):
        y = np.arange(len(top))[::-1]
        ax.barh(y, top["n_maps"], color="#4477aa")
        ax.set_yticks(y, [textwrap.shorten(str(t), 48, placeholder="…") for t in top["term"]], fontsize=8)
        for yy, (n, c) in zip(y, zip(top["n_maps"], top["n_collections"], strict=True), strict=True):
            ax.text(n, yy, f" {n} maps / {c} coll.", va="center", fontsize=7)
        ax.set_xlabel("maps in the reference")
    else:
        ax.text(0.5, 0.5, "no term has enough maps", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    from nilearn import plotting

    from nvmeta.meta import frozen_gc

    with frozen_gc():  # nilearn runs gc.collect() for every image it reads
        _atlas_brains(fig, table.head(n_brains), results, rows_b, total_h, plotting)
    _save(fig, out_png)
    plt.close(fig)
    return Path(out_png)


def _atlas_brains(fig, table, results: Path, rows_b: int, total_h: float, plotting) -> None:
    import nibabel as nib

    for i, row in enumerate(table.itertuples(index=False)):
        r, c = divmod(i, 4)
        bax = fig.add_axes((c / 4, (2.6 * (rows_b - 1 - r) + 0.1) / total_h, 0.25, 2.3 / total_h))
        img = nib.load(results / row.map)
        data = np.asarray(img.dataobj, dtype=np.float32)
        finite = np.isfinite(data)
        vmax = float(np.nanmax(np.abs(data))) if finite.any() else 1.0
        shown = nib.Nifti1Image(np.where(finite, data, 0).astype(np.float32), img.affine)
        plotting.plot_glass_brain(shown, axes=bax, display_mode="z", plot_abs=False, colorbar=False,
                                  vmax=max(vmax, 1e-3), vmin=-max(vmax, 1e-3), cmap="cold_hot",
                                  threshold=min(3.0, 0.5 * vmax))  # fmt: skip
        bax.set_title(textwrap.shorten(f"{row.term} (k={row.n_maps})", 40, placeholder="…"), fontsize=8)


def decoding_figure(table: Any, out_png: str | os.PathLike, n_top: int, note: str | None = None) -> Path:
    """The top terms per source: up to :data:`MAX_PANELS` sources, one bar panel each (its ``n_top``
    terms by r, red where the empirical p <= 0.05, a tick at the null's 95th percentile); more
    sources (an ICA of many components), one heat map of r over the sources' top terms."""
    plt = _plt()
    sources = list(dict.fromkeys(table["source"]))
    ok = table[np.isfinite(table["r"].astype(float))]
    tail = f"\n{note}" if note else ""
    if len(sources) > MAX_PANELS and not ok.empty:
        head = "Decoding against the task atlas: r of each map with the top terms (*: empirical p <= 0.05)"
        fig = _heatmap(plt, ok, sources, n_top, head + tail)
    else:
        head = "Decoding against the task atlas (red: empirical p <= 0.05 against random references)"
        fig = _panels(plt, ok, sources, n_top, head + tail)
    _save(fig, out_png)
    plt.close(fig)
    return Path(out_png)


#: Sources drawn as bar panels; more go into one heat map.
MAX_PANELS = 12


def _panels(plt, ok, sources, n_top: int, head: str):
    ncols = 1 if len(sources) == 1 else 2
    nrows = max(1, math.ceil(len(sources) / ncols))
    panel_h = 0.3 * n_top + 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, panel_h * nrows + 1.0), squeeze=False)
    fig.subplots_adjust(left=0.3 if ncols == 1 else 0.17, right=0.97, wspace=0.9, hspace=0.5,
                        top=1 - 0.9 / fig.get_figheight(), bottom=0.45 / fig.get_figheight())  # fmt: skip
    for ax in axes.ravel()[len(sources) :]:
        ax.set_axis_off()
    for ax, source in zip(axes.ravel(), sources, strict=False):
        part = ok[ok["source"] == source].sort_values("rank").head(n_top)
        ax.set_title(source, fontsize=10)
        if part.empty:
            ax.text(0.5, 0.5, "no decodable term", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        y = np.arange(len(part))[::-1]
        p = part["p_null"].astype(float).fillna(1.0)
        ax.barh(y, part["r"], color=["#cc6677" if v <= 0.05 else "#999999" for v in p])
        ax.scatter(part["null_p95"].astype(float), y, marker="|", s=120, color="black", zorder=3)
        labels = [textwrap.shorten(f"{t} (k={k})", 46, placeholder="…")
                  for t, k in zip(part["term"], part["n_maps"], strict=True)]  # fmt: skip
        ax.set_yticks(y, labels, fontsize=8)
        for yy, r, pv in zip(y, part["r"], part["p_null"], strict=True):
            ax.text(
                max(r, 0), yy, f" r={r:.2f}" + ("" if pv != pv else f", p={pv:.3g}"), va="center", fontsize=7
            )
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("spatial correlation r")
    fig.suptitle(head, fontsize=11)
    return fig


def _heatmap(plt, ok, sources, n_top: int, head: str):
    terms = list(
        dict.fromkeys(ok.sort_values(["source", "rank"]).groupby("source").head(min(n_top, 3))["term"])
    )
    terms = terms[:40]
    grid = ok.pivot_table(index="source", columns="term", values="r", aggfunc="first").reindex(index=sources,
                                                                                               columns=terms)  # fmt: skip
    pv = ok.pivot_table(index="source", columns="term", values="p_null", aggfunc="first").reindex(index=sources,
                                                                                                  columns=terms)  # fmt: skip
    fig = plt.figure(figsize=(4 + 0.32 * len(terms), 2.5 + 0.22 * len(sources)))
    ax = fig.add_axes((0.25, 0.3, 0.65, 0.6))
    vmax = float(np.nanmax(np.abs(grid.to_numpy()))) if np.isfinite(grid.to_numpy()).any() else 1.0
    im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    yy, xx = np.nonzero(pv.to_numpy(dtype=float) <= 0.05)
    ax.scatter(xx, yy, marker="*", s=12, color="black")
    ax.set_xticks(range(len(terms)), [textwrap.shorten(t, 30, placeholder="…") for t in terms], rotation=60,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(sources)), sources, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.03, label="r")
    fig.suptitle(head, fontsize=10)
    return fig
