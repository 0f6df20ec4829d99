"""Per-analysis QC table and funnel: which images are used, which are left out and why.

:func:`build_qc` reads the selection (``selection.tsv``) and, for each image, its ``metadata.json`` (download) and
``qc.json`` (per-image job), then applies the analysis-level rules, in this order, to the images still included
(README, "QC rules", gives each rule's reference):

1. not a task contrast, by name or file name (``qc.exclude_names``, ``qc.exclude_files``), or a single-subject
   map labelled group (``qc.exclude_single_subject``), :mod:`nvmeta.images.record_rules`
                                                      -> ``'not a task contrast: name matches qc.exclude_names.ppi ("PPI")'``
2. coverage < ``qc.min_coverage`` (default 0.4)       -> ``"low coverage: 0.31 < 0.4"``
3. max |z| < ``qc.min_max_abs_z`` (default 1.96)      -> ``"max |z| < 1.96 (probably not a t/z map)"``
4. max |z| > ``qc.max_abs_z`` (default 50)            -> ``"max |z| > 50"``
5. duplicates and sign-flipped copies: Pearson r on the voxels both maps have data in; when
   ``|r| > qc.duplicate_r`` (default 0.99) the map that comes first in selection order is kept and the other is
   excluded: ``"duplicate of image 12 (r=0.999)"`` or ``"sign-flipped copy of image 12 (r=-0.999)"``. Maps are
   compared with the maps kept so far only, and need at least ``MIN_SHARED_VOXELS`` shared voxels. Of a
   sign-flipped pair, the map that correlates better with the consensus is kept instead.
6. inverted contrasts and outlier maps, from each map's correlation with the consensus of the maps left
   (:mod:`nvmeta.images.consensus`; ``qc.inverted`` and ``qc.outliers``: flag, by default, or exclude).
   The consensus is computed from the maps the duplicate search reads, in the same pass.

Soft warnings go to the ``flags`` column (``"; "``-separated) and do not exclude; inverted contrasts and outliers
are flags unless configured to exclude. ``consensus_r`` is each map's r with the consensus.

The funnel has one row per stage, ``selected -> downloaded -> converted -> passed QC``: ``count`` images reach the
stage, ``excluded_here`` are lost at it and ``reasons`` breaks those down (``"2 × download failed: ...; 1 × ..."``);
on the last row ``flagged`` counts the included maps with a flag and ``flags`` breaks the flags down.

The duplicate search and its cost: :mod:`nvmeta.images.duplicates`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nvmeta.images.consensus import CONSENSUS_BYTES, ConsensusSample, assess
from nvmeta.images.duplicates import (  # noqa: F401 - re-exported: the QC rule and tests name them here
    DUPLICATE_SEARCH_BYTES,
    MIN_SHARED_VOXELS,
    _exact_pair,
    _pairwise_r,
    find_duplicates,
)
from nvmeta.images.record_rules import record_reason

logger = logging.getLogger(__name__)

QC_COLUMNS = [
    "image_id",
    "collection_id",
    "name",
    "contrast_definition",
    "number_of_subjects",
    "n",
    "n_source",
    "status",
    "reason",
    "flags",
    "df",
    "df_source",
    "coverage",
    "max_abs_z",
    "z_min",
    "z_max",
    "consensus_r",
]
FUNNEL_COLUMNS = ["stage", "count", "excluded_here", "reasons", "flagged", "flags"]
STAGES = ["selected", "downloaded", "converted", "passed QC"]
#: Soft-warning thresholds (flags only).
FLAG_LOW_COVERAGE = 0.8
FLAG_HIGH_Z = 30.0


def _fmt(x: float) -> str:
    """Short number for reasons: 0.31, 1.96, 50, 0.999."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _num(x: Any) -> float | None:
    try:
        if x is None or isinstance(x, bool):
            return None
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def reason_key(reason: str | None) -> str:
    """Group exclusion reasons for the funnel: drop image-specific numbers (coverage value, image id, r)."""
    if not reason:
        return ""
    if reason.startswith("not a task contrast"):  # drop the quoted name
        return reason.split(' ("', 1)[0]
    for prefix in (
        "low coverage",
        "inverted contrast",
        "outlier",
        "duplicate of image",
        "sign-flipped copy of image",
        "too many volumes",
        "implausible sample size",
        "implausible degrees of freedom",
        "implausible effect size",
        "map too large",
    ):
        if reason.startswith(prefix):
            return prefix
    return reason


