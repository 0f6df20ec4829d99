"""Decoding: which atlas terms an analysis' result maps resemble, and whether more than chance.

Sources (the analysis' result maps): every IBMA z (``meta/{method}``), every CBMA z
(``cbma/{method}``) and every ICA component (``ica/component_{k}``). Each is correlated with every
decodable leave-out reference (:mod:`nvmeta.decode.references`) by NiMARE's own
:class:`nimare.decode.continuous.CorrelationDecoder` (``load_imgs`` with the references as prepared
feature maps, then ``transform``): Pearson r over a common mask, the template voxels where the
source and every reference have data (sources with the same voxels share one decoder). The
empirical p-values come from :mod:`nvmeta.decode.null`.

``decoding.tsv`` (:data:`DECODING_COLUMNS`), one row per source and atlas term: ``r`` and its
``rank`` within the source (1 = most similar), ``n_maps`` / ``n_collections`` of the reference after
the leave-out, ``n_voxels`` of the common mask; the null: ``r_sample`` (r on the voxel sample, the
statistic the null is computed for), ``p_null``, ``q_null`` (Benjamini-Hochberg over the source's
terms), ``null_mean``, ``null_sd``, ``null_p95`` and ``n_null``; ``note`` says why a row has no r.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DECODING_COLUMNS",
    "MIN_COMMON_VOXELS",
    "correlate",
    "decode_analysis",
    "describe_decoding",
    "load_sources",
    "top_labels",
]

logger = logging.getLogger(__name__)

DECODING_COLUMNS = [
    "source", "term", "slug", "r", "rank", "n_maps", "n_collections", "n_voxels", "r_sample", "p_null",
    "q_null", "null_mean", "null_sd", "null_p95", "n_null", "note",
]  # fmt: skip
#: A common mask smaller than this gives no r (a correlation over a handful of voxels means nothing).
MIN_COMMON_VOXELS = 50


def load_sources(items: Sequence[tuple[str, str | os.PathLike]], mask_img: Any, mask: np.ndarray) -> list[tuple[str, np.ndarray]]:  # fmt: skip
    """``(name, vector over the mask voxels)`` of every source; a 4-D file (ICA components) gives
    ``{name}/component_{k}`` per volume. NaN = no data."""
    import nibabel as nib

    out = []
    for name, path in items:
        img = nib.load(path)
        if not np.allclose(img.affine, mask_img.affine, atol=1e-3) or img.shape[:3] != mask.shape:
            raise ValueError(f"{path}: not on the template grid")
        data = np.asarray(img.dataobj, dtype=np.float32)
        vols = [data] if data.ndim == 3 else [data[..., k] for k in range(data.shape[3])]
        for k, vol in enumerate(vols):
            vec = vol[mask].astype(np.float64)
            vec[~np.isfinite(vec)] = np.nan
            out.append((name if data.ndim == 3 else f"{name}/component_{k}", vec))
    return out


def _volume(vec: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    vol = np.zeros(mask.shape, dtype=np.float32)
    vol[mask] = np.nan_to_num(vec, nan=0.0)
    return nib.Nifti1Image(vol, affine)


def correlate(
    sources: list[tuple[str, np.ndarray]],
    refs: Mapping[str, tuple[str | os.PathLike, np.ndarray]],
    mask_img: Any,
    mask: np.ndarray,
) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """r of each source with each reference, by NiMARE's ``CorrelationDecoder``, over the common mask.

    Parameters
    ----------
    sources : list of (name, vector)
    refs : mapping
        ``{slug: (path of the map, vector over the mask voxels)}``.

    Returns
    -------
    dict
        ``{source: ({slug: r}, common mask as a boolean vector over the mask voxels)}``; r is NaN for
        every slug when the common mask has fewer than :data:`MIN_COMMON_VOXELS` voxels.
    """
    if not refs:
        return {name: ({}, np.isfinite(vec)) for name, vec in sources}
    import nimare.decode.continuous  # noqa: F401  (imported before the heap is frozen below)

    ref_ok = np.logical_and.reduce([np.isfinite(v) for _, v in refs.values()])
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    commons: dict[str, np.ndarray] = {}
    for name, vec in sources:
        common = np.isfinite(vec) & ref_ok
        key = hashlib.sha1(np.packbits(common).tobytes()).hexdigest()
        groups.setdefault(key, []).append((name, vec))
        commons[key] = common
    from nvmeta.meta import frozen_gc

    out = {}
    # nilearn's masker runs gc.collect() for every image it reads, each a full walk of NiMARE's heap
    with frozen_gc():
        _decode_groups(groups, commons, refs, mask_img, mask, out)
    return out


def _decode_groups(groups, commons, refs, mask_img, mask, out) -> None:
    import nibabel as nib
    from nimare.decode.continuous import CorrelationDecoder

    for key, members in groups.items():
        common = commons[key]
        if common.sum() < MIN_COMMON_VOXELS:
            out.update({name: (dict.fromkeys(refs, float("nan")), common) for name, _ in members})
            continue
        vol = np.zeros(mask.shape, dtype=np.uint8)
        vol[mask] = common
        decoder = CorrelationDecoder()
        decoder.load_imgs({slug: os.fspath(p) for slug, (p, _) in refs.items()},
                          mask=nib.Nifti1Image(vol, mask_img.affine))  # fmt: skip
        for name, vec in members:
            r = decoder.transform(_volume(vec, mask, mask_img.affine))["r"]
            out[name] = ({slug: float(r[slug]) for slug in refs}, common)


def _load_refs(ref_table: Any, mask_img: Any, mask: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    from nvmeta.meta.units import load_vector

    # float32: 300 references on the 2 mm mask are 280 MB (NiMARE holds its own float32 copy)
    return {row.slug: (row.map, load_vector(Path(row.map), mask_img, mask).astype(np.float32))
            for row in ref_table[ref_table["decodable"]].itertuples(index=False)}  # fmt: skip


def top_labels(
    references_tsv: str | os.PathLike, components: np.ndarray, mask_img: Any, n_terms: int
) -> list[list[tuple[str, float]]] | None:
    """ICA labels from decoding: for each component (a 4-D volume's last axis), the ``n_terms`` atlas
    terms with the largest positive r, as :func:`decode_analysis` computes it. None when no atlas term
    is decodable (the caller falls back to the image-text labels)."""
    from nvmeta.decode.references import read_references
    from nvmeta.meta.units import mask_data

    mask_img, mask = mask_data(mask_img)
    table = read_references(references_tsv)
    refs = _load_refs(table, mask_img, mask)
    if not refs:
        return None
    names = dict(zip(table["slug"], table["term"], strict=True))
    sources = []
    for k in range(components.shape[-1]):
        vec = components[..., k][mask].astype(np.float64)
        vec[~np.isfinite(vec)] = np.nan
        sources.append((f"ica/component_{k}", vec))
    rs = correlate(sources, refs, mask_img, mask)
    out = []
    for name, _ in sources:
        r = rs[name][0]
        ranked = sorted(((v, s) for s, v in r.items() if np.isfinite(v) and v > 0), reverse=True)
        out.append([(names[s], float(v)) for v, s in ranked[:n_terms]])
    return out


def _null_columns(rows: list[dict], sources, commons, refs, pool, atlas, decode, log) -> None:
    """Fill the null columns of ``rows`` in place (:mod:`nvmeta.decode.null`)."""
    from nvmeta.decode.null import null_correlations, pairwise_r

    n_null = int(decode["n_null"])
    idx = pool.voxels
    x = np.vstack([np.where(commons[name][idx], vec[idx], np.nan) for name, vec in sources])
    slugs = list(refs)
    obs = pairwise_r(x, np.vstack([refs[s][1][idx] for s in slugs])) if slugs else np.zeros((len(sources), 0))
    sizes = {row["slug"]: row["n_maps"] for row in rows if row["slug"] in refs}
    null = null_correlations(str(atlas["method"]), pool, sizes.values(), x, n_null, int(decode["random_state"]),
                             float(atlas["min_fraction"]), log)  # fmt: skip
    pos = {name: i for i, (name, _) in enumerate(sources)}
    for row in rows:
        if row["slug"] not in refs or not np.isfinite(row["r"]):
            continue
        i, j = pos[row["source"]], slugs.index(row["slug"])
        dist = null[int(row["n_maps"])][:, i]
        dist = dist[np.isfinite(dist)]
        rs = obs[i, j]
        row["r_sample"] = float(rs)
        row["n_null"] = int(dist.size)
        if dist.size and np.isfinite(rs):
            row["p_null"] = float((1 + np.count_nonzero(dist >= rs - 1e-12)) / (1 + dist.size))
            row["null_mean"], row["null_sd"] = (
                float(dist.mean()),
                float(dist.std(ddof=1)) if dist.size > 1 else 0.0,
            )
            row["null_p95"] = float(np.percentile(dist, 95))


def _rows(sources, rs, table) -> list[dict]:
    """One ``decoding.tsv`` row per source and atlas term (r, or the note saying why there is none)."""
    rows = []
    for name, _ in sources:
        r, common = rs[name]
        for row in table.itertuples(index=False):
            rec = dict.fromkeys(DECODING_COLUMNS)
            rec.update(source=name, term=row.term, slug=row.slug, n_maps=int(row.n_maps),
                       n_collections=int(row.n_collections), n_voxels=int(common.sum()), r=float("nan"),
                       note="")  # fmt: skip
            if not row.decodable:
                rec["note"] = f"not decodable: {row.reason}"
            else:
                rec["r"] = r[row.slug]
                if not np.isfinite(rec["r"]):
                    rec["note"] = (
                        f"common mask of {int(common.sum())} voxels (< {MIN_COMMON_VOXELS}) or a constant map"
                    )
            rows.append(rec)
    return rows


def _ranked(rows: list[dict], sources) -> Any:
    """The rows as a table: rank of r within each source, BH q over its p-values, sources in order."""
    import pandas as pd

    from nvmeta.meta.correction import bh_q

    df = pd.DataFrame(rows, columns=DECODING_COLUMNS)
    df["r"] = df["r"].astype(float)
    df["rank"] = df.groupby("source")["r"].rank(ascending=False, method="min")
    for name in df["source"].unique():
        sel = (df["source"] == name) & df["p_null"].notna()
        if sel.any():
            df.loc[sel, "q_null"] = bh_q(df.loc[sel, "p_null"].to_numpy(dtype=float))
    order = {name: i for i, (name, _) in enumerate(sources)}
    df = df.sort_values(["source", "rank", "term"], key=lambda c: c.map(order) if c.name == "source" else c,
                        na_position="last").reset_index(drop=True)  # fmt: skip
    df["rank"] = df["rank"].astype("Int64")
    return df


def decode_analysis(
    source_items: Sequence[tuple[str, str | os.PathLike]],
    references_tsv: str | os.PathLike,
    selection_tsv: str | os.PathLike,
    sample_paths: Sequence[str | os.PathLike],
    mask_img: Any,
    atlas: Mapping[str, Any],
    decode: Mapping[str, Any],
    out_tsv: str | os.PathLike,
    out_png: str | os.PathLike,
    out_json: str | os.PathLike,
    log: logging.Logger | None = None,
) -> Any:
    """Rule ``decode``: ``decoding.tsv``, ``decoding.png`` and ``summary.json`` of one analysis.

    Parameters
    ----------
    source_items : list of (name, path)
        ``("meta/stouffer", ".../meta/stouffer/z.nii.gz")``, ``("ica", ".../ica/components.nii.gz")``...
    references_tsv : path-like
        The analysis' ``decode/references.tsv``.
    selection_tsv : path-like
        The analysis' ``selection.tsv`` (its maps are left out of the null pool too).
    sample_paths : list of path-like
        Every atlas term's ``sample.npz``.
    atlas, decode : mapping
        The validated ``atlas`` block and the analysis' ``decode`` block.
    """
    from nvmeta.decode.figures import decoding_figure
    from nvmeta.decode.null import load_pool
    from nvmeta.decode.references import leave_out_sets, read_references
    from nvmeta.io import write_json, write_tsv
    from nvmeta.meta.units import mask_data

    log = log or logger
    mask_img, mask = mask_data(mask_img)
    table = read_references(references_tsv)
    refs = _load_refs(table, mask_img, mask)
    sources = load_sources(source_items, mask_img, mask)
    rs = correlate(sources, refs, mask_img, mask)
    rows = _rows(sources, rs, table)
    images, collections = leave_out_sets(selection_tsv, decode["leave_out"])
    pool = load_pool(sample_paths, images, collections)
    if refs and pool.size:
        _null_columns(rows, sources, {n: rs[n][1] for n, _ in sources}, refs, pool, atlas, decode, log)
    df = _ranked(rows, sources)
    write_tsv(out_tsv, df)
    note = None
    if not refs:
        note = (
            "No atlas term is decodable after leaving out this analysis' own maps (references.tsv says why)."
        )
        log.warning("decode: %s", note)
    elif pool.size in set(df.loc[df["r"].notna(), "n_maps"].astype(int)):
        note = (f"The null pool holds only {pool.size} map(s), as many as a term's reference: its random "
                "references are the term's own maps, so the null cannot tell a match from chance (p = 1).")  # fmt: skip
        log.warning("decode: %s", note)
    decoding_figure(df, out_png, int(decode["n_top"]), note)
    summary = {
        "sources": [n for n, _ in sources], "n_terms": len(table), "n_decodable": len(refs),
        "pool_maps": pool.size, "null_voxels": int(pool.voxels.size), "n_null": int(decode["n_null"]),
        "leave_out": decode["leave_out"], "left_out_images": len(images),
        "left_out_collections": len(collections), "method": atlas["method"], "note": note,
        "top": {n: (df[(df["source"] == n) & df["r"].notna()].head(3)[["term", "r", "p_null"]]
                    .to_dict("records")) for n, _ in sources},
    }  # fmt: skip
    write_json(out_json, _jsonable(summary))
    null = (
        f"null: {int(decode['n_null'])} draws from {pool.size} maps x {pool.voxels.size} voxels"
        if refs
        else "no null"
    )
    log.info("decode: %d source(s) x %d decodable term(s); %s", len(sources), len(refs), null)
    return df


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def describe_decoding(decoding_tsv: str | os.PathLike, n_terms: int = 3) -> list[str]:
    """One plain-language line per result map of ``decoding.tsv`` (for an overview page): its top
    ``n_terms`` terms with r and p, or why it has none."""
    import pandas as pd

    df = pd.read_csv(decoding_tsv, sep="\t", keep_default_na=False, na_values=[""])
    lines = []
    for source, part in df.groupby("source", sort=False):
        top = part[part["r"].notna()].sort_values("rank").head(n_terms)
        if top.empty:
            lines.append(f"{source}: no atlas term to decode against ({part['note'].iloc[0]})")
            continue
        terms = "; ".join(
            f"{t} (r = {r:.2f}" + ("" if p != p else f", p = {p:.3g}") + ")"
            for t, r, p in zip(top["term"], top["r"], top["p_null"], strict=True)
        )
        lines.append(f"{source} resembles {terms}")
    return lines
