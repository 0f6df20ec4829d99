"""The task atlas: one reference map per term, built from NeuroVault's own group maps.

Stages (``workflow/rules/atlas.smk``):

1. **Selection** (checkpoint ``atlas_query``): the ``atlas:`` block is turned into a selection config
   (:func:`selection_cfg`) and queried with the very query analyses use
   (:func:`nvmeta.select.query.query_job`), from the dump or the API, so the per-image downloads and
   z-maps are the analyses' own jobs: a map an analysis also selects is fetched and converted once.
   Besides ``selection.tsv`` it writes ``groups.tsv`` (each image's term).
2. **QC** (rule ``atlas_qc``): the analyses' QC table over the atlas' maps.
3. **Terms** (checkpoint ``atlas_terms``): :func:`nvmeta.decode.terms.write_terms`.
4. **One job per eligible term** (rule ``atlas_term``, :func:`build_term`): the term's maps are read
   once and summed (:class:`nvmeta.decode.sums.Sums`); the job writes the reference z map, the sums
   (for exact leave-out), and the maps' values at a fixed random sample of mask voxels (for the
   decoding null, :mod:`nvmeta.decode.null`). A term's job depends only on its own maps and
   settings, so a new map of one task reruns that task's job only.
5. **Fan-in** (rule ``atlas_table``, :func:`write_atlas_table`): ``atlas.tsv`` and ``atlas.png``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ATLAS_COLUMNS", "build_term", "sample_voxels", "selection_cfg", "write_atlas_table"]

logger = logging.getLogger(__name__)

ATLAS_COLUMNS = [
    "term", "slug", "n_maps", "n_collections", "map", "method", "n_voxels", "peak_z", "summary",
]  # fmt: skip


def selection_cfg(atlas: Mapping[str, Any]) -> dict[str, Any]:
    """The atlas block as a selection config for :mod:`nvmeta.select.query` (its ``SELECTION_KEYS``).

    A selection by terms: the atlas' ``image_terms`` / ``collection_terms`` / ``default_terms``, the
    hygiene terms under them (``atlas.hygiene``, :mod:`nvmeta.select.hygiene`), a
    ``{group_by: {not_null: true}}`` image term (a map without a term cannot enter any reference)
    unless the user wrote a term on that field, and ``max_images`` (null: no limit).
    """
    from nvmeta.select.hygiene import with_hygiene

    image_terms = dict(atlas["image_terms"])
    if atlas["group_by"] not in image_terms:
        image_terms[atlas["group_by"]] = {"not_null": True}
    cfg: dict[str, Any] = {
        "image_ids": [],
        "collection_ids": [],
        "image_terms": image_terms,
        "collection_terms": dict(atlas["collection_terms"]),
        "default_terms": atlas["default_terms"],
        "max_images": atlas["max_images"],
    }
    return with_hygiene(cfg) if atlas["hygiene"] else cfg


def sample_voxels(n_mask: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices (into the mask voxels) of the null's voxel sample: ``min(n, n_mask)`` drawn without
    replacement with ``numpy.random.default_rng(seed)``; every term job draws the same ones."""
    rng = np.random.default_rng(seed)
    if n >= n_mask:
        return np.arange(n_mask, dtype=np.int64)
    return np.sort(rng.choice(n_mask, size=n, replace=False)).astype(np.int64)


