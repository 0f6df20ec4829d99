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
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.figures.glass import glass_brain_grid, grid_shape

logger = logging.getLogger(__name__)
_LOGGER = logger  # input_figures() takes a parameter named logger

__all__ = [
    "INPUT_TABLE_COLUMNS",
    "glass_brain_grid",
    "glass_items",
    "grid_shape",
    "input_figures",
    "input_summary",
]


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
#: The mean z mosaic leaves \|mean z\| at or below this uncoloured, so that the anatomy shows.
MEAN_Z_THRESHOLD = 1.0


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


def _volume(values, mask, affine, fill: float = np.nan):
    """A NIfTI of ``values`` (mask order) on the mask's grid, ``fill`` outside the mask."""
    import nibabel as nib

    vol = np.full(mask.shape, fill, dtype=np.float32)
    vol[mask] = values
    return nib.Nifti1Image(np.nan_to_num(vol, nan=0.0), affine)


def plot_mean_z(
    summary: InputSummary,
    mask_img: Any,
    out_png: str | os.PathLike,
    title: str,
    cut_coords: Sequence[float] | None = None,
    dpi: int = 100,
) -> Path:
    """Axial mosaic of the mean z map, drawn as the meta-analysis mosaics are (colours, anatomy, cuts).

    Voxels with \\|mean z\\| at or below :data:`MEAN_Z_THRESHOLD` are left uncoloured so that the
    anatomy shows; the colour limit is robust (:func:`nvmeta.figures.maps.robust_scale`, stated).
    """
    import matplotlib.pyplot as plt

    from nvmeta.figures import maps

    mask = np.asarray(mask_img.dataobj) > 0
    scale = maps.robust_scale(summary.mean_z, MEAN_Z_THRESHOLD)
    with maps.pinned():
        fig = plt.figure(figsize=(14, 3.4))
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 1.0), _volume(summary.mean_z, mask, mask_img.affine),
            cut_coords=cut_coords or input_cuts(mask_img), title=title,
            subtitle=f"|mean z| > {MEAN_Z_THRESHOLD:g} shown; " + scale.note("|mean z|"),
            vmin=-scale.vmax, vmax=scale.vmax, threshold=MEAN_Z_THRESHOLD, cbar_label="mean z",
            empty_note=f"no voxel with |mean z| > {MEAN_Z_THRESHOLD:g}",
        )  # fmt: skip
        return maps.save(fig, Path(out_png), dpi)


def input_cuts(mask_img: Any, n: int = N_INPUT_CUTS) -> list[float]:
    """``n`` axial cut coordinates (mm) through the template mask (see :data:`N_INPUT_CUTS`)."""
    ijk = np.argwhere(np.asarray(mask_img.dataobj) > 0)
    z = ijk @ mask_img.affine[2, :3] + mask_img.affine[2, 3]
    lo, hi = np.percentile(z, [5, 95])
    return [float(round(c)) for c in np.linspace(lo, hi, n)]


