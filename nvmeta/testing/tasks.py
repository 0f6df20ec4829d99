"""A synthetic NeuroVault of tasks with planted spatial signatures, for decoding tests and benchmarks.

Each task has its own *signature*: ``n_blobs`` Gaussian blobs (sd ``sigma`` mm) at random places in
the mask, scaled to a peak of 1. A map of task ``t`` is ``amplitude · signature_t + common ·
shared + noise``: ``shared`` is one pattern every map carries (as real NeuroVault maps share a
task-positive / default-mode structure, the reason decoding needs a null), ``noise`` is smoothed
white noise (``smooth_mm`` FWHM) of unit sd per map. Maps are grouped into collections of one task
each. Everything is seeded.

Three layouts: :func:`write_zmaps` (template-grid ``zmap.nii.gz`` + ``qc.json`` per image, what the
atlas and decode jobs read: for library-level tests and benchmarks), :func:`write_task_snapshot` (a
snapshot directory the workflow reads as NeuroVault: end-to-end tests) and the maps themselves
(:func:`make_task_maps`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "TaskMap", "TaskSet", "make_task_maps", "run_atlas_stages", "small_mask", "task_names", "write_task_snapshot",
    "write_zmap", "write_zmaps",
]  # fmt: skip

PUBLIC = "https://neurovault.org"


def small_mask(shape: tuple[int, int, int] = (18, 22, 18), voxel: float = 8.0) -> nib.Nifti1Image:
    """An ellipsoid brain-like mask on a coarse MNI-centred grid (tests: a few thousand voxels)."""
    ijk = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2.0
    radius = np.array(shape) / 2.0 - 0.5
    inside = (((ijk - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -centre * voxel
    img = nib.Nifti1Image(inside.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    return img


def task_names(n: int) -> list[str]:
    """``n`` task names shaped like Cognitive Atlas ones (spaces, a slash, mixed case)."""
    base = ["pain monitor/discrimination task", "n-back task", "Stroop task", "stop signal task",
            "face recognition task", "motor fMRI task paradigm", "monetary incentive delay task",
            "language processing fMRI task paradigm", "theory of mind task", "mental rotation task"]  # fmt: skip
    return [base[i] if i < len(base) else f"synthetic task {i}" for i in range(n)]


@dataclass
class TaskMap:
    """One synthetic map: ids, its task and sample size, and its z values over the mask voxels."""

    image_id: int
    collection_id: int
    task: str | None
    n: int
    z: np.ndarray | None


@dataclass
class TaskSet:
    """The mask, the tasks' signatures (tasks x mask voxels), the shared pattern and the maps."""

    mask_img: nib.Nifti1Image
    signatures: dict[str, np.ndarray]
    shared: np.ndarray
    maps: list[TaskMap] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.mask_img.dataobj) > 0

    def by_task(self) -> dict[str | None, list[TaskMap]]:
        out: dict[str | None, list[TaskMap]] = {}
        for m in self.maps:
            out.setdefault(m.task, []).append(m)
        return out


def _blobs(xyz: np.ndarray, rng: np.random.Generator, n_blobs: int, sigma: float) -> np.ndarray:
    centres = xyz[rng.choice(xyz.shape[0], size=n_blobs, replace=False)]
    out = np.zeros(xyz.shape[0])
    for c in centres:
        out += np.exp(-((xyz - c) ** 2).sum(1) / (2 * sigma**2))
    return out / out.max()


def _noise(rng: np.random.Generator, mask: np.ndarray, smooth_vox: float) -> np.ndarray:
    from scipy import ndimage

    field_ = rng.standard_normal(mask.shape)
    if smooth_vox > 0:
        field_ = ndimage.gaussian_filter(field_, smooth_vox)
    v = field_[mask]
    return (v - v.mean()) / v.std()


