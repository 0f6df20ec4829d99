"""One figure with a glass brain of every included z-map, on one shared colour scale.

Each panel is nilearn's ``plot_glass_brain`` drawn into an Axes of the one figure (public API only);
the colour limit is shared by every panel and robust to a few extreme voxels
(:func:`nvmeta.figures.maps.robust_scale` over the drawn voxels of all maps), with one labelled
colour bar; panel titles give the image id and the part of its title that tells it from the others
(text common to every title is said once, above the grid).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CMAP", "ORTHO_MAX", "glass_brain_grid", "grid_shape", "split_common"]

#: Up to this many maps each panel is a 3-view ('ortho') glass brain, beyond it a single
#: axial ('z') projection, so that 100 maps still fit one readable figure.
ORTHO_MAX = 24
#: Signed z in every figure of a run: the colour map of the meta-analysis mosaics.
CMAP = "RdBu_r"
#: Text shared by every panel title is lifted into the figure title only when at least this long.
MIN_COMMON_CHARS = 12


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


def split_common(titles: Sequence[str]) -> tuple[list[str], str, str]:
    """Each title without the words every title starts or ends with; that prefix and suffix.

    A shared part shorter than :data:`MIN_COMMON_CHARS` is left in the titles. With one title
    nothing is shared.
    """
    if len(titles) < 2:
        return list(titles), "", ""

    def common(words_lists):
        out = []
        for ws in zip(*words_lists, strict=False):
            if any(w != ws[0] for w in ws):
                break
            out.append(ws[0])
        return out

    words = [t.split() for t in titles]
    pre = common(words)
    suf = common([w[::-1] for w in words])[::-1]
    shortest = min(len(w) for w in words)
    pre = pre if len(" ".join(pre)) >= MIN_COMMON_CHARS else []
    suf = suf if len(" ".join(suf)) >= MIN_COMMON_CHARS else []
    if len(pre) + len(suf) > shortest:  # identical titles: keep them as a suffix
        pre = []
        suf = suf[-shortest:]
    rest = [" ".join(w[len(pre) : len(w) - len(suf)]).strip(" :—-·,;") for w in words]
    return rest, " ".join(pre), " ".join(suf)


def _label(image_id: int, text: str, width: int) -> str:
    """``id: text`` on at most two lines of ``width`` characters (the second shortened)."""
    lines = textwrap.wrap(f"{image_id}: {text}" if text else str(image_id), width=width)
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), width=width, placeholder="…")]
    return "\n".join(lines)


def _read(path: str | os.PathLike):
    """A z-map as a float32 image with no-data voxels (NaN) at 0 (nilearn draws neither)."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return nib.Nifti1Image(np.where(np.isfinite(data), data, 0).astype(np.float32), img.affine), data


def _shared_scale(paths: Sequence[Any], threshold: float):
    """:func:`~nvmeta.figures.maps.robust_scale` over the drawn voxels (\\|z\\| > threshold) of every map."""
    from nvmeta.figures import maps

    drawn = []
    for p in paths:
        data = _read(p)[1]
        a = np.abs(data[np.isfinite(data)])
        drawn.append(a[a > threshold])
    return maps.robust_scale(np.concatenate(drawn) if drawn else np.zeros(0), threshold)