def plot_coverage(
    summary: InputSummary,
    mask_img: Any,
    out_png: str | os.PathLike,
    title: str,
    cut_coords: Sequence[float] | None = None,
    dpi: int = 100,
) -> Path:
    """Axial mosaic of the maps with data at each mask voxel: count and relative coverage (NiMARE's).

    The colour bar reads both: the number of maps (0..n) and, in brackets, the fraction of the n
    included maps, which is NiMARE's relative coverage map. Voxels no map covers stay uncoloured.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from nvmeta.figures import maps

    mask = np.asarray(mask_img.dataobj) > 0
    n = max(1, summary.n_maps)
    ticks = sorted(
        {0, n, *(int(t) for t in MaxNLocator(5, integer=True).tick_values(0, n) if 0 < t < 0.9 * n)}
    )
    with maps.pinned():
        fig = plt.figure(figsize=(14, 3.4))
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 1.0), _volume(summary.count.astype(np.float32), mask, mask_img.affine, 0.0),
            cut_coords=cut_coords or input_cuts(mask_img), title=title,
            subtitle="colour: number of included maps with data at the voxel (relative coverage in brackets); no colour: no map",
            cmap="viridis", vmin=0.0, vmax=float(n), threshold=0.5, cbar_label="maps with data",
            cbar_ticks=ticks, cbar_fmt=lambda t: f"{t:.0f} ({100 * t / n:.0f} %)",
        )  # fmt: skip
        return maps.save(fig, Path(out_png), dpi)


def plot_correlation(summary: InputSummary, out_png: str | os.PathLike, title: str, dpi: int = 100) -> Path:
    """The map x map correlation matrix, maps ordered by collection, collection boundaries drawn.

    With fewer than 2 maps there is no pair to correlate: the figure says so instead of a 1 × 1
    "matrix".
    """
    import matplotlib.pyplot as plt

    from nvmeta.figures import maps

    k = len(summary.corr_ids)
    if k < 2:
        return _message_figure(
            Path(out_png),
            f"{title.splitlines()[0]}\nnot drawn: {k} map{'s' * (k != 1)}, no pair of maps to correlate",
            dpi,
        )
    side = float(min(12.0, max(6.0, 4 + k / 12)))
    with maps.pinned():
        fig, ax = plt.subplots(figsize=(side + 1.6, side))
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
        return maps.save(fig, Path(out_png), dpi)


def _message_figure(out_png: Path, text: str, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    from nvmeta.figures import maps

    with maps.pinned():
        fig = plt.figure(figsize=(9, 2))
        fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, wrap=True)
        return maps.save(fig, out_png, dpi)


def glass_items(qc_tsv: str | os.PathLike, zmap_path_for) -> list[tuple[int, str, Path]]:
    """(image_id, title, zmap path) of every included image for the glass brains: name and contrast.

    Both are given (the name often tells maps apart where the contrast is the same for all); the
    grid lifts the words common to every title into its own title.
    """
    from nvmeta.meta import read_included

    out = []
    for r in read_included(qc_tsv).to_dict("records"):
        texts = [
            t.strip()
            for t in (r.get("name"), r.get("contrast_definition"))
            if isinstance(t, str) and t.strip()
        ]
        texts = list(dict.fromkeys(texts))
        out.append((int(r["image_id"]), " — ".join(texts), Path(zmap_path_for(int(r["image_id"])))))
    return out


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
    cut_coords: Sequence[float] | None = None,
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
    cut_coords : sequence of float, optional
        Axial cuts of the mean z and coverage mosaics: the analysis' ``meta.cut_coords``, so that
        they show the slices of the meta-analysis mosaics (default: :func:`input_cuts`).

    Returns
    -------
    InputSummary
    """
    import nibabel as nib

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
            plot_mean_z(s, mask_img, out["mean_z"],
                        f"{analysis}: mean z of {n} included map{'s' * (n != 1)} (per voxel, over the maps with data)",
                        cut_coords)  # fmt: skip
            full = float(np.mean(s.count == n)) if s.n_mask else 0.0
            plot_coverage(s, mask_img, out["coverage"],
                          f"{analysis}: coverage of {n} included map{'s' * (n != 1)}; "
                          f"{100 * full:.0f} % of the template mask has data in every map", cut_coords)  # fmt: skip
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
        glass_brain_grid(
            glass_items(qc_tsv, zmap_of),
            out["glass"],
            suptitle=f"{analysis}: {n} input z-map{'s' * (n != 1)} (|z| > 3)",
        )
    else:
        _message_figure(
            Path(out["glass"]),
            f"{analysis}: {n} included maps, more than figures.glass_brain_max_maps = {cap}:\n"
            "glass brains not drawn (see the mean z, coverage and correlation figures and inputs.tsv)",
        )
        log.info("%d included maps > figures.glass_brain_max_maps = %d: glass brains not drawn", n, cap)
    if k < 2:
        log.info("correlation matrix not drawn: %d map, no pair to correlate", k)
    log.info(
        "%d included maps summarised (mean z, coverage); correlation matrix of %d maps on %d voxels; table of %d images",
        n,
        k,
        s.corr_voxels,
        len(s.table),
    )
    return s