def make_task_maps(
    mask_img: nib.Nifti1Image,
    tasks: list[str],
    collections_per_task: int,
    maps_per_collection: int,
    *,
    seed: int = 0,
    amplitude: float = 3.0,
    common: float = 1.5,
    sigma: float = 12.0,
    n_blobs: int = 3,
    smooth_mm: float = 8.0,
    first_id: int = 10001,
    first_cid: int = 801,
    signatures_from: TaskSet | None = None,
    partial_every: int = 0,
    noise_pool: int = 0,
    sink: Callable[[TaskMap], None] | None = None,
) -> TaskSet:
    """Maps of every task in ``collections_per_task`` collections of ``maps_per_collection`` maps.

    ``signatures_from``: reuse another set's signatures and shared pattern (more maps of the same
    tasks, e.g. added later or held out), with new ids from ``first_id`` / ``first_cid``.
    ``partial_every``: every so many maps have no data (NaN) in the lowest quarter of the mask along
    z, as acquisitions that miss the cerebellum (0: full coverage).
    ``noise_pool``: draw that many smooth noise fields once and give each map the normalised sum of
    two of them with random signs (distinct maps at a fraction of the cost: benchmarks).
    ``sink``: each map is handed to it (e.g. written) and kept without its values (``z`` None), so
    that thousands of whole-brain maps never sit in memory together.
    """
    rng = np.random.default_rng(seed)
    mask = np.asarray(mask_img.dataobj) > 0
    ijk = np.argwhere(mask).T
    xyz = (mask_img.affine[:3, :3] @ ijk + mask_img.affine[:3, 3:4]).T
    if signatures_from is not None:
        sigs, shared = signatures_from.signatures, signatures_from.shared
    else:
        sig_rng = np.random.default_rng(seed + 7919)
        shared = _blobs(xyz, sig_rng, 4, 1.5 * sigma)
        sigs = {t: _blobs(xyz, sig_rng, n_blobs, sigma) for t in tasks}
    smooth_vox = smooth_mm / 2.3548 / float(abs(mask_img.affine[0, 0]))
    out = TaskSet(mask_img, dict(sigs), shared)
    low = xyz[:, 2] < np.quantile(xyz[:, 2], 0.25)
    pool = [_noise(rng, mask, smooth_vox) for _ in range(noise_pool)]

    def noise() -> np.ndarray:
        if not pool:
            return _noise(rng, mask, smooth_vox)
        a, b = rng.choice(len(pool), size=2, replace=False)
        return (rng.choice([-1.0, 1.0]) * pool[a] + rng.choice([-1.0, 1.0]) * pool[b]) / np.sqrt(2.0)

    iid, cid = first_id, first_cid
    for task in tasks:
        for _ in range(collections_per_task):
            for _ in range(maps_per_collection):
                z = amplitude * sigs[task] + common * shared + noise()
                if partial_every and len(out.maps) % partial_every == 0:
                    z[low] = np.nan
                m = TaskMap(iid, cid, task, int(rng.integers(15, 40)), z.astype(np.float32))
                if sink is not None:
                    sink(m)
                    m.z = None
                out.maps.append(m)
                iid += 1
            cid += 1
    return out


def _volume(values: np.ndarray, mask: np.ndarray, outside: float) -> np.ndarray:
    vol = np.full(mask.shape, outside, dtype=np.float32)
    vol[mask] = np.where(np.isfinite(values), values, outside)
    return vol


def write_zmap(root: str | os.PathLike, m: TaskMap, mask_img: nib.Nifti1Image) -> Path:
    """Write one map as ``root/images/{id}/zmap.nii.gz`` (NaN outside the mask) with its ``qc.json``."""
    d = Path(root) / "images" / str(m.image_id)
    d.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(_volume(m.z, np.asarray(mask_img.dataobj) > 0, np.nan), mask_img.affine)
    img.header.set_data_dtype(np.float32)
    nib.save(img, d / "zmap.nii.gz")
    qc = {"image_id": m.image_id, "collection_id": m.collection_id, "status": "included", "n": m.n,
          "map_type": "Z map"}  # fmt: skip
    (d / "qc.json").write_text(json.dumps(qc))
    return d / "zmap.nii.gz"


def write_zmaps(root: str | os.PathLike, tasks: TaskSet) -> dict[int, Path]:
    """:func:`write_zmap` for every map; returns ``{image_id: zmap path}``."""
    return {m.image_id: write_zmap(root, m, tasks.mask_img) for m in tasks.maps}


