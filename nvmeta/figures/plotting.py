"""Figures and the per-map table of an analysis' inputs (matplotlib Agg; nilearn imported lazily).

Readable at 20 or 20,000 maps: :func:`input_figures` streams once over the included z-maps and writes
the mean z map, the coverage map (maps with data per voxel), the map x map correlation matrix ordered
by collection and a per-map table; the one-glass-brain-per-map grid (:func:`glass_brain_grid`) is drawn
only up to ``figures.glass_brain_max_maps`` maps.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)
_LOGGER = logger  # input_figures() takes a parameter named logger

__all__ = ["glass_brain_grid", "grid_shape", "input_figures", "input_summary", "INPUT_TABLE_COLUMNS"]

#: Up to this many maps each panel is a 3-view ('ortho') glass brain, beyond it a single
#: axial ('z') projection, so that 100 maps still fit one readable figure.
ORTHO_MAX = 24


def _savefig(fig: Any, path: str | os.PathLike, dpi: int) -> None:
    """Save ``fig`` at its own size (white background), whatever the process' rcParams say.

    Importing NiMARE sets matplotlib's ``savefig.bbox`` to "tight" for the whole process, which
    crops every later figure to its content: the PNG would then depend on what else was imported.
    """
    import matplotlib

    with matplotlib.rc_context({"savefig.bbox": "standard"}):
        fig.savefig(path, dpi=dpi, facecolor="white")


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


def _panel_input(item, threshold: float, width_chars: int):
    """Title, finite float32 image (NaN -> 0) and symmetric colour limit of one z-map."""
    import nibabel as nib
    import numpy as np

    image_id, title, path = item
    contrast = str(title).strip() if title is not None and str(title).strip() not in ("", "nan") else ""
    label = textwrap.shorten(f"{image_id}: {contrast or '(no contrast)'}", width=width_chars, placeholder="…")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    finite = np.isfinite(data)
    vmax = float(np.max(np.abs(data[finite]))) if finite.any() else 1.0
    vmax = max(vmax, threshold + 1e-3, 1e-3)
    img = nib.Nifti1Image(np.where(finite, data, 0).astype(np.float32), img.affine)
    return label, img, vmax


def _glass_kwargs(mode: str, threshold: float) -> dict:
    """The ``plot_glass_brain`` arguments of every panel (the map and its colour limits aside)."""
    return {
        "display_mode": mode,
        "threshold": threshold,
        "plot_abs": False,
        "colorbar": mode == "ortho",
        "cmap": "cold_hot",
        "annotate": False,
        "black_bg": False,
    }


def _panel_figure(panel_w: float, panel_h: float, dpi: int):
    """The white figure of one glass-brain panel."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(panel_w, panel_h), dpi=dpi, facecolor="white")


