"""Figures of an analysis' inputs (matplotlib Agg; nilearn imported lazily)."""

from __future__ import annotations

import importlib
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from nvmeta.io import atomic_path

__all__ = ["glass_brain_grid", "grid_shape"]

#: Up to this many maps each panel is a 3-view ('ortho') glass brain, beyond it a single
#: axial ('z') projection, so that 100 maps still fit one readable figure.
ORTHO_MAX = 24


def grid_shape(n: int) -> tuple[int, int, str]:
    """Columns, rows and nilearn ``display_mode`` of the panel grid for ``n`` maps."""
    if n <= ORTHO_MAX:
        ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 12 else 4
        mode = "ortho"
    else:
        ncols = min(10, max(5, math.ceil(math.sqrt(n * 1.2))))
        mode = "z"
    nrows = max(1, math.ceil(n / ncols))
    return ncols, nrows, mode


def _panel(item, mode: str, panel_w: float, panel_h: float, dpi: int, threshold: float, width_chars: int):
    """Render one glass brain in its own figure; return ``(title, RGBA array)``."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from nilearn import plotting

    image_id, title, path = item
    contrast = str(title).strip() if title is not None and str(title).strip() not in ("", "nan") else ""
    label = textwrap.shorten(f"{image_id}: {contrast or '(no contrast)'}", width=width_chars, placeholder="…")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    finite = np.isfinite(data)
    vmax = float(np.max(np.abs(data[finite]))) if finite.any() else 1.0
    vmax = max(vmax, threshold + 1e-3, 1e-3)
    img = nib.Nifti1Image(np.where(finite, data, 0).astype(np.float32), img.affine)
    pfig = plt.figure(figsize=(panel_w, panel_h), dpi=dpi, facecolor="white")
    try:
        plotting.plot_glass_brain(
            img,
            display_mode=mode,
            figure=pfig,
            threshold=threshold,
            plot_abs=False,
            colorbar=mode == "ortho",
            cmap="cold_hot",
            vmin=-vmax,
            vmax=vmax,
            annotate=False,
            black_bg=False,
        )
        pfig.canvas.draw()
        return label, np.asarray(pfig.canvas.buffer_rgba()).copy()
    finally:
        plt.close(pfig)


def glass_brain_grid(
    items: Sequence[tuple[int, str | None, str | os.PathLike]],
    out_png: str | os.PathLike,
    *,
    threshold: float = 3.0,
    dpi: int = 100,
    suptitle: str | None = None,
) -> Path:
    """One figure with a glass brain of every included z-map, titled with id and contrast.

    Parameters
    ----------
    items : sequence of (image_id, title, zmap_path)
        ``title`` is typically the contrast definition (or the map name); None/empty is
        shown as "(no contrast)". Long titles are shortened.
    out_png : path-like
        Output PNG (written atomically).
    threshold : float, default=3.0
        |z| below which voxels are not drawn.
    dpi : int, default=100
        Resolution of the saved figure.
    suptitle : str, optional
        Figure title (default: "<n> input z-maps").

    Returns
    -------
    pathlib.Path
        ``out_png``.

    Notes
    -----
    Layout: up to 24 maps, ortho (3-view) glass brains in up to 4 columns; above that,
    axial projections in 5–10 columns (100 maps: 10 × 10). Colours are signed (cold-hot),
    symmetric per map, with a colour bar only in ortho mode.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    n = len(items)
    if n == 0:
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no included z-map", ha="center", va="center", fontsize=14)
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=dpi)
        plt.close(fig)
        return out_png

    ncols, nrows, mode = grid_shape(n)
    panel_w, panel_h = (5.2, 2.0) if mode == "ortho" else (2.0, 2.4)
    title_pad = 0.35  # inches above each panel for its title
    width_chars = 52 if mode == "ortho" else 28
    fontsize = 9 if mode == "ortho" else 7
    # nilearn runs gc.collect() several times per plot: ~0.5 s each with the objects that
    # nilearn/matplotlib/scipy keep alive, and growing with every panel's artists if they
    # all live in one figure. So each glass brain is drawn in its own small figure (closed
    # at once) and pasted into the grid as an image, with the heap that exists before the
    # loop (imports included) frozen so that those collections stay cheap.
    importlib.import_module("nilearn.plotting")
    from nvmeta.meta import frozen_gc

    with frozen_gc():
        panels = [_panel(item, mode, panel_w, panel_h, dpi, threshold, width_chars) for item in items]
    head = 0.5
    fig_w = ncols * panel_w
    fig_h = nrows * (panel_h + title_pad) + head
    fig = plt.figure(figsize=(fig_w, fig_h), facecolor="white")
    try:
        for i, (label, rgba) in enumerate(panels):
            row, col = divmod(i, ncols)
            bottom = fig_h - head - (row + 1) * (panel_h + title_pad)
            ax = fig.add_axes((col / ncols, bottom / fig_h, 1 / ncols, panel_h / fig_h))
            ax.imshow(rgba, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(label, fontsize=fontsize, pad=2)
        fig.suptitle(
            suptitle or f"{n} input z-map{'s' if n != 1 else ''} (|z| > {threshold:g})",
            y=1 - 0.2 * head / fig_h,
            va="top",
            fontsize=12,
        )
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    return out_png


def inputs_from_qc(qc_tsv: str | os.PathLike, zmap_path_for) -> list[tuple[int, str | None, Path]]:
    """(image_id, title, zmap path) of every included image of a QC table, in its order.

    The title is the contrast definition, else the image name (None when neither is given).
    """
    from nvmeta.meta import read_included

    def title(row: dict) -> str | None:
        texts = [row.get(k) for k in ("contrast_definition", "name")]  # NaN for empty cells
        return next((t for t in texts if isinstance(t, str) and t.strip()), None)

    return [
        (int(r["image_id"]), title(r), Path(zmap_path_for(int(r["image_id"]))))
        for r in read_included(qc_tsv).to_dict("records")
    ]