def build_term(
    term: str,
    slug: str,
    members: list[tuple[int, int, float | None]],
    zmap_path_for: Callable[[int], Path],
    mask_img: Any,
    atlas: Mapping[str, Any],
    outdir: str | os.PathLike,
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Rule ``atlas_term``: one term's reference map, its sums and its voxel sample.

    Parameters
    ----------
    term, slug : str
        The term as the server wrote it and its local name (:func:`nvmeta.decode.terms.slug`).
    members : list of (image_id, collection_id, n)
        The term's included maps (``members.tsv``).
    zmap_path_for : callable
        ``image_id -> Path`` of the template-grid z-map (the rule's inputs).
    mask_img : nibabel image
        Template mask.
    atlas : mapping
        The validated ``atlas`` block (``method``, ``min_fraction``, ``null_voxels``, ``random_state``).
    outdir : path-like
        ``results/atlas/{slug}/``: ``z.nii.gz``, ``sums.npz``, ``sample.npz``, ``summary.json``.

    Returns
    -------
    dict
        The summary (also written).
    """
    import nibabel as nib

    from nvmeta.decode.sums import Sums, weight
    from nvmeta.images.download import remove_stale_temps
    from nvmeta.io import atomic_path, write_json
    from nvmeta.meta.units import load_vector, mask_data

    log = log or logger
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in ("z.nii.gz", "sums.npz", "sample.npz", "summary.json"):
        remove_stale_temps(outdir / name)
    method = str(atlas["method"])
    mask_img, mask = mask_data(mask_img)
    n_vox = int(mask.sum())
    idx = sample_voxels(n_vox, int(atlas["null_voxels"]), int(atlas["random_state"]))
    sums = Sums.empty(method, n_vox)
    used: list[tuple[int, int, float]] = []
    skipped: list[int] = []
    sample = np.full((len(members), idx.size), np.nan, dtype=np.float32)
    for image_id, cid, n in members:
        w = weight(method, n)
        if w is None:  # weighted_stouffer: a map without a sample size has no weight
            skipped.append(image_id)
            continue
        z = load_vector(zmap_path_for(image_id), mask_img, mask)
        sums.add(z, w)
        sample[len(used)] = z[idx]
        used.append((image_id, cid, w))
    sample = sample[: len(used)]
    if skipped:
        log.warning("%s: %d map(s) without a sample size left out (atlas.method weighted_stouffer): %s",
                    slug, len(skipped), skipped[:10])  # fmt: skip
    if not used:
        raise ValueError(f"atlas term {term!r}: no map could be combined (method {method})")
    ref = sums.reference(float(atlas["min_fraction"]))
    vol = np.full(mask.shape, np.nan, dtype=np.float32)
    vol[mask] = ref.astype(np.float32)
    img = nib.Nifti1Image(vol, mask_img.affine)
    img.header.set_data_dtype(np.float32)
    with atomic_path(outdir / "z.nii.gz") as tmp:
        nib.save(img, tmp)
    ids = np.array([u[0] for u in used], dtype=np.int64)
    cids = np.array([u[1] for u in used], dtype=np.int64)
    weights = np.array([u[2] for u in used], dtype=np.float64)
    sums.save(outdir / "sums.npz", image_ids=ids, collection_ids=cids, weights=weights)
    with atomic_path(outdir / "sample.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, voxels=idx, values=sample, image_ids=ids, collection_ids=cids, weights=weights)
    finite = np.isfinite(ref)
    summary = {
        "term": term,
        "slug": slug,
        "method": method,
        "n_maps": len(used),
        "n_collections": int(np.unique(cids).size),
        "n_left_out_without_n": len(skipped),
        "min_fraction": float(atlas["min_fraction"]),
        "n_voxels": int(finite.sum()),
        "n_mask_voxels": n_vox,
        "peak_z": float(ref[finite][np.argmax(np.abs(ref[finite]))]) if finite.any() else None,
        "null_voxels": int(idx.size),
    }
    write_json(outdir / "summary.json", summary)
    log.info("%s (%s): %d maps from %d collections, %d voxels, peak z %s", slug, term, summary["n_maps"],
             summary["n_collections"], summary["n_voxels"], summary["peak_z"])  # fmt: skip
    return summary


def write_atlas_table(
    terms_tsv: str | os.PathLike,
    summaries: list[str | os.PathLike],
    out_tsv: str | os.PathLike,
    out_png: str | os.PathLike,
    query_funnel: str | os.PathLike | None = None,
    log: logging.Logger | None = None,
) -> Any:
    """Rule ``atlas_table``: ``atlas.tsv`` (one row per eligible term) and ``atlas.png``.

    ``map`` and ``summary`` are paths relative to the results folder (``atlas/{slug}/z.nii.gz``).
    """
    import pandas as pd

    from nvmeta.decode.figures import atlas_figure
    from nvmeta.decode.terms import read_terms
    from nvmeta.io import read_json, write_tsv

    log = log or logger
    terms = read_terms(terms_tsv)
    by_slug = {Path(p).parent.name: Path(p) for p in summaries}
    rows = []
    for row in terms[terms["eligible"]].itertuples(index=False):
        path = by_slug.get(row.slug)
        if path is None:
            raise ValueError(f"atlas term {row.slug} has no summary among the rule's inputs")
        s = read_json(path)
        rows.append({
            "term": row.term, "slug": row.slug, "n_maps": s["n_maps"], "n_collections": s["n_collections"],
            "map": f"atlas/{row.slug}/z.nii.gz", "method": s["method"], "n_voxels": s["n_voxels"],
            "peak_z": s["peak_z"], "summary": f"atlas/{row.slug}/summary.json",
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=ATLAS_COLUMNS).sort_values(["n_maps", "term"], ascending=[False, True])
    write_tsv(out_tsv, table)
    funnel = read_json(query_funnel) if query_funnel and Path(query_funnel).exists() else None
    results = Path(out_tsv).parent.parent
    atlas_figure(table, terms, results, out_png, funnel)
    log.info("atlas: %d reference map(s) of %d term(s)", len(table), len(terms))
    return table