def _rgba(fig):
    """Draw ``fig`` (Agg) and return a copy of its RGBA pixels."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _plot_glass(fig, img, vmax: float, mode: str, threshold: float):
    """``plot_glass_brain`` of one map into ``fig``; return the display."""
    from nilearn import plotting

    return plotting.plot_glass_brain(img, figure=fig, vmin=-vmax, vmax=vmax, **_glass_kwargs(mode, threshold))


def _panel(img, vmax: float, mode: str, panel_w: float, panel_h: float, dpi: int, threshold: float):
    """One glass brain drawn by ``plot_glass_brain`` in its own figure, as an RGBA array."""
    import matplotlib.pyplot as plt

    pfig = _panel_figure(panel_w, panel_h, dpi)
    try:
        _plot_glass(pfig, img, vmax, mode, threshold)
        return _rgba(pfig)
    finally:
        plt.close(pfig)


def _schematic_as_collection(ax) -> bool:
    """Replace the brain schematic's path patches on ``ax`` by one PathCollection drawn alike.

    nilearn's schematic is ~260 ``PathPatch`` per view; matplotlib's per-artist drawing
    overhead (a graphics context and a transform chain each) is ~1/3 of a reused panel.
    One ``PathCollection`` with the same paths, edge colours (alpha included), line
    widths, transform, join and cap style, clipped to the Axes box as the patches are
    (``add_patch`` and ``add_collection`` both clip to the Axes background rectangle),
    makes the same Agg calls path by path, in the same order and z-order. Done only
    when the patches are all that is plotted on ``ax`` and share those properties;
    returns whether it was done (the pixels are checked by :func:`_first_panel`).
    """
    from matplotlib.collections import PathCollection
    from matplotlib.patches import PathPatch

    patches = list(ax.patches)
    others = (ax.images, ax.lines, ax.collections, ax.texts, ax.artists, ax.tables, ax.child_axes)
    if not patches or any(len(a) for a in others):
        return False
    first = patches[0]
    for p in patches:
        if (
            type(p) is not PathPatch
            or p.get_transform() is not first.get_transform()
            or p.get_facecolor()[3] != 0
            or p.get_linestyle() != "solid"
            or p.get_hatch()
            or p.get_sketch_params() is not None
            or p.get_path_effects()
            or not p.get_visible()
            or not p.get_clip_on()
            or p.get_clip_path() is not None
            or p.get_clip_box() is None
            or p.get_clip_box().bounds != ax.bbox.bounds
            or (p.get_joinstyle(), p.get_capstyle(), p.get_antialiased(), p.get_zorder())
            != (first.get_joinstyle(), first.get_capstyle(), first.get_antialiased(), first.get_zorder())
        ):
            return False
    collection = PathCollection(
        [p.get_path() for p in patches],
        edgecolors=[p.get_edgecolor() for p in patches],
        linewidths=[p.get_linewidth() for p in patches],
        facecolors="none",
        transform=first.get_transform(),
        joinstyle=first.get_joinstyle(),
        capstyle=first.get_capstyle(),
        antialiaseds=first.get_antialiased(),
        zorder=first.get_zorder(),
    )
    for p in patches:
        p.remove()
    ax.add_collection(collection, autolim=False)  # clipped to ax.patch, as add_patch does
    return True


class _ReusedGlassBrain:
    """One nilearn glass-brain display whose overlay is swapped map after map.

    ``plot_glass_brain`` builds a new display for every map, and with it nilearn's brain
    schematic: ~260 matplotlib patches per view whose ``Axes.add_patch`` (data-limit
    updates) costs most of a panel. Here the first map is drawn by ``plot_glass_brain``
    (its pixels: :attr:`first`); :meth:`make_reusable` then removes its overlay (the
    schematic and the axes layout do not depend on the map) and records that state, and
    :meth:`render` does for each map what ``plot_glass_brain`` does after building the
    display: ``display.add_overlay`` with the map's colour limits, then removes what the
    overlay added so that the next map starts from the same state; the schematic is drawn
    by one collection per view (:func:`_schematic_as_collection`). :func:`_first_panel`
    checks :meth:`render` of the first map against :attr:`first` pixel for pixel, and
    :func:`_glass_rasters` falls back to ``plot_glass_brain`` per map on any difference.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The first map (finite values).
    vmax : float
        Its colour limit.
    mode : {"ortho", "z"}
        nilearn ``display_mode``.
    panel_w, panel_h : float
        Figure size in inches.
    dpi : int
        Figure resolution.
    threshold : float
        |z| below which voxels are not drawn.
    """

    def __init__(
        self, img, vmax: float, mode: str, panel_w: float, panel_h: float, dpi: int, threshold: float
    ):
        self.mode = mode
        self.threshold = threshold
        self.fig = _panel_figure(panel_w, panel_h, dpi)
        try:
            self.display = _plot_glass(self.fig, img, vmax, mode, threshold)
            self.first = _rgba(self.fig)
        except BaseException:
            self.close()
            raise

    def make_reusable(self) -> None:
        """Remove the first map's overlay, draw the schematic as one collection per view, record the state.

        Raises
        ------
        RuntimeError
            If the display does not hold what nilearn 0.13's ``plot_glass_brain`` adds:
            one image and one set of object bounds per view on top of the schematic's.
        """
        views = self.display.axes.values()
        # BaseAxes._object_bounds (private): the schematic's bounds, then those of each
        # overlay (its supra-threshold voxels), which set the view limits and, through the
        # display's axes locator, the widths of the views. Cut back to the schematic's
        # after each map so that one map's extent (voxels outside the schematic) does not
        # change the next panels; nilearn has no public way to drop bounds.
        if any(len(dax.ax.images) != 1 or len(getattr(dax, "_object_bounds", ())) != 2 for dax in views):
            raise RuntimeError("unexpected glass-brain display: not one overlay image and bounds per view")
        keep = [self.display.frame_axes, *(dax.ax for dax in views)]
        for ax in list(self.fig.axes):
            if ax not in keep:
                ax.remove()  # the colour bar's axes
        for dax in views:
            dax.ax.images[0].remove()
            del dax._object_bounds[1:]
            dax.ax.axis(dax.get_object_bounds())  # the limits nilearn set from the schematic
            _schematic_as_collection(dax.ax)
        self._clear_colorbar_flag()
        self._axes = list(self.fig.axes)
        self._children = {id(ax): list(ax.get_children()) for ax in self._axes}
        self._limits = {id(ax): (ax.get_xlim(), ax.get_ylim()) for ax in self._axes}
        self._bounds = {key: list(dax._object_bounds) for key, dax in self.display.axes.items()}

    def _clear_colorbar_flag(self) -> None:
        """Mark the display as without colour bar, as before any overlay."""
        # BaseSlicer._colorbar (private): add_overlay refuses a second colour bar and the
        # axes locator leaves room for one while it is set; no public way to clear it
        if not hasattr(self.display, "_colorbar"):
            raise RuntimeError("nilearn display without _colorbar")
        self.display._colorbar = False

    def render(self, img, vmax: float):
        """Draw one map; return the RGBA array of ``plot_glass_brain(img, vmin=-vmax, vmax=vmax, ...)``.

        Parameters
        ----------
        img : nibabel.Nifti1Image
            3D map with finite values.
        vmax : float
            Colour limit (the colour bar spans ``-vmax`` to ``vmax``).

        Returns
        -------
        numpy.ndarray
            ``(height, width, 4)`` uint8 pixels of the figure.
        """
        from nilearn.image import check_niimg_3d

        kw = _glass_kwargs(self.mode, self.threshold)
        # what plot_glass_brain passes to add_overlay: with vmin == -vmax its colour-bar
        # range is (vmin, vmax) (nilearn.plotting._utils.get_colorbar_and_data_ranges),
        # the overlay is resampled continuously and shown with nearest interpolation, the
        # tick format and transparency are add_overlay's defaults
        try:
            self.display.add_overlay(
                check_niimg_3d(img, dtype="auto"),
                threshold=self.threshold,
                colorbar=kw["colorbar"],
                cmap=kw["cmap"],
                vmin=-vmax,
                vmax=vmax,
                cbar_vmin=-vmax,
                cbar_vmax=vmax,
                interpolation="nearest",
                resampling_interpolation="continuous",
            )
            return _rgba(self.fig)
        finally:
            self._reset()

    def _reset(self) -> None:
        """Remove what the last overlay added (images, colour-bar axes, bounds, limits)."""
        for ax in list(self.fig.axes):
            if ax not in self._axes:
                ax.remove()  # the colour bar's axes
        for ax in self._axes:
            kept = {id(a) for a in self._children[id(ax)]}
            for artist in ax.get_children():
                if id(artist) not in kept:
                    artist.remove()
            xlim, ylim = self._limits[id(ax)]
            ax.set_xlim(xlim)
            ax.set_ylim(ylim)
        for key, dax in self.display.axes.items():
            dax._object_bounds[:] = self._bounds[key]  # private, see make_reusable
        self._clear_colorbar_flag()
        if list(self.fig.axes) != self._axes or any(
            list(ax.get_children()) != self._children[id(ax)] for ax in self._axes
        ):
            raise RuntimeError("the glass-brain display could not be reset to its state without overlay")

    def close(self) -> None:
        """Close the figure."""
        import matplotlib.pyplot as plt

        plt.close(self.fig)


def _first_panel(img, vmax: float, args: tuple):
    """The first map's ``plot_glass_brain`` RGBA and a :class:`_ReusedGlassBrain` drawing it alike, or None (logged)."""
    import gc

    import numpy as np

    reused = _ReusedGlassBrain(img, vmax, *args)
    try:
        reused.make_reusable()
        if np.array_equal(reused.render(img, vmax), reused.first):
            # its ~800 schematic artists, walked by each gc.collect() that nilearn runs per
            # map, join the frozen heap (given back when _glass_rasters' frozen_gc ends)
            gc.freeze()
            return reused.first, reused
        logger.warning("glass brain on a reused display differs from plot_glass_brain's: one figure per map")
    except Exception:  # whatever fails here, plot_glass_brain per map still works
        logger.warning("reused glass-brain display failed: one figure per map", exc_info=True)
    reused.close()
    return reused.first, None


