"""Brain mosaics drawn alike in every figure of a run (meta-analysis, effect sizes, CBMA, ICA, inputs).

Each row of slices is nilearn's ``plot_stat_map`` into an Axes of its own, with the title in a strip
above the slices (never over the L/R labels), one colour bar labelled with what it measures (drawn
here from the same colour map and limits, so that it can be labelled through matplotlib's public
API), outlines with a legend, and a colour limit that a few extreme voxels cannot take over
(:func:`robust_scale`: the limit and what it clips are written on the figure). Every figure is drawn
and saved under :func:`pinned` rcParams, so that a PNG does not depend on what the process imported
before (NiMARE's import sets ``savefig.bbox: tight``, which crops figures to their content).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.io import atomic_path

__all__ = [
    "ROBUST_PERCENTILE",
    "Outline",
    "Scale",
    "colorbar",
    "mosaic_row",
    "nice_ticks",
    "pinned",
    "robust_scale",
    "save",
]

#: The automatic colour limit is this percentile of \|value\| over the voxels a figure shows: the
#: brightest 1 % are drawn in the end colour (the figure says up to which value), so that a handful
#: of extreme voxels cannot turn every other significant voxel into the colour of 0.
ROBUST_PERCENTILE = 99.0

#: rcParams every figure is drawn and saved with (on top of matplotlib's defaults).
PINNED_RC = {
    "savefig.bbox": "standard",
    "savefig.dpi": 100,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
    "figure.dpi": 100,
}

#: Inches of a mosaic row: the title strip above the slices, the colour bar column at the right.
TITLE_STRIP = 0.62
LEGEND_LINE = 0.3
CBAR_COLUMN = 1.25


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """matplotlib's default style plus :data:`PINNED_RC`, whatever the process' rcParams (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(PINNED_RC):
        yield


def save(fig: Any, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` at its own size, white, atomically; close it."""
    import matplotlib.pyplot as plt

    try:
        with pinned(), atomic_path(Path(out_png)) as tmp:
            fig.savefig(tmp, dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    return Path(out_png)


@dataclass(frozen=True)
class Scale:
    """A colour limit and what it leaves out (:func:`robust_scale`)."""

    vmax: float
    max_abs: float
    n_shown: int
    n_clipped: int
    source: str  # "robust", "fixed" or "none" (nothing to show)

    def note(self, symbol: str = "|z|") -> str:
        """One line for the figure: the colour range and the clipped voxels, if any."""
        if self.source == "none":
            return ""
        how = (
            f"{ROBUST_PERCENTILE:g}th percentile of {symbol} over the {self.n_shown:,} voxels shown"
            if self.source == "robust"
            else "as configured"
        )
        text = f"colour scale to {symbol} = {self.vmax:.3g} ({how})"
        if self.n_clipped:
            text += f"; {self.n_clipped:,} brighter voxel{'s' * (self.n_clipped != 1)}, up to {self.max_abs:.3g}, in the end colour"
        return text


def robust_scale(
    values: Any, threshold: float = 0.0, fixed: float | None = None, percentile: float = ROBUST_PERCENTILE
) -> Scale:
    """The colour limit of a map: ``fixed`` if given, else a percentile of \\|value\\| over the shown voxels.

    Parameters
    ----------
    values : array-like
        The map's values (any shape; NaN = no data).
    threshold : float, default=0
        Voxels with \\|value\\| at or below it are not drawn (nilearn's rule) and do not count.
    fixed : float, optional
        A configured limit (``meta.vmax``): used as is.
    percentile : float
        See :data:`ROBUST_PERCENTILE`.

    Returns
    -------
    Scale
        ``vmax`` is always above ``threshold`` (a map whose shown voxels are all within a hair of
        the threshold would otherwise have an empty colour range).
    """
    a = np.abs(np.asarray(values, dtype=np.float64))
    shown = a[np.isfinite(a) & (a > threshold)]
    floor = float(threshold) * 1.05 + 1e-6
    if shown.size == 0:
        vmax = float(fixed) if fixed else max(floor, float(threshold) + 1.0)
        return Scale(vmax, 0.0, 0, 0, "none")
    top = float(shown.max())
    if fixed:
        vmax, source = float(fixed), "fixed"
    else:
        vmax, source = float(np.percentile(shown, percentile)), "robust"
    vmax = max(vmax, floor)
    return Scale(vmax, top, int(shown.size), int((shown > vmax).sum()), source)


def nice_ticks(vmin: float, vmax: float, marks: Sequence[float] = (), n: int = 5) -> list[float]:
    """About ``n`` round ticks from ``vmin`` to ``vmax``, the two ends and ``marks`` (e.g. ±threshold).

    A tick closer than 11 % of the range to an end or a mark is dropped, so that labels never
    overprint (a threshold of 3 on a ±380 bar gave "-3" and "3" on top of each other).
    """
    from matplotlib.ticker import MaxNLocator

    span = float(vmax - vmin) or 1.0
    gap = 0.11 * span
    keep: list[float] = [float(vmin), float(vmax)]
    for m in marks:
        if vmin < m < vmax and all(abs(m - k) > gap for k in keep):
            keep.append(float(m))
    for t in MaxNLocator(n).tick_values(vmin, vmax):
        if vmin <= t <= vmax and all(abs(t - k) > gap for k in keep):
            keep.append(float(t))
    return sorted(keep)


def colorbar(
    fig: Any,
    rect: Sequence[float],
    cmap: Any,
    vmin: float,
    vmax: float,
    label: str,
    *,
    hidden: tuple[float, float] | None = None,
    marks: Sequence[float] = (),
    fmt: Any = "{:.3g}",
    ticks: Sequence[float] | None = None,
):
    """A labelled vertical colour bar of ``cmap`` on ``[vmin, vmax]`` in the figure rectangle ``rect``.

    ``hidden`` greys the range that is not drawn (\\|value\\| at or below the display threshold).
    """
    import matplotlib as mpl
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = fig.add_axes(list(rect))
    sm = ScalarMappable(
        norm=Normalize(vmin=vmin, vmax=vmax), cmap=mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    )
    cb = fig.colorbar(sm, cax=cax)
    if hidden is not None:
        lo, hi = max(vmin, hidden[0]), min(vmax, hidden[1])
        if hi > lo:
            cax.axhspan(lo, hi, facecolor="0.55", edgecolor="none")
    cb.set_ticks(list(ticks) if ticks is not None else nice_ticks(vmin, vmax, marks))
    cb.set_ticklabels([fmt(t) if callable(fmt) else fmt.format(t) for t in cb.get_ticks()])
    cb.ax.tick_params(labelsize=9)
    cb.set_label(label, fontsize=10)
    return cb


@dataclass(frozen=True)
class Outline:
    """A binary map drawn as an outline, with its legend entry."""

    img: Any
    colour: str
    label: str
    linestyle: str = "solid"
    linewidth: float = 1.8


def _quiet_empty(display_call):
    """Run a nilearn call; its "empty mask" warning (nothing above the display threshold) is expected
    here (the figure then says so in words) and silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="empty mask", category=UserWarning)
        return display_call()


def mosaic_row(
    fig: Any,
    box: Sequence[float],
    img: Any,
    *,
    cut_coords: Sequence[float],
    title: str,
    subtitle: str = "",
    cmap: Any = "RdBu_r",
    vmin: float,
    vmax: float,
    threshold: float | None,
    cbar_label: str | None,
    cbar_marks: Sequence[float] = (),
    cbar_fmt: Any = "{:.3g}",
    cbar_map: tuple[Any, float, float] | None = None,
    cbar_ticks: Sequence[float] | None = None,
    outlines: Sequence[Outline] = (),
    legend: Sequence[tuple[Any, str]] = (),
    empty_note: str | None = None,
    overlays: Sequence[dict] = (),
    bg_img: Any = None,
):
    """One row of axial slices in ``box`` (left, bottom, width, height; figure fraction).

    Parameters
    ----------
    img : nibabel image
        The map (finite values; 0 or below ``threshold`` = not drawn).
    cut_coords : sequence of float
        Axial cuts (mm).
    title, subtitle : str
        Drawn in the strip above the slices (subtitle smaller, e.g. the colour range).
    cmap, vmin, vmax, threshold
        As ``plot_stat_map``'s; the colour bar uses the same.
    cbar_label : str or None
        Colour bar label; None: no colour bar.
    cbar_marks, cbar_fmt, cbar_ticks
        Further ticks (±threshold always), tick format, or the ticks themselves.
    cbar_map : (cmap, vmin, vmax), optional
        The colour bar's own map and range, when the colours come from an overlay.
    outlines : sequence of Outline
        Contours drawn over the map, each with a legend entry.
    legend : sequence of (handle, label)
        Further legend entries (matplotlib artists used as handles).
    empty_note : str, optional
        Written over the slices (and no colour bar drawn) when nothing exceeds ``threshold``.
    overlays : sequence of dict
        Keyword arguments of further ``display.add_overlay`` calls (e.g. a faded layer).
    bg_img : optional
        Background; default nilearn's MNI152 template.

    Returns
    -------
    nilearn display
    """
    from matplotlib.lines import Line2D
    from nilearn import plotting

    left, bottom, width, height = box
    fig_w, fig_h = fig.get_size_inches()
    with_legend = bool(legend) or bool(outlines)
    strip = (TITLE_STRIP + LEGEND_LINE * with_legend) / fig_h
    column = CBAR_COLUMN / fig_w if cbar_label is not None else 0.0
    layers = [(img, threshold)] + [(o["img"], o.get("threshold")) for o in overlays]
    empty = all(
        t is not None and not np.any(np.abs(np.nan_to_num(np.asarray(i.dataobj))) > t) for i, t in layers
    )
    ax = fig.add_axes([left, bottom, width - column, height - strip])
    kwargs = {} if bg_img is None else {"bg_img": bg_img}
    display = _quiet_empty(
        lambda: plotting.plot_stat_map(
            img,
            display_mode="z",
            cut_coords=list(cut_coords),
            figure=fig,
            axes=ax,
            colorbar=False,
            title=None,
            threshold=threshold,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            symmetric_cbar=False,
            black_bg=False,
            annotate=True,
            **kwargs,
        )
    )
    for extra in overlays:
        _quiet_empty(lambda extra=extra: display.add_overlay(**extra))
    handles = list(legend)
    for o in outlines:
        if np.any(np.asarray(o.img.dataobj) > 0):
            display.add_contours(
                o.img, levels=[0.5], colors=[o.colour], linewidths=o.linewidth, linestyles=o.linestyle
            )
        handles.append((Line2D([], [], color=o.colour, linestyle=o.linestyle, linewidth=2.0), o.label))
    top = bottom + height
    fig.text(left + 0.005, top - 0.06 / fig_h, title, ha="left", va="top", fontsize=12)
    if subtitle:
        fig.text(left + 0.005, top - 0.34 / fig_h, subtitle, ha="left", va="top", fontsize=9, color="0.25")
    if handles:
        fig.legend(
            [h for h, _ in handles],
            [t for _, t in handles],
            loc="upper left",
            bbox_to_anchor=(left, top - 0.56 / fig_h),
            ncol=len(handles),
            fontsize=9,
            frameon=False,
            handlelength=1.8,
            borderaxespad=0.0,
        )
    if empty:
        fig.text(left + (width - column) / 2, bottom + (height - strip) / 2, empty_note or "nothing to show",
                 ha="center", va="center", fontsize=16,
                 bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "0.3"})  # fmt: skip
    elif cbar_label is not None:
        h = height - strip
        own = cbar_map is None
        colorbar(
            fig,
            [left + width - column + 0.12 / fig_w, bottom + 0.12 * h, 0.16 / fig_w, 0.76 * h],
            *((cmap, vmin, vmax) if own else cbar_map),
            cbar_label,
            hidden=None if not (own and threshold) else (-threshold, threshold),
            marks=(*cbar_marks, *((threshold, -threshold) if own and threshold else ())),
            fmt=cbar_fmt,
            ticks=cbar_ticks,
        )
    return display