def _summary(keys: Iterable[str]) -> str:
    counts = Counter(keys)
    return "; ".join(f"{n} × {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _reasons_summary(reasons: Iterable[str]) -> str:
    return _summary(reason_key(r) for r in reasons)


def flag_key(flag: str) -> str:
    """Group flags for the funnel: the text before the first colon (``"outlier: r = 0.05 ..."`` -> ``"outlier"``)."""
    return flag.split(":", 1)[0]


def _flags_summary(flags: Iterable[str]) -> str:
    return _summary(flag_key(f) for f in flags)


# --------------------------------------------------------------------------------------------------------------
# QC table
# --------------------------------------------------------------------------------------------------------------


def _flags(row: dict, qc_cfg: dict) -> list[str]:
    flags = []
    if row.get("df_source") in ("n-2", "n-1"):
        flags.append(f"df assumed from sample size ({row['df_source']})")
    elif row.get("df_source") in ("override_image", "override_collection"):
        flags.append(f"df from config ({row['df_source']})")
    if row.get("n_source") in ("n_images", "n_collections"):
        flags.append(f"n from config ({row['n_source']})")
    cov = _num(row.get("coverage"))
    if cov is not None and qc_cfg["min_coverage"] <= cov < FLAG_LOW_COVERAGE:
        flags.append(f"partial coverage: {_fmt(cov)}")
    zmin, zmax = _num(row.get("z_min")), _num(row.get("z_max"))
    if zmin is not None and zmin >= 0:
        flags.append("all positive")
    if zmax is not None and zmax <= 0:
        flags.append("all negative")
    mz = _num(row.get("max_abs_z"))
    if mz is not None and FLAG_HIGH_Z < mz <= qc_cfg["max_abs_z"]:
        flags.append(f"max |z| > {_fmt(FLAG_HIGH_Z)}")
    return flags


def _empty(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, str) and not x.strip():
        return None
    return x


def _image_row(rec: dict, d: Path, cfg: Mapping[str, Any], log: logging.Logger) -> tuple[dict, str | None]:
    """One selection row's QC row and the funnel stage it is lost at (None: still included).

    The per-image outcome (download, conversion) first, then the record rules (name, file name,
    single subject), then coverage and the z range.
    """
    image_id = int(float(rec["image_id"]))
    row: dict[str, Any] = {c: None for c in QC_COLUMNS}
    row.update(
        image_id=image_id,
        collection_id=_int(rec.get("collection_id")),
        name=_empty(rec.get("name")),
        contrast_definition=_empty(rec.get("contrast_definition")),
        number_of_subjects=_int(rec.get("number_of_subjects")),
    )
    meta = _read_json(d / "metadata.json")
    nv = (meta or {}).get("nvmeta") or {}
    qc = _read_json(d / "qc.json")
    if qc is not None:  # the image's one resolved sample size, which every consumer reads, not the record's
        row.update(n=_int(qc.get("n")), n_source=qc.get("n_source"))
    if meta is None or nv.get("status") != "ok":
        if meta is None:
            reason = "download failed: metadata.json missing"
        else:
            reason = (qc or {}).get("reason") or f"download failed: {nv.get('reason') or 'unknown reason'}"
        row.update(status="excluded", reason=reason)
        return row, "downloaded"
    if qc is None:
        reason = "not converted: qc.json missing"
        log.warning("image %s: %s", image_id, reason)
        row.update(status="excluded", reason=reason)
        return row, "converted"
    for key in ("df", "df_source", "coverage", "max_abs_z", "z_min", "z_max"):
        row[key] = qc.get(key)
    if row["collection_id"] is None:
        row["collection_id"] = _int(qc.get("collection_id"))
    if qc.get("status") != "included":
        row.update(status="excluded", reason=qc.get("reason") or "excluded (no reason given)")
        return row, "converted"
    reason = record_reason(rec, cfg)
    cov, mz = _num(qc.get("coverage")), _num(qc.get("max_abs_z"))
    if reason is not None:
        pass
    elif cov is None or cov < cfg["min_coverage"]:
        reason = f"low coverage: {_fmt(cov or 0.0)} < {_fmt(cfg['min_coverage'])}"
    elif mz is None or mz < cfg["min_max_abs_z"]:
        reason = f"max |z| < {_fmt(cfg['min_max_abs_z'])} (probably not a t/z map)"
    elif mz > cfg["max_abs_z"]:
        reason = f"max |z| > {_fmt(cfg['max_abs_z'])}"
    row.update(status="excluded" if reason else "included", reason=reason)
    return row, ("passed QC" if reason else None)


def build_qc(
    selection_tsv: str | os.PathLike,
    image_dir_for: Callable[[int], Path],
    qc_cfg: Mapping[str, Any],
    logger: logging.Logger | None = None,
    mask_img: Any = None,
    memory_bytes: int = DUPLICATE_SEARCH_BYTES,
    consensus_bytes: int = CONSENSUS_BYTES,
):
    """Build the per-analysis QC table and funnel.

    Parameters
    ----------
    selection_tsv : path-like
        ``results/analyses/{analysis}/selection.tsv``.
    image_dir_for : callable
        ``image_dir_for(image_id) -> Path`` of ``results/images/{image_id}/`` (holding metadata.json, qc.json,
        zmap.nii.gz).
    qc_cfg : mapping
        ``config["qc"]`` (every key; build one as ``{**nvmeta.workflow.config.defaults("qc"), ...}``).
    logger : logging.Logger, optional
        Progress and warnings (default: this module's logger).
    mask_img : nibabel.Nifti1Image, optional
        Template mask used to vectorise the z-maps for the duplicate search; by default the voxels where any
        included map has data (same result: voxels outside the mask are NaN in every z-map).
    memory_bytes : int
        Memory budget of the duplicate search (:mod:`nvmeta.images.duplicates`).
    consensus_bytes : int
        Memory budget of the consensus' voxel subsample (:class:`nvmeta.images.consensus.ConsensusSample`).

    Returns
    -------
    qc_df : pandas.DataFrame
        One row per selected image in selection order, columns :data:`QC_COLUMNS`.
        ``qc_df.attrs["consensus"]`` describes the consensus (:func:`nvmeta.images.consensus.assess`'s
        ``info``, or why it was not computed).
    funnel_df : pandas.DataFrame
        Columns :data:`FUNNEL_COLUMNS`, one row per stage in :data:`STAGES`.
    """
    import pandas as pd

    log = logger if logger is not None else logging.getLogger(__name__)
    cfg = qc_cfg
    sel = pd.read_csv(selection_tsv, sep="\t", dtype=str, keep_default_na=False)
    rows: list[dict] = []
    stage_lost: dict[str, list[str]] = {s: [] for s in STAGES[1:]}
    for rec in sel.to_dict("records"):
        row, stage = _image_row(rec, Path(image_dir_for(int(float(rec["image_id"])))), cfg, log)
        if stage is not None:
            stage_lost[stage].append(row["reason"])
        rows.append(row)

    consensus = _map_rules(
        rows, image_dir_for, cfg, mask_img, (memory_bytes, consensus_bytes), stage_lost["passed QC"], log
    )

    flagged = []
    for row in rows:
        extra = row.pop("_flags", [])
        flags = _flags(row, cfg) + extra if row["status"] == "included" else []
        row["flags"] = "; ".join(flags) if row["status"] == "included" else None
        flagged.extend(flags)
        for key in ("coverage", "max_abs_z", "z_min", "z_max", "df", "consensus_r"):
            row[key] = _num(row[key])

    qc_df = pd.DataFrame(rows, columns=QC_COLUMNS)
    for col in ("image_id", "collection_id", "number_of_subjects", "n"):
        qc_df[col] = qc_df[col].astype("Int64")
    qc_df.attrs["consensus"] = consensus

    count = len(rows)
    funnel = [
        {"stage": "selected", "count": count, "excluded_here": 0, "reasons": "", "flagged": 0, "flags": ""}
    ]
    for stage in STAGES[1:]:
        lost = stage_lost[stage]
        count -= len(lost)
        last = stage == STAGES[-1]
        funnel.append(
            {
                "stage": stage,
                "count": count,
                "excluded_here": len(lost),
                "reasons": _reasons_summary(lost),
                "flagged": int(qc_df["flags"].fillna("").astype(bool).sum()) if last else 0,
                "flags": _flags_summary(flagged) if last else "",
            }
        )
    funnel_df = pd.DataFrame(funnel, columns=FUNNEL_COLUMNS)
    n_inc = int((qc_df["status"] == "included").sum())
    log.info("QC: %d selected, %d included", len(rows), n_inc)
    return qc_df, funnel_df


def _map_rules(
    rows: list[dict],
    image_dir_for: Callable[[int], Path],
    cfg: Mapping[str, Any],
    mask_img: Any,
    budgets: tuple[int, int],
    lost: list[str],
    log: logging.Logger,
) -> dict:
    """The rules that read the maps, in one pass: duplicates, then the consensus rules.

    Updates ``rows`` in place (status, reason, ``consensus_r``, ``_flags``) and appends the
    reasons of the maps it excludes to ``lost``; returns the consensus description.
    """
    kept = [i for i, r in enumerate(rows) if r["status"] == "included"]
    wanted = cfg["inverted"] != "off" or cfg["outliers"] != "off"
    if len(kept) < 2:
        return _not_computed(len(kept), cfg, wanted)
    log.info("duplicate search over %d maps (|r| > %s)", len(kept), cfg["duplicate_r"])
    vox = _vector_index(mask_img, [image_dir_for(rows[i]["image_id"]) for i in kept])
    memory_bytes, consensus_bytes = budgets
    enough = wanted and len(kept) >= cfg["consensus_min_maps"]
    sample = ConsensusSample(len(kept), vox.size, consensus_bytes) if enough else None

    def load(m: int) -> np.ndarray:
        x = _load_vector(Path(image_dir_for(rows[kept[m]]["image_id"])) / "zmap.nii.gz", vox)
        if sample is not None:
            sample.store(m, x)
        return x

    dups = find_duplicates(load, len(kept), threshold=float(cfg["duplicate_r"]), memory_bytes=memory_bytes)
    cons = None
    agreeing: set[int] = set()
    # with qc.inverted off an anticorrelated map is judged by the outlier fences like any other
    inverted_r = float(cfg["inverted_r"]) if cfg["inverted"] != "off" else -math.inf
    members = np.array([m not in dups for m in range(len(kept))], dtype=bool)
    if sample is not None and members.sum() >= cfg["consensus_min_maps"]:
        cons = assess(sample.data, members, inverted_r, float(cfg["outlier_iqr"]))
        dups, agreeing = _resolve_flipped(dups, cons.r, load, log, rows, kept)
        if agreeing:  # the consensus of the maps now kept
            members = np.array([m not in dups for m in range(len(kept))], dtype=bool)
            cons = assess(sample.data, members, inverted_r, float(cfg["outlier_iqr"]))
    for j, (i, r) in sorted(dups.items()):
        row, other = rows[kept[j]], rows[kept[i]]
        kind = "sign-flipped copy" if r < 0 else "duplicate"
        reason = f"{kind} of image {other['image_id']} (r={r:.3f})"
        if i in agreeing:
            reason += ", which agrees with the consensus"
        row.update(status="excluded", reason=reason)
        lost.append(reason)
        log.info("image %s: %s", row["image_id"], reason)
    if cons is None:
        return _not_computed(int(members.sum()), cfg, wanted)
    _apply_consensus(cons, [rows[i] for i in kept], cfg, lost, log)
    return cons.info


def _not_computed(k: int, cfg: Mapping[str, Any], wanted: bool) -> dict:
    if not wanted:
        why = "qc.inverted and qc.outliers are off"
    else:
        why = f"{k} maps after the duplicate search < qc.consensus_min_maps = {cfg['consensus_min_maps']}"
    return {"status": "not computed", "reason": why, "n_maps": k}


def _resolve_flipped(dups, r_cons, load, log, rows, kept):
    """Of each group of copies that holds sign-flipped ones, keep the copy that agrees with the consensus.

    The duplicate search keeps the first map of a group; when a sign-flipped copy correlates better
    with the consensus than that first map (the OHBM 2025 tutorial's rule for inverted pairs), it is
    kept instead and the others are re-pointed at it with their exact r. Returns the new ``dups``
    and the set of maps kept this way.
    """
    groups: dict[int, list[tuple[int, float]]] = {}
    for j, (i, r) in dups.items():
        groups.setdefault(i, []).append((j, r))
    out = dict(dups)
    agreeing: set[int] = set()
    for i, copies in groups.items():
        flipped = [j for j, r in copies if r < 0 and np.isfinite(r_cons[j])]
        if not flipped or not np.isfinite(r_cons[i]):
            continue
        best = max(flipped, key=lambda j: r_cons[j])
        if r_cons[best] <= r_cons[i]:
            continue
        del out[best]
        agreeing.add(best)
        keeper = load(best)
        for m in [i] + [j for j, _ in copies if j != best]:
            r, _ = _exact_pair(keeper, load(m))
            out[m] = (best, r)
        log.info(
            "image %s is kept instead of its sign-flipped copy image %s: r with the consensus %.3f vs %.3f",
            rows[kept[best]]["image_id"], rows[kept[i]]["image_id"], r_cons[best], r_cons[i],
        )  # fmt: skip
    return out, agreeing


def _apply_consensus(cons: Any, kept_rows: list[dict], cfg: Mapping[str, Any], lost: list[str], log) -> None:
    """Record each map's r with the consensus; flag or exclude inverted contrasts and outliers."""
    lower = cons.info["lower_fence"]
    for m, row in enumerate(kept_rows):
        r = float(cons.r[m])
        row["consensus_r"] = r if math.isfinite(r) else None
        if row["status"] != "included":
            continue
        if cons.inverted[m]:
            text = f"inverted contrast: r = {r:.2f} with the consensus < qc.inverted_r = {_fmt(cfg['inverted_r'])}"
            action = cfg["inverted"]
        elif cons.outlier[m]:
            text = f"outlier: r = {r:.2f} with the consensus < lower IQR fence {lower:.2f}"
            action = cfg["outliers"]
        else:
            continue
        if action == "exclude":
            row.update(status="excluded", reason=text)
            lost.append(text)
        elif action == "flag":
            row.setdefault("_flags", []).append(text)
        else:
            continue
        log.info("image %s: %s (%s)", row["image_id"], text, "excluded" if action == "exclude" else "flagged")
    info = cons.info
    log.info(
        "consensus of %d maps on %d voxels (%d signal voxels): %d inverted, %d outliers (lower fence %.3f)",
        info["n_maps"], info["n_voxels"], info["n_signal_voxels"], info["n_inverted"], info["n_outliers"], lower,
    )  # fmt: skip


def _int(x: Any) -> int | None:
    f = _num(_empty(x))
    return int(f) if f is not None else None


def _vector_index(mask_img: Any, dirs: list[Path]) -> np.ndarray:
    """Flat indices of the voxels used for the duplicate search."""
    import nibabel as nib

    if mask_img is not None:
        return np.flatnonzero(np.asarray(mask_img.dataobj).ravel() > 0)
    union = None
    for d in dirs:
        z = np.asarray(nib.load(Path(d) / "zmap.nii.gz").dataobj, dtype=np.float32).ravel()
        union = np.isfinite(z) if union is None else union | np.isfinite(z)
    return np.flatnonzero(union)


def _load_vector(path: Path, vox: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float32).ravel()[vox]


def write_qc(
    selection_tsv: str | os.PathLike,
    image_dir_for: Callable[[int], Path],
    qc_cfg: Mapping[str, Any],
    qc_tsv: str | os.PathLike,
    funnel_tsv: str | os.PathLike,
    logger: logging.Logger | None = None,
    mask_img: Any = None,
    consensus_json: str | os.PathLike | None = None,
):
    """Build (:func:`build_qc`) and write ``qc.tsv``, ``funnel.tsv`` (and ``consensus.json``) atomically.

    Returns both tables.
    """
    from nvmeta.io import write_json, write_tsv

    qc_df, funnel_df = build_qc(selection_tsv, image_dir_for, qc_cfg, logger=logger, mask_img=mask_img)
    write_tsv(qc_tsv, qc_df)
    write_tsv(funnel_tsv, funnel_df)
    if consensus_json is not None:
        write_json(consensus_json, _json_ready(qc_df.attrs.get("consensus", {})))
    return qc_df, funnel_df


def _json_ready(info: Mapping[str, Any]) -> dict:
    """NaN -> None (strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in info.items()}