def _glass_rasters(
    items, mode: str, panel_w: float, panel_h: float, dpi: int, threshold: float, width_chars: int
):
    """``(title, RGBA array)`` of every map's glass brain, drawn on one reused display.

    The first map is drawn by ``plot_glass_brain`` and again on the same display made
    reusable (:class:`_ReusedGlassBrain`); the other maps are drawn on that display if the
    two are equal pixel for pixel, else (another nilearn or matplotlib) or if the reused
    display fails, each map by ``plot_glass_brain`` in its own figure as before, with a
    warning. Maps are read one at a time; the heap is frozen for the garbage collector
    while they are drawn (nilearn runs ``gc.collect()`` for every image it reads).
    """
    from nvmeta.meta import frozen_gc

    args = (mode, panel_w, panel_h, dpi, threshold)
    out = []
    reused = None
    with frozen_gc():
        try:
            for k, item in enumerate(items):
                label, img, vmax = _panel_input(item, threshold, width_chars)
                rgba = None
                if reused is not None:
                    try:
                        rgba = reused.render(img, vmax)
                    except Exception:  # fall back as for a pixel difference
                        logger.warning("reused glass-brain display failed: one figure per map", exc_info=True)
                        reused.close()
                        reused = None
                if rgba is None:
                    if k == 0 and len(items) > 1:
                        rgba, reused = _first_panel(img, vmax, args)
                    else:
                        rgba = _panel(img, vmax, *args)
                out.append((label, rgba))
        finally:
            if reused is not None:
                reused.close()
    return out


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
            _savefig(fig, tmp, dpi)
        plt.close(fig)
        return out_png

    ncols, nrows, mode = grid_shape(n)
    panel_w, panel_h = (5.2, 2.0) if mode == "ortho" else (2.0, 2.4)
    title_pad = 0.35  # inches above each panel for its title
    width_chars = 52 if mode == "ortho" else 28
    fontsize = 9 if mode == "ortho" else 7
    # nilearn runs gc.collect() several times per plot: ~0.5 s each with the objects that
    # nilearn/matplotlib/scipy keep alive, and growing with every panel's artists if they
    # all live in one figure. So the glass brains are drawn in a small figure of their own
    # (one display reused for all maps, see _glass_rasters) and pasted into the grid as
    # images, with the heap frozen while they are drawn so that those collections stay cheap.
    importlib.import_module("nilearn.plotting")
    panels = _glass_rasters(items, mode, panel_w, panel_h, dpi, threshold, width_chars)
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
            # not drawn either way (axis off), but a visible y axis has its ticks laid out
            # for every title placement (~1/5 of the grid's drawing); same pixels
            ax.xaxis.set_visible(False)
            ax.yaxis.set_visible(False)
            ax.set_title(label, fontsize=fontsize, pad=2)
        fig.suptitle(
            suptitle or f"{n} input z-map{'s' if n != 1 else ''} (|z| > {threshold:g})",
            y=1 - 0.2 * head / fig_h,
            va="top",
            fontsize=12,
        )
        with atomic_path(out_png) as tmp:
            _savefig(fig, tmp, dpi)
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