def _image_record(m: TaskMap, rel: str) -> dict[str, Any]:
    return {
        "url": f"{PUBLIC}/images/{m.image_id}/", "id": m.image_id, "file": f"{PUBLIC}/{rel}",
        "collection": f"{PUBLIC}/collections/{m.collection_id}/", "collection_id": m.collection_id,
        "cognitive_paradigm_cogatlas": m.task,
        "cognitive_paradigm_cogatlas_id": None if m.task is None else "trm_" + sha256(m.task.encode()).hexdigest()[:13],
        "cognitive_contrast_cogatlas": None, "cognitive_contrast_cogatlas_id": None,
        "map_type": "Z map", "analysis_level": "group", "name": f"{m.task or 'map'} {m.image_id}: Z statistic",
        "description": "synthetic", "is_valid": True, "data_origin": "volume", "target_template_image": "GenericMNI",
        "is_thresholded": False, "not_mni": False, "number_of_subjects": m.n, "modality": "fMRI-BOLD",
        "statistic_parameters": None, "contrast_definition": f"{m.task} vs baseline",
        "contrast_definition_cogatlas": None, "image_type": "statistic_map",
    }  # fmt: skip


def write_task_snapshot(
    root: str | os.PathLike, tasks: TaskSet, *, owner_of: dict[int, int] | None = None,
    name_of: dict[int, str] | None = None,
) -> Path:  # fmt: skip
    """Write the maps as a snapshot directory (Z maps on the mask's grid, 0 outside the mask, as SPM/FSL
    write them), one collection record per collection (``owner_of`` / ``name_of``: per-collection
    overrides, e.g. Neuroscout's owner id or a "temporary collection" name). Adding maps to an
    existing root adds their records and files."""
    from nvmeta.neurovault.layout import write_snapshot

    root = Path(root)
    mask = tasks.mask
    images, files, counts = [], {}, {}
    for m in tasks.maps:
        rel = f"media/images/{m.collection_id}/zstat_{m.image_id}.nii.gz"
        img = nib.Nifti1Image(_volume(m.z, mask, 0.0), tasks.mask_img.affine)
        img.header.set_data_dtype(np.float32)
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, dest)
        images.append(_image_record(m, rel))
        counts[m.collection_id] = counts.get(m.collection_id, 0) + 1
    collections = []
    for cid, n in counts.items():
        existing = root / "api" / "collections" / f"{cid}.json"
        if existing.exists():
            n += json.loads(existing.read_text())["number_of_images"]
        collections.append({
            "id": cid, "url": f"{PUBLIC}/collections/{cid}/", "owner": (owner_of or {}).get(cid, 2000 + cid % 7),
            "number_of_images": n, "name": (name_of or {}).get(cid, f"synthetic study {cid}"), "DOI": None,
            "private": False, "add_date": "2020-01-01T00:00:00Z", "modify_date": "2020-01-01T00:00:00Z",
        })  # fmt: skip
    write_snapshot(root, images, collections, files)
    return root


def run_atlas_stages(
    root: str | os.PathLike,
    tasks: TaskSet,
    zmaps: dict[int, Path],
    atlas: dict[str, Any],
    log: Any = None,
) -> Path:
    """The atlas' stages after the per-image jobs, as the workflow runs them (``atlas_terms``, one
    ``atlas_term`` per term, ``atlas_table``), on maps written by :func:`write_zmaps`; every map
    included. Returns ``root/atlas``."""
    import pandas as pd

    from nvmeta.decode.atlas import build_term, write_atlas_table
    from nvmeta.decode.terms import read_members, read_terms, write_terms
    from nvmeta.io import write_json, write_tsv

    d = Path(root) / "atlas"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": m.image_id, "collection_id": m.collection_id, "term": m.task} for m in tasks.maps]
    write_tsv(d / "groups.tsv", pd.DataFrame(rows))
    qc = [{"image_id": m.image_id, "collection_id": m.collection_id, "status": "included", "n": m.n}
          for m in tasks.maps]  # fmt: skip
    write_tsv(d / "qc.tsv", pd.DataFrame(qc))
    write_terms(d / "groups.tsv", d / "qc.tsv", atlas["min_maps"], atlas["min_collections"], d / "terms.tsv",
                d / "members.tsv", log)  # fmt: skip
    names = dict(zip(*(read_terms(d / "terms.tsv")[c] for c in ("slug", "term")), strict=True))
    members = read_members(d / "members.tsv")
    for slug, ms in members.items():
        build_term(names[slug], slug, ms, zmaps.__getitem__, tasks.mask_img, atlas, d / slug, log)
    write_json(d / "query_funnel.json", {"selected": len(tasks.maps)})
    write_atlas_table(d / "terms.tsv", [d / s / "summary.json" for s in members], d / "atlas.tsv", d / "atlas.png",
                      d / "query_funnel.json", log)  # fmt: skip
    return d
