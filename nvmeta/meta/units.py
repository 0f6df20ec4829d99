"""What an estimator reads: the included maps of an analysis, grouped into combination units.

A *unit* is one map, or (``combine_within: collection``) every map of one collection. The
:class:`Source` hands an estimator the units' vectors over the template-mask voxels, one unit at a
time (memory O(voxels)): z values (:meth:`Source.iter_z`) or effect sizes and their sampling
variances (:meth:`Source.iter_effects`).

Sample sizes are read from each image's ``qc.json`` (key ``n``: the one resolved sample size of the
image, the one its df came from, including ``conversion.n_images`` / ``n_collections`` overrides),
never from the NeuroVault record.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nvmeta.io import read_json

logger = logging.getLogger(__name__)


def mask_data(mask_img: Any) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The template mask image and its boolean array (3-D)."""
    img = nib.load(mask_img) if isinstance(mask_img, str | os.PathLike) else mask_img
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    mask = np.nan_to_num(data.astype(np.float64), nan=0.0) > 0
    return img, mask


def load_vector(path: Path, mask_img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """The mask voxels of a template-grid map as float64 (NaN = no data)."""
    img = nib.load(path)
    shape = img.shape[:3]
    if shape != mask.shape or (len(img.shape) == 4 and img.shape[3] != 1) or len(img.shape) > 4:
        raise ValueError(f"{path}: shape {img.shape} is not the template grid {mask.shape}")
    if not np.allclose(img.affine, mask_img.affine, atol=1e-3):
        raise ValueError(f"{path}: affine differs from the template grid")
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(mask.shape)
    vec = data[mask].astype(np.float64)
    vec[~np.isfinite(vec)] = np.nan
    return vec


def read_included(qc_tsv: str | os.PathLike):
    """Rows of ``qc.tsv`` with ``status == "included"``, in file order.

    Parameters
    ----------
    qc_tsv : path-like
        The analysis' ``qc.tsv``.

    Returns
    -------
    pandas.DataFrame
        Included rows with a fresh index; ``image_id`` as int, ``collection_id`` and
        ``number_of_subjects`` as float (NaN when missing).
    """
    import pandas as pd

    df = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    df = df[df["status"].astype(str).str.strip() == "included"].reset_index(drop=True)
    df["image_id"] = df["image_id"].astype(int)
    for col in ("collection_id", "number_of_subjects"):
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _qc(qc_json: str | os.PathLike) -> dict:
    try:
        qc = read_json(qc_json)
    except (OSError, ValueError):
        return {}
    return qc if isinstance(qc, dict) else {}


def resolved_n(qc_json: str | os.PathLike) -> float | None:
    """The image's one resolved sample size: ``n`` of its ``qc.json`` (None when absent or not > 0)."""
    return _positive(_qc(qc_json).get("n"))


def effect_size_problem(qc_json: str | os.PathLike) -> str | None:
    """Why the image has no g / var(g) maps (``qc.json``'s ``effect_size``), or None when it has them.

    The z-map job writes ``"ok"`` or the reason (``"not computed: ... need n >= 4, got 3"``, ``"no
    degrees of freedom ..."``); its maps are then all NaN. A ``qc.json`` without the key (written
    before effect sizes existed) is taken as having them.
    """
    status = _qc(qc_json).get("effect_size", "ok")
    return None if status == "ok" else str(status or "effect size not computed")


def _positive(n: Any) -> float | None:
    try:
        n = float(n)
    except (TypeError, ValueError):
        return None
    return n if math.isfinite(n) and n > 0 else None


@dataclass
class Unit:
    """One combination unit: a map, or the maps of one collection."""

    label: str
    image_ids: list[int]
    n: float | None  # sample size used for weighting (mean over the unit's maps)


@dataclass
class Plan:
    """The units of an analysis and the dependence notes found while grouping them."""

    units: list[Unit]
    warnings: list[str] = field(default_factory=list)
    n_maps: int = 0
    collections: dict[int, float] = field(default_factory=dict)  # image id -> collection id


def plan_units(
    rows,
    combine_within: str,
    n_for: Callable[[int], float | None] | None = None,
    *,
    needs_n: bool = False,
    problem_for: Callable[[int], str | None] | None = None,
    method: str = "",
    combine_label: str = "Stouffer-combined",
    log: logging.Logger | None = None,
    dependence: str = "none",
) -> Plan:
    """Group the included rows into combination units and collect dependence warnings.

    Parameters
    ----------
    rows : pandas.DataFrame
        :func:`read_included` rows.
    combine_within : {"none", "collection"}
        Dependence handling.
    n_for : callable, optional
        ``image_id -> resolved sample size or None`` (read from qc.json); required when
        ``needs_n``.
    needs_n : bool
        The method needs a sample size per map: maps without one are left out (warning).
    problem_for : callable, optional
        ``image_id -> None`` when the map has what the method reads, else the reason: such maps
        are left out too (one warning naming each with its reason), before the units are formed,
        so that ``n_maps``, the units and the messages count only the maps that are read (the
        effect-size methods: :func:`effect_size_problem`).
    method : str
        Method name (messages).
    combine_label : str
        How the maps of one collection are combined (messages).
    log : logging.Logger, optional
        Defaults to the module logger.
    dependence : {"none", "cluster_robust"}
        ``meta.dependence``: with ``cluster_robust`` the maps of one collection are not treated as
        independent (:mod:`nvmeta.meta.dependence`), so a collection of several maps is logged,
        not warned about.
    """
    log = log or logger
    notes: list[str] = []
    sizes_by_id: dict[int, float] = {}
    if needs_n:
        assert n_for is not None
        n_vals = np.array([n_for(int(i)) or np.nan for i in rows["image_id"]], dtype=float)
        bad = ~(np.isfinite(n_vals) & (n_vals > 0))
        if bad.any():
            ids = rows.loc[bad, "image_id"].tolist()
            msg = f"{method}: {len(ids)} map(s) without a sample size left out: {ids}"
            notes.append(msg)
            log.warning(msg)
        rows = rows.loc[~bad].reset_index(drop=True)
        n_vals = n_vals[~bad]
        sizes_by_id = {int(i): float(n) for i, n in zip(rows["image_id"], n_vals, strict=True)}
    if problem_for is not None:
        problems = {int(i): problem_for(int(i)) for i in rows["image_id"]}
        bad_ids = [i for i, why in problems.items() if why]
        if bad_ids:
            msg = f"{method}: {len(bad_ids)} map(s) without effect sizes left out: " + "; ".join(
                f"{i} ({problems[i]})" for i in bad_ids
            )
            notes.append(msg)
            log.warning(msg)
            rows = rows[~rows["image_id"].astype(int).isin(bad_ids)].reset_index(drop=True)
    groups: dict[str, list[int]] = {}
    sizes: dict[str, list[float]] = {}
    collections: dict[int, float] = {}
    for row in rows.itertuples(index=False):
        cid = row.collection_id
        collections[int(row.image_id)] = float(cid)
        key = f"collection {int(cid)}" if np.isfinite(cid) else f"image {int(row.image_id)}"
        groups.setdefault(key, []).append(int(row.image_id))
        sizes.setdefault(key, []).append(sizes_by_id.get(int(row.image_id), np.nan))
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if combine_within == "collection":
        units = []
        for key, ids in groups.items():
            ns = [x for x in sizes[key] if np.isfinite(x) and x > 0]
            units.append(Unit(key, ids, float(np.mean(ns)) if ns else None))
        if multi:
            log.info(
                "combine_within=collection: "
                + ", ".join(f"{k} ({len(v)} maps)" for k, v in multi.items())
                + f" {combine_label} into one map each"
            )
    elif combine_within == "none":
        units = [
            Unit(f"image {int(r.image_id)}", [int(r.image_id)], sizes_by_id.get(int(r.image_id)))
            for r in rows.itertuples(index=False)
        ]
        notes += _independence_notes(multi, dependence, log)
    else:
        raise ValueError(f"meta.combine_within must be 'none' or 'collection', got {combine_within!r}")
    return Plan(units=units, warnings=notes, n_maps=int(len(rows)), collections=collections)


def _independence_notes(multi: dict[str, list[int]], dependence: str, log: logging.Logger) -> list[str]:
    """A warning per collection of several maps counted as independent units; with
    ``meta.dependence: cluster_robust`` (they are not) one log line instead."""
    if multi and dependence == "cluster_robust":
        log.info(f"{len(multi)} collection(s) contribute several maps: inference clustered by collection "
                 "(meta.dependence: cluster_robust)")  # fmt: skip
        return []
    notes = []
    for key, ids in multi.items():
        msg = (
            f"{key} contributes {len(ids)} maps, treated as independent "
            "(meta.combine_within: none; set it to 'collection' to count each collection once)"
        )
        notes.append(msg)
        log.warning(msg)
    return notes


@dataclass
class Source:
    """The maps an estimator reads, unit by unit, as vectors over the template-mask voxels.

    Parameters
    ----------
    plan : Plan
        The units.
    zmap_path_for : callable
        ``image_id -> Path`` of the image's template-grid z-map.
    mask_img, mask
        Template mask image and its boolean array.
    effect_paths_for : callable, optional
        ``image_id -> (g path, var(g) path)`` (effect-size estimators).

    Attributes
    ----------
    peak_sq : ndarray or None
        Per voxel, the largest squared single-unit statistic over the units, ``z²`` (after a full
        pass of :meth:`iter_z`) or ``g² / var(g)`` (of :meth:`iter_effects`), NaN where no unit has
        data: what :meth:`evidence_bound` needs. Taken while the estimator reads the maps (no
        extra pass); None until one pass has been completed.
    """

    plan: Plan
    zmap_path_for: Callable[[int], Path]
    mask_img: nib.Nifti1Image
    mask: np.ndarray
    effect_paths_for: Callable[[int], tuple[Path, Path]] | None = None
    peak_sq: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def n_units(self) -> int:
        return len(self.plan.units)

    @property
    def n_vox(self) -> int:
        return int(self.mask.sum())

    def load(self, path: Path) -> np.ndarray:
        return load_vector(Path(path), self.mask_img, self.mask)

    def evidence_bound(self, k: np.ndarray) -> np.ndarray | None:
        """``√k · max_i |s_i|`` per voxel: the z that ``k`` units each at the largest single-unit
        statistic ``s`` there (z, or g / √var(g)) give when Stouffer-combined, which bounds every
        z-combining and inverse-variance method (Cauchy–Schwarz). None before a full pass."""
        if self.peak_sq is None:
            return None
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.asarray(k, dtype=np.float64) * self.peak_sq)

    def _tracked(self, items: Iterator, stat_sq: Callable) -> Iterator:
        """Pass ``items`` through, taking the running maximum of ``stat_sq(item)`` on the first pass."""
        if self.peak_sq is not None:
            yield from items
            return
        peak = np.full(self.n_vox, np.nan)
        for item in items:
            with np.errstate(invalid="ignore", divide="ignore"):
                np.fmax(peak, stat_sq(item), out=peak)
            yield item
        self.peak_sq = peak

    def iter_z(self) -> Iterator[tuple[Unit, np.ndarray]]:
        """Yield ``(unit, z vector)``; a multi-map unit is Stouffer-combined over its maps with data."""
        return self._tracked(self._iter_z(), lambda item: item[1] * item[1])

    def iter_effects(self) -> Iterator[tuple[Unit, np.ndarray, np.ndarray]]:
        """Yield ``(unit, g, var g)``; a multi-map unit is the mean g of its maps with data.

        The mean of ``m`` maps of one study (same subjects: their errors are not independent)
        is given the mean of their variances, the conservative choice that assumes the maps
        are perfectly correlated (Borenstein et al. 2009, ch. 24, r = 1); it never claims more
        precision than one map has.
        """
        return self._tracked(self._iter_effects(), lambda item: item[1] * item[1] / item[2])

    def _iter_z(self) -> Iterator[tuple[Unit, np.ndarray]]:
        for unit in self.plan.units:
            if len(unit.image_ids) == 1:
                yield unit, self.load(self.zmap_path_for(unit.image_ids[0]))
                continue
            s = np.zeros(self.n_vox)
            c = np.zeros(self.n_vox)
            for image_id in unit.image_ids:
                v = self.load(self.zmap_path_for(image_id))
                ok = ~np.isnan(v)
                s[ok] += v[ok]
                c[ok] += 1
            with np.errstate(invalid="ignore", divide="ignore"):
                z = np.where(c > 0, s / np.sqrt(c), np.nan)
            yield unit, z

    def _iter_effects(self) -> Iterator[tuple[Unit, np.ndarray, np.ndarray]]:
        if self.effect_paths_for is None:
            raise ValueError("effect-size estimators need the g / var(g) maps (effect_paths_for)")
        for unit in self.plan.units:
            if len(unit.image_ids) == 1:
                gp, vp = self.effect_paths_for(unit.image_ids[0])
                g, v = self.load(gp), self.load(vp)
                bad = ~(np.isfinite(g) & np.isfinite(v) & (v > 0))
                g[bad] = np.nan
                v[bad] = np.nan
                yield unit, g, v
                continue
            sg = np.zeros(self.n_vox)
            sv = np.zeros(self.n_vox)
            c = np.zeros(self.n_vox)
            for image_id in unit.image_ids:
                gp, vp = self.effect_paths_for(image_id)
                g, v = self.load(gp), self.load(vp)
                ok = np.isfinite(g) & np.isfinite(v) & (v > 0)
                sg[ok] += g[ok]
                sv[ok] += v[ok]
                c[ok] += 1
            with np.errstate(invalid="ignore", divide="ignore"):
                g = np.where(c > 0, sg / c, np.nan)
                v = np.where(c > 0, sv / c, np.nan)
            yield unit, g, v


def paths_by_image(paths) -> dict[int, Path]:
    """``image id -> path`` for a rule's per-image input list (``results/images/{id}/<file>``).

    The rule scripts take per-image paths as the rule declares them (``snakemake.input``), never
    rebuilt from another path; the id is the name of the file's directory.
    """
    out = {}
    for p in paths:
        p = Path(p)
        out[int(p.parent.name)] = p
    return out