# ---------------------------------------------------------------------------------------------
# Inputs at scale: one streaming pass over the included z-maps

#: Columns of ``figures/inputs.tsv``, in order (one row per selected image).
INPUT_TABLE_COLUMNS = [
    "image_id",
    "collection_id",
    "contrast",
    "n",
    "max_abs_z",
    "coverage",
    "included",
    "reason",
    "mean_r",
]
#: At most this many values (maps x voxels, float32: 80 MB) are held for the correlation matrix;
#: beyond it the correlations use a regular subsample of the mask's voxels (said on the figure).
CORR_VALUE_BUDGET = 20_000_000
#: Axial cuts of the mean z and coverage mosaics: this many, evenly spaced between the 5th and
#: 95th percentiles of the template mask's z coordinates (MNI 2 mm: -44 ... 66 mm).
N_INPUT_CUTS = 8


@dataclass
class InputSummary:
    """What :func:`input_summary` computes in one pass over the included z-maps.

    Attributes
    ----------
    n_maps : int
        Included maps read.
    mean_z, count : numpy.ndarray
        Per template-mask voxel (mask order): mean z over the maps with data there (NaN where none
        has) and the number of maps with data.
    corr : numpy.ndarray
        (m, m) Pearson correlations between maps on the voxels where both have data (NaN when
        fewer than 3 shared voxels or a constant map), maps ordered by collection then id.
    corr_ids, corr_collections : list
        Image id and collection id of each row of ``corr``.
    corr_voxels, n_mask : int
        Mask voxels the correlations use, and all mask voxels.
    table : pandas.DataFrame
        One row per selected image, columns :data:`INPUT_TABLE_COLUMNS`.
    """

    n_maps: int
    mean_z: Any
    count: Any
    corr: Any
    corr_ids: list
    corr_collections: list
    corr_voxels: int
    n_mask: int
    table: Any