def glass_brain_grid(
    items: Sequence[tuple[int, str | None, str | os.PathLike]],
    out_png: str | os.PathLike,
    *,
    threshold: float = 3.0,
    dpi: int = 100,
    suptitle: str | None = None,
) -> Path:
    """One figure with a glass brain of every included z-map, titled with id and what tells it apart.

    Parameters
    ----------
    items : sequence of (image_id, title, zmap_path)
        ``title``: e.g. the map's name and contrast (None or empty: the id alone).
    out_png : path-like
        Output PNG (written atomically).
    threshold : float, default=3.0
        \\|z\\| at or below which voxels are not drawn.
    dpi : int, default=100
        Resolution of the saved figure.
    suptitle : str, optional
        Figure title (default: "<n> input z-maps (|z| > threshold)").

    Returns
    -------
    pathlib.Path
        ``out_png``.

    Notes
    -----
    Layout: up to 24 maps, ortho (3-view) glass brains in up to 4 columns; above that, axial
    projections in 5–10 columns (100 maps: 10 × 10). Colours: signed z on one scale shared by all
    panels, with one colour bar; the title says where it is clipped.
    """
    import matplotlib.pyplot as plt
    from nilearn import plotting

    from nvmeta.figures import maps
    from nvmeta.meta import frozen_gc

    out_png = Path(out_png)
    n = len(items)
    head_text = suptitle or f"{n} input z-map{'s' * (n != 1)} (|z| > {threshold:g})"
    with maps.pinned():
        if n == 0:
            fig = plt.figure(figsize=(6, 2))
            fig.text(0.5, 0.5, "no included z-map", ha="center", va="center", fontsize=14)
            return maps.save(fig, out_png, dpi)
        ncols, nrows, mode = grid_shape(n)
        texts, pre, suf = split_common([str(t).strip() if t is not None else "" for _, t, _ in items])
        width = 46 if mode == "ortho" else 24
        labels = [_label(int(i), t, width) for (i, _, _), t in zip(items, texts, strict=True)]
        shared = " … ".join(x for x in (pre, suf) if x)
        with frozen_gc():  # nilearn runs gc.collect() for every image it reads
            scale = _shared_scale([p for _, _, p in items], threshold)
            panel_w, panel_h = (4.6, 1.8) if mode == "ortho" else (2.0, 2.2)
            pad, column = 0.42, 1.1
            head = 0.95 if ncols > 1 else 1.3
            fig_w, fig_h = ncols * panel_w + column, nrows * (panel_h + pad) + head
            fig = plt.figure(figsize=(fig_w, fig_h))
            for k, ((_, _, path), label) in enumerate(zip(items, labels, strict=True)):
                row, col = divmod(k, ncols)
                bottom = fig_h - head - (row + 1) * (panel_h + pad)
                ax = fig.add_axes((col * panel_w / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
                plotting.plot_glass_brain(
                    _read(path)[0], figure=fig, axes=ax, display_mode=mode, threshold=threshold,
                    plot_abs=False, colorbar=False, cmap=CMAP, vmin=-scale.vmax, vmax=scale.vmax,
                    annotate=False, black_bg=False, symmetric_cbar=False,
                )  # fmt: skip
                fig.text((col + 0.5) * panel_w / fig_w, (bottom + panel_h + 0.04) / fig_h, label,
                         ha="center", va="bottom", fontsize=8.5 if mode == "ortho" else 7)  # fmt: skip
                # the panel's ~800 artists join the frozen heap (given back when frozen_gc ends),
                # so that nilearn's gc.collect() for the next maps does not walk them again
                gc.freeze()
        fig.text(0.01, 1 - 0.12 / fig_h, head_text, ha="left", va="top", fontsize=12)
        lines = (
            [f"every title {'reads' if pre and suf else 'starts with' if pre else 'ends with'}: {shared}"]
            if shared
            else []
        )
        lines.append(scale.note("|z|") or "no voxel above the threshold in any map")
        chars = int((fig_w - 0.2) * 13)  # about 13 characters of 9 pt per inch
        note = "\n".join(textwrap.fill(line, chars) for line in lines)
        fig.text(0.01, 1 - 0.45 / fig_h, note, ha="left", va="top", fontsize=9, color="0.25")
        if scale.n_shown:
            top = fig_h - head
            span = min(top, 3.2)
            maps.colorbar(fig, [1 - 0.8 / fig_w, (top - span) / fig_h + 0.1 * span / fig_h, 0.16 / fig_w, 0.8 * span / fig_h],
                          CMAP, -scale.vmax, scale.vmax, "z (one scale for all panels)" if n > 1 else "z",
                          hidden=(-threshold, threshold), marks=(threshold, -threshold))  # fmt: skip
        return maps.save(fig, out_png, dpi)