def _even_pick(n: int, k: int):
    """``min(n, k)`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    import numpy as np

    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _prefetch(func: Callable, items: Sequence, workers: int):
    """``func(item)`` for each item, in order, computed ahead by ``workers`` threads while the caller
    consumes (at most ``2 * workers`` results held; zlib decompression releases the GIL); serial when
    ``workers < 1``."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers < 1:
        yield from map(func, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(func, item))
            if len(pending) >= 2 * workers:
                break
        for item in it:
            yield pending.popleft().result()
            pending.append(pool.submit(func, item))
        while pending:
            yield pending.popleft().result()


def _pairwise_corr(x, m, chunk: int = 50_000):
    """Pearson r of every pair of rows of ``x`` on the columns where both rows have data.

    ``x`` (float32, 0 where missing) and ``m`` (bool, data present) are (maps, voxels). Sums over
    shared voxels are matrix products (float64, over voxel chunks); pairs with fewer than 3 shared
    voxels or no variance get NaN.
    """
    import numpy as np

    k = x.shape[0]
    n = np.zeros((k, k))
    sx = np.zeros(
        (k, k)
    )  # sx[i, j] = sum of x_i over voxels where x_j has data (and x_i: x_i is 0 elsewhere)
    sxx = np.zeros((k, k))
    sxy = np.zeros((k, k))
    for a in range(0, x.shape[1], chunk):
        xc = x[:, a : a + chunk].astype(np.float64)
        mc = m[:, a : a + chunk].astype(np.float64)
        n += mc @ mc.T
        sx += xc @ mc.T
        sxx += (xc * xc) @ mc.T
        sxy += xc @ xc.T
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sx.T / n
        vx = sxx - sx * sx / n
        vy = vx.T
        r = cov / np.sqrt(vx * vy)
    r[(n < 3) | ~(vx > 0) | ~(vy > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _contrast_text(row: dict) -> str:
    texts = [row.get(k) for k in ("contrast_definition", "name")]  # NaN for empty cells
    return next((t.strip() for t in texts if isinstance(t, str) and t.strip()), "")


def input_summary(
    qc_tsv: str | os.PathLike,
    zmap_path_for: Callable[[int], str | os.PathLike],
    qc_json_path_for: Callable[[int], str | os.PathLike],
    mask_img: Any,
    *,
    max_corr_maps: int,
    threads: int = 1,
    value_budget: int = CORR_VALUE_BUDGET,
) -> InputSummary:
    """Mean z, coverage, correlation matrix and per-map table of an analysis' inputs, in one pass.

    Memory is O(voxels) for the mean and coverage, O(m²) for the matrix and at most ``value_budget``
    float32 values for the maps' sampled voxels (m = ``min(included maps, max_corr_maps)``).

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' ``qc.tsv`` (every selected image, its status and reason, coverage, max \\|z\\|).
    zmap_path_for, qc_json_path_for : callable
        Image id -> its ``zmap.nii.gz`` (template grid, NaN = no data) / ``qc.json`` (holds ``n``,
        the one resolved sample size).
    mask_img : nibabel image
        The template mask (voxels > 0).
    max_corr_maps : int
        At most this many maps in the correlation matrix: beyond it, maps spread evenly over the
        collection-ordered list.
    threads : int, default=1
        Threads reading maps ahead.
    value_budget : int
        See :data:`CORR_VALUE_BUDGET`.

    Returns
    -------
    InputSummary
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd

    qc = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str, "reason": str}, keep_default_na=True)
    qc["image_id"] = qc["image_id"].astype(int)
    included = qc["status"].astype(str).str.strip() == "included"
    mask = np.asarray(mask_img.dataobj) > 0
    n_mask = int(mask.sum())

    inc = qc[included].copy()
    inc["_cid"] = pd.to_numeric(inc.get("collection_id"), errors="coerce")
    inc = inc.sort_values(["_cid", "image_id"], na_position="last", kind="stable")
    ids = inc["image_id"].tolist()
    cids = [None if pd.isna(c) else int(c) for c in inc["_cid"]]
    pick = _even_pick(len(ids), max_corr_maps)
    slot = {int(j): s for s, j in enumerate(pick)}
    n_vox = n_mask if len(pick) * n_mask <= value_budget else max(1000, value_budget // max(1, len(pick)))
    vox = _even_pick(n_mask, n_vox)
    x = np.zeros((len(pick), len(vox)), dtype=np.float32)
    m = np.zeros((len(pick), len(vox)), dtype=bool)
    total = np.zeros(n_mask, dtype=np.float64)
    count = np.zeros(n_mask, dtype=np.int32)

    def read(image_id: int):
        return np.asarray(nib.load(zmap_path_for(image_id)).dataobj, dtype=np.float32)[mask]

    for j, v in enumerate(_prefetch(read, ids, threads)):
        ok = np.isfinite(v)
        total[ok] += v[ok]
        count += ok
        s = slot.get(j)
        if s is not None:
            x[s] = np.where(ok, v, 0.0)[vox]
            m[s] = ok[vox]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_z = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    corr = _pairwise_corr(x, m) if len(pick) else np.zeros((0, 0))
    corr_ids = [ids[j] for j in pick]
    with warnings.catch_warnings():  # a map sharing no voxel with any other: mean_r is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        off = corr.copy()
        np.fill_diagonal(off, np.nan)
        mean_r = dict(zip(corr_ids, np.nanmean(off, axis=1), strict=True)) if len(pick) > 1 else {}

    rows = []
    for r in qc.to_dict("records"):
        image_id = int(r["image_id"])
        qj = json.loads(Path(qc_json_path_for(image_id)).read_text())
        cid = pd.to_numeric(r.get("collection_id"), errors="coerce")
        reason = r.get("reason")
        ok = str(r.get("status", "")).strip() == "included"
        rows.append(
            {
                "image_id": image_id,
                "collection_id": None if pd.isna(cid) else int(cid),
                "contrast": _contrast_text(r),
                "n": qj.get("n"),
                "max_abs_z": r.get("max_abs_z"),
                "coverage": r.get("coverage"),
                "included": ok,
                "reason": "" if ok or not isinstance(reason, str) else reason,
                "mean_r": mean_r.get(image_id, float("nan")),
            }
        )
    table = pd.DataFrame(rows, columns=INPUT_TABLE_COLUMNS)
    table["collection_id"] = table["collection_id"].astype("Int64")
    table["n"] = pd.to_numeric(table["n"], errors="coerce").astype("Int64")
    return InputSummary(
        n_maps=len(ids),
        mean_z=mean_z,
        count=count,
        corr=corr,
        corr_ids=corr_ids,
        corr_collections=[cids[j] for j in pick],
        corr_voxels=len(vox),
        n_mask=n_mask,
        table=table,
    )


def _volume(values, mask, affine):
    """A NIfTI of ``values`` (mask order) on the mask's grid, NaN outside the mask."""
    import nibabel as nib
    import numpy as np

    vol = np.full(mask.shape, np.nan, dtype=np.float32)
    vol[mask] = values
    return nib.Nifti1Image(vol, affine)


def _save(display_or_fig, out_png: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    fig = getattr(display_or_fig, "frame_axes", None)
    fig = fig.figure if fig is not None else display_or_fig
    with atomic_path(out_png) as tmp:
        _savefig(fig, tmp, dpi)
    plt.close(fig)


def plot_mean_z(
    summary: InputSummary, mask_img: Any, out_png: str | os.PathLike, title: str, dpi: int = 100
) -> Path:
    """Axial mosaic of the mean z map (signed, symmetric colour bar labelled "mean z")."""
    import matplotlib.pyplot as plt
    import numpy as np
    from nilearn import plotting

    mask = np.asarray(mask_img.dataobj) > 0
    img = _volume(summary.mean_z, mask, mask_img.affine)
    finite = np.isfinite(summary.mean_z)
    vmax = float(np.max(np.abs(summary.mean_z[finite]))) if finite.any() else 1.0
    fig = plt.figure(figsize=(14, 3.2), facecolor="white")
    display = plotting.plot_stat_map(
        _nan_to_zero(img),
        display_mode="z",
        cut_coords=input_cuts(mask_img),
        figure=fig,
        cmap="cold_hot",
        vmax=max(vmax, 1e-3),
        colorbar=True,
        title=None,
        black_bg=False,
        annotate=True,
    )
    if getattr(display, "_cbar", None) is not None:
        _label_colorbar(display._cbar, "mean z")
    fig.suptitle(title, fontsize=12, y=0.99)
    _save(fig, Path(out_png), dpi)
    return Path(out_png)


def _label_colorbar(cbar, text: str) -> None:
    """Label a nilearn display's colour bar on its left side (the right edge of the figure clips)."""
    cbar.ax.yaxis.set_label_position("left")
    cbar.ax.set_ylabel(text, fontsize=10)


def input_cuts(mask_img: Any, n: int = N_INPUT_CUTS) -> list[float]:
    """``n`` axial cut coordinates (mm) through the template mask (see :data:`N_INPUT_CUTS`)."""
    import numpy as np

    ijk = np.argwhere(np.asarray(mask_img.dataobj) > 0)
    z = ijk @ mask_img.affine[2, :3] + mask_img.affine[2, 3]
    lo, hi = np.percentile(z, [5, 95])
    return [float(round(c)) for c in np.linspace(lo, hi, n)]


def _nan_to_zero(img):
    import nibabel as nib
    import numpy as np

    data = np.asarray(img.dataobj, dtype=np.float32)
    return nib.Nifti1Image(np.where(np.isfinite(data), data, 0.0).astype(np.float32), img.affine)


def plot_coverage(
    summary: InputSummary, mask_img: Any, out_png: str | os.PathLike, title: str, dpi: int = 100
) -> Path:
    """Axial mosaic of how many maps have data at each template-mask voxel (0..n, colour bar labelled)."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from nilearn import plotting

    mask = np.asarray(mask_img.dataobj) > 0
    n = max(1, summary.n_maps)
    vol = np.zeros(mask.shape, dtype=np.float32)
    vol[mask] = summary.count
    img = nib.Nifti1Image(vol, mask_img.affine)
    fig = plt.figure(figsize=(14, 3.2), facecolor="white")
    # Voxels no map covers are left transparent (threshold 0.5): the anatomy shows through there.
    display = plotting.plot_stat_map(
        img,
        display_mode="z",
        cut_coords=input_cuts(mask_img),
        figure=fig,
        cmap="viridis",
        threshold=0.5,
        vmin=0,
        vmax=n,
        symmetric_cbar=False,
        cbar_tick_format="%d",
        colorbar=True,
        black_bg=False,
        annotate=True,
    )
    if getattr(display, "_cbar", None) is not None:
        _label_colorbar(display._cbar, "maps with data")
    fig.suptitle(title, fontsize=12, y=0.99)
    _save(fig, Path(out_png), dpi)
    return Path(out_png)


def plot_correlation(summary: InputSummary, out_png: str | os.PathLike, title: str, dpi: int = 100) -> Path:
    """The map x map correlation matrix, maps ordered by collection, collection boundaries drawn."""
    import matplotlib.pyplot as plt

    k = len(summary.corr_ids)
    side = float(min(12.0, max(6.0, 4 + k / 12)))
    fig, ax = plt.subplots(figsize=(side + 1.6, side), facecolor="white")
    if k == 0:
        ax.text(0.5, 0.5, "no included map", ha="center", va="center", fontsize=14, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        im = ax.imshow(summary.corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("Pearson r (voxels where both maps have data)", fontsize=10)
        cols = summary.corr_collections
        starts = [i for i in range(k) if i == 0 or cols[i] != cols[i - 1]]
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="black", lw=0.6)
            ax.axvline(s - 0.5, color="black", lw=0.6)
        bounds = starts + [k]
        if k <= 40:
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            ax.set_xticklabels([str(i) for i in summary.corr_ids], rotation=90, fontsize=7)
            ax.set_yticklabels([str(i) for i in summary.corr_ids], fontsize=7)
            ax.set_xlabel("image id (ordered by collection)")
        elif len(starts) <= 40:
            centres = [(a + b - 1) / 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            labels = ["?" if cols[a] is None else str(cols[a]) for a in starts]
            ax.set_yticks(centres)
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xticks([])
            ax.set_ylabel("collection id")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"maps ordered by collection ({len(starts)} collections)")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    _save(fig, Path(out_png), dpi)
    return Path(out_png)


def _message_figure(out_png: Path, text: str, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(9, 2), facecolor="white")
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, wrap=True)
    _save(fig, out_png, dpi)
    return out_png


def input_figures(
    qc_tsv: str | os.PathLike,
    zmap_of: Callable[[int], Path],
    qc_of: Callable[[int], Path],
    mask_path: str | os.PathLike,
    out: dict[str, str | os.PathLike],
    cfg: dict,
    analysis: str,
    threads: int = 1,
    logger: logging.Logger | None = None,
) -> InputSummary:
    """Every input figure and the per-map table of one analysis (rule ``input_figures``).

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' QC table.
    zmap_of, qc_of : callable
        ``image_id -> path`` of the image's z-map and qc.json, over the rule's declared inputs
        (:func:`nvmeta.workflow.rule_inputs.path_lookup`).
    mask_path : path-like
        The template mask.
    out : dict
        Output paths: ``table`` (TSV), ``mean_z``, ``coverage``, ``correlation``, ``glass`` (PNGs).
    cfg : dict
        The ``figures`` config block (``glass_brain_max_maps``, ``correlation_max_maps``).
    analysis : str
        Analysis name (figure titles).
    threads : int, default=1
        Threads reading maps ahead.
    logger : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    InputSummary
    """
    import nibabel as nib
    import numpy as np

    from nvmeta.io import write_tsv

    log = logger or _LOGGER
    mask_img = nib.load(mask_path)
    importlib.import_module("nilearn.plotting")
    from nvmeta.meta import frozen_gc

    s = input_summary(
        qc_tsv,
        zmap_of,
        qc_of,
        mask_img,
        max_corr_maps=int(cfg["correlation_max_maps"]),
        threads=threads,
    )
    write_tsv(out["table"], s.table)
    n = s.n_maps
    k = len(s.corr_ids)
    with frozen_gc():
        if n == 0:
            for key in ("mean_z", "coverage"):
                _message_figure(Path(out[key]), f"{analysis}: no included z-map")
        else:
            plot_mean_z(
                s,
                mask_img,
                out["mean_z"],
                f"{analysis}: mean z of {n} included map{'s' * (n != 1)} (per voxel, over the maps with data)",
            )
            full = float(np.mean(s.count == n)) if s.n_mask else 0.0
            plot_coverage(
                s,
                mask_img,
                out["coverage"],
                f"{analysis}: maps with data per voxel (of {n}); {100 * full:.0f} % of the template mask covered by every map; no colour: no map",
            )
        what = (
            f"{k} × {k} maps"
            if k == n
            else f"{k} of {n} maps, evenly spaced in collection order (figures.correlation_max_maps = {cfg['correlation_max_maps']})"
        )
        vox = (
            f"all {s.n_mask:,} mask voxels"
            if s.corr_voxels == s.n_mask
            else f"a regular subsample of {s.corr_voxels:,} of {s.n_mask:,} mask voxels"
        )
        plot_correlation(
            s,
            out["correlation"],
            f"{analysis}: correlation between input z-maps, ordered by collection\n{what}\non {vox}",
        )
    cap = int(cfg["glass_brain_max_maps"])
    if n <= cap:
        items = inputs_from_qc(qc_tsv, zmap_of)
        glass_brain_grid(
            items, out["glass"], suptitle=f"{analysis}: {n} input z-map{'s' * (n != 1)} (|z| > 3)"
        )
    else:
        _message_figure(
            Path(out["glass"]),
            f"{analysis}: {n} included maps, more than figures.glass_brain_max_maps = {cap}:\n"
            "glass brains not drawn (see the mean z, coverage and correlation figures and inputs.tsv)",
        )
        log.info("%d included maps > figures.glass_brain_max_maps = %d: glass brains not drawn", n, cap)
    log.info(
        "%d included maps summarised (mean z, coverage); correlation matrix of %d maps on %d voxels; table of %d images",
        n,
        k,
        s.corr_voxels,
        len(s.table),
    )
    return s
