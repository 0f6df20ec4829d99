"""Synthetic NeuroVault snapshots for benchmarks: realistic smooth t-maps on mixed grids, with metadata.

A snapshot (layout in :mod:`nvmeta.neurovault.layout`) of ``n_images`` group-level statistic maps spread over
collections of 1-30 images (or of exactly ``collection_size``, the last one smaller), readable as the API by ``nvmeta.neurovault.make_client({"url": root})`` and
servable by :class:`nvmeta.testing.server.FixtureServer`.

Maps
----
Each map is gaussian-smoothed white noise (FWHM 8-14 mm, unit SD in the brain) plus a few gaussian
blobs: four "consensus" foci shared by every map (bilateral insula, dorsal ACC, thalamus: amplitude
1-5, so a meta-analysis finds something) and one to three random foci of either sign, i.e. t values
roughly in [-6, 9]. Outside a brain mask (nilearn's MNI152 2 mm brain mask, dilated by one voxel and
mapped onto the map's grid) the value is 0 (as SPM/FSL write) or, for about a third of the maps, NaN.
About one map in ten has partial coverage (no data below z = -30 mm, as acquisitions that miss the
cerebellum). Grids, by share of the pool:

- 2 mm MNI 91x109x91, LAS (the SPM/FSL MNI grid; nvmeta maps it onto the template without interpolation), 50 %
- 2 mm MNI 91x109x91, RAS (x flipped; also on the template lattice), 20 %
- 3 mm 61x73x61, LAS (linear interpolation), 20 %
- 1.5 mm 121x145x121, RAS (linear interpolation), 10 %

All are float32 ``.nii.gz`` of 0.3-3 MB.

Reuse of a pool of files
------------------------
Writing 10,000 distinct gzipped maps takes long and gigabytes. Only ``pool`` distinct files
(default 50) are generated, under ``R/_pool/``; every image record has its own file name
(``media/images/{cid}/{stem}_{image_id}.nii.gz``) and ``file_size``, and that path is a **hard link**
to pool file ``image_index % pool`` (a copy when hard links are not possible). Downloads, requests
and per-image jobs are therefore per image as with real data; only the bytes repeat. Consequence:
with ``n_images > pool``, nvmeta's QC duplicate search (``qc.duplicate_r``) rightly excludes the
repeats as duplicates, so fan-ins downstream of ``qc.tsv`` see at most ``pool`` distinct maps
(use ``pool >= n_images`` where that matters).

Metadata
--------
85 % ``T map`` (``number_of_subjects`` 12-60; 3 % of T maps lack it, so QC excludes them with
"missing sample size") and 15 % ``Z map``; ``analysis_level`` group, ``modality`` fMRI-BOLD,
``image_type`` statistic_map, a contrast text and a Cognitive Atlas paradigm drawn from a small list,
``is_valid``/``not_mni``/``is_thresholded`` as nilearn's default terms expect. Image ids start at
``first_image_id`` (default 100001), collection ids at ``first_collection_id`` (default 5001).
Everything is deterministic given ``seed``.

Usage
-----
``python benchmarks/synth_snapshot.py ROOT --n-images 10000 [--pool 50] [--seed 0]``
(10,000 images with a pool of 50: about 1 min and 60 MB.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

PUBLIC = "https://neurovault.org"

#: (label, shape, voxel size (signed x), origin, share of the pool)
GRIDS = [
    ("2mm_LAS", (91, 109, 91), (-2.0, 2.0, 2.0), (90.0, -126.0, -72.0), 0.5),
    ("2mm_RAS", (91, 109, 91), (2.0, 2.0, 2.0), (-90.0, -126.0, -72.0), 0.2),
    ("3mm_LAS", (61, 73, 61), (-3.0, 3.0, 3.0), (90.0, -126.0, -72.0), 0.2),
    ("1.5mm_RAS", (121, 145, 121), (1.5, 1.5, 1.5), (-90.0, -126.0, -72.0), 0.1),
]

#: MNI coordinates (mm) of the foci every map shares (a pain-like network).
CONSENSUS = [(-38.0, 4.0, 4.0), (38.0, 4.0, 4.0), (0.0, 10.0, 40.0), (0.0, -18.0, 6.0)]

CONTRASTS = [
    ("painful stimulation vs baseline", "pain monitor/discrimination task"),
    ("faces vs houses", "face recognition task"),
    ("2-back vs 0-back", "n-back task"),
    ("incongruent vs congruent", "Stroop task"),
    ("left vs right button press", "motor fMRI task paradigm"),
    ("reward vs loss", "monetary incentive delay task"),
    ("stop vs go", "stop signal task"),
    ("story vs math", "language processing fMRI task paradigm"),
]
STEMS = {"T map": ["spmT_0001", "tstat1", "TStatistic", "t_map"], "Z map": ["zstat1", "spmZ_0001", "z_map"]}


def grid_affine(voxel: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    aff = np.diag([*voxel, 1.0])
    aff[:3, 3] = origin
    return aff


def _brain_mask_on(shape: tuple[int, int, int], affine: np.ndarray, template) -> np.ndarray:
    """nilearn's MNI brain mask (dilated by one voxel) sampled (nearest) on another grid."""
    from scipy import ndimage

    tmask = ndimage.binary_dilation(np.asarray(template.dataobj) > 0, iterations=1)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inv = np.linalg.inv(template.affine)
    tijk = np.rint(inv[:3, :3] @ xyz + inv[:3, 3:4]).astype(np.int64)
    ok = np.all((tijk >= 0) & (tijk < np.array(tmask.shape)[:, None]), axis=0)
    out = np.zeros(ijk.shape[1], dtype=bool)
    out[ok] = tmask[tijk[0, ok], tijk[1, ok], tijk[2, ok]]
    return out.reshape(shape)


def synth_map(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    brain: np.ndarray,
    *,
    nan_background: bool,
    partial: bool,
) -> np.ndarray:
    """One smooth t-like map (float32) on the grid (``shape``, ``affine``)."""
    from scipy import ndimage

    vox = float(abs(affine[0, 0]))
    fwhm = rng.uniform(8.0, 14.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), fwhm / 2.3548 / vox)
    noise /= noise[brain].std()
    # world coordinates of each axis (the affines here are diagonal)
    axes = [affine[a, a] * np.arange(shape[a], dtype=np.float32) + affine[a, 3] for a in range(3)]
    foci = [(c, rng.uniform(1.0, 5.0)) for c in CONSENSUS]
    for _ in range(rng.integers(1, 4)):
        c = tuple(rng.uniform([-60, -90, -30], [60, 50, 60]))
        foci.append((c, rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 5.0)))
    data = noise
    for (cx, cy, cz), amp in foci:
        s = rng.uniform(5.0, 9.0)
        gx = np.exp(-((axes[0] - cx) ** 2) / (2 * s * s))
        gy = np.exp(-((axes[1] - cy) ** 2) / (2 * s * s))
        gz = np.exp(-((axes[2] - cz) ** 2) / (2 * s * s))
        data += np.float32(amp) * gx[:, None, None] * gy[None, :, None] * gz[None, None, :]
    keep = brain.copy()
    if partial:
        keep &= (axes[2] >= -30.0)[None, None, :]
    data[~keep] = np.nan if nan_background else 0.0
    return data.astype(np.float32)


def make_pool(pool_dir: Path, n: int, seed: int = 0, log=print) -> list[dict]:
    """Write ``n`` distinct map files into ``pool_dir``; return their descriptions."""
    import nibabel as nib

    from nvmeta.images.template import load_mask

    template = load_mask("mni152_2mm")
    rng = np.random.default_rng(seed)
    pool_dir.mkdir(parents=True, exist_ok=True)
    shares = np.array([g[4] for g in GRIDS])
    counts = np.maximum(1, np.round(shares * n).astype(int)) if n >= len(GRIDS) else np.ones(n, int)
    order = [gi for gi, c in enumerate(counts) for _ in range(c)][:n]
    while len(order) < n:
        order.append(0)
    brains: dict[int, np.ndarray] = {}
    out = []
    t0 = time.perf_counter()
    for j, gi in enumerate(order):
        label, shape, voxel, origin, _ = GRIDS[gi]
        affine = grid_affine(voxel, origin)
        if gi not in brains:
            brains[gi] = _brain_mask_on(shape, affine, template)
        nan_bg = bool(rng.random() < 0.33)
        partial = bool(rng.random() < 0.1)
        data = synth_map(rng, shape, affine, brains[gi], nan_background=nan_bg, partial=partial)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
        path = pool_dir / f"pool_{j:04d}_{label}.nii.gz"
        nib.save(img, path)
        out.append(
            {
                "path": path,
                "grid": label,
                "nan_background": nan_bg,
                "partial": partial,
                "bytes": path.stat().st_size,
            }
        )
    log(f"pool: {n} maps in {time.perf_counter() - t0:.1f}s")
    return out


def _collection_record(cid: int, n_images: int, k: int) -> dict:
    return {
        "id": cid,
        "url": f"{PUBLIC}/collections/{cid}/",
        "download_url": f"{PUBLIC}/collections/{cid}/download",
        "owner": 1000 + k % 97,
        "contributors": "",
        "owner_name": f"user{k % 97}",
        "number_of_images": n_images,
        "name": f"Synthetic study {k}: {CONTRASTS[k % len(CONTRASTS)][1]}",
        "DOI": f"10.0000/synthetic.{cid}" if k % 3 == 0 else None,
        "authors": f"Author{k} A, Author{k + 1} B",
        "paper_url": "",
        "journal_name": "",
        "description": "Synthetic collection generated by benchmarks/synth_snapshot.py.",
        "full_dataset_url": "",
        "private": False,
        "add_date": "2019-01-01T00:00:00.000000Z",
        "modify_date": "2019-01-02T00:00:00.000000Z",
        "type_of_design": "blocked",
        "software_package": ["SPM", "FSL", "AFNI"][k % 3],
        "software_version": "",
        "field_strength": 3.0,
        "smoothing_fwhm": 8.0,
        "group_comparison": False,
        "number_of_rejected_subjects": None,
        "nutbrain_food_viewing_conditions": None,
    }


def _image_record(iid: int, cid: int, rel: str, nbytes: int, map_type: str, n: int | None, k: int) -> dict:
    contrast, paradigm = CONTRASTS[k % len(CONTRASTS)]
    kind = "T statistic" if map_type == "T map" else "Z statistic"
    return {
        "url": f"{PUBLIC}/images/{iid}/",
        "id": iid,
        "file": f"{PUBLIC}/{rel}",
        "collection": f"{PUBLIC}/collections/{cid}/",
        "collection_id": cid,
        "file_size": nbytes,
        "cognitive_paradigm_cogatlas": paradigm,
        "cognitive_paradigm_cogatlas_id": None,
        "cognitive_contrast_cogatlas": None,
        "cognitive_contrast_cogatlas_id": None,
        "map_type": map_type,
        "analysis_level": "group",
        "name": f"{contrast}: {kind} ({iid})",
        "description": f"Synthetic group-level {kind.lower()} map, {contrast}.",
        "add_date": "2019-01-01T00:00:00.000000Z",
        "modify_date": "2019-01-02T00:00:00.000000Z",
        "is_valid": True,
        "surface_left_file": None,
        "surface_right_file": None,
        "data_origin": "volume",
        "target_template_image": "GenericMNI",
        "subject_species": "homo sapiens",
        "figure": None,
        "handedness": None,
        "age": None,
        "gender": None,
        "thumbnail": None,
        "reduced_representation": None,
        "is_thresholded": False,
        "perc_bad_voxels": 60.0,
        "not_mni": False,
        "brain_coverage": 92.0,
        "perc_voxels_outside": 2.0,
        "number_of_subjects": n,
        "modality": "fMRI-BOLD",
        "statistic_parameters": None,
        "smoothness_fwhm": None,
        "contrast_definition": contrast,
        "contrast_definition_cogatlas": None,
        "cognitive_paradigm_description_url": None,
        "image_type": "statistic_map",
    }


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def make_snapshot(
    root: str | os.PathLike,
    n_images: int,
    pool: int = 50,
    seed: int = 0,
    first_image_id: int = 100001,
    first_collection_id: int = 5001,
    log=print,
    collection_size: int | None = None,
) -> dict:
    """Write a synthetic snapshot of ``n_images`` images under ``root`` (see the module docstring).

    ``collection_size``: images per collection (the last one takes the rest); by default each
    collection draws 1-30.

    Returns
    -------
    dict
        ``root``, ``image_ids``, ``collection_ids``, ``pool`` (descriptions of the distinct files),
        ``seconds``.
    """
    from nvmeta.neurovault.layout import write_snapshot

    if collection_size is not None and collection_size < 1:
        raise ValueError(f"collection_size must be at least 1, not {collection_size}")
    t0 = time.perf_counter()
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    files = make_pool(root / "_pool", min(pool, n_images), seed=seed, log=log)
    images, collections = [], []
    iid, cid, k = first_image_id, first_collection_id, 0
    while len(images) < n_images:
        drawn = rng.integers(1, 31) if collection_size is None else collection_size
        size = int(min(drawn, n_images - len(images)))
        for _ in range(size):
            j = len(images)
            map_type = "T map" if rng.random() < 0.85 else "Z map"
            n = int(rng.integers(12, 61)) if map_type == "T map" and rng.random() >= 0.03 else None
            stem = STEMS[map_type][j % len(STEMS[map_type])]
            rel = f"media/images/{cid}/{stem}_{iid}.nii.gz"
            src = files[j % len(files)]
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.unlink()
            _link(src["path"], dest)
            images.append(_image_record(iid, cid, rel, src["bytes"], map_type, n, k))
            iid += 1
        collections.append(_collection_record(cid, size, k))
        cid += 1
        k += 1
    write_snapshot(root, images, collections)
    (root / "SYNTHETIC.json").write_text(
        json.dumps(
            {
                "generator": "benchmarks/synth_snapshot.py",
                "n_images": n_images,
                "pool": len(files),
                "seed": seed,
                "pool_files": [
                    {**{k: v for k, v in f.items() if k != "path"}, "name": f["path"].name} for f in files
                ],
            },
            indent=1,
        )
    )
    secs = time.perf_counter() - t0
    log(
        f"snapshot: {n_images} images in {len(collections)} collections, {len(files)} distinct files, {secs:.1f}s"
    )
    return {
        "root": root,
        "image_ids": [r["id"] for r in images],
        "collection_ids": [c["id"] for c in collections],
        "images": images,
        "pool": files,
        "seconds": secs,
    }


def copy_records(images: list[dict]) -> list[dict]:
    """Deep copies of image records (helper for benchmarks that edit them)."""
    return copy.deepcopy(images)


# ------------------------------------------------------------------------------------------------
# helpers shared by the benchmark scripts: a throw-away copy of the workflow and a timed snakemake run
# ------------------------------------------------------------------------------------------------
from nvmeta.testing.workdir import copy_workflow  # noqa: E402

#: Where the workflow and the ``nvmeta`` package under test come from (None: this checkout).
CHECKOUT: Path | None = None


def use_checkout(path: str | os.PathLike | None) -> None:
    """Benchmark another tree (e.g. ``git archive COMMIT | tar -x -C DIR``): workflow copies come from
    ``path`` and every ``snakemake`` this process starts imports ``nvmeta`` from there
    (``PYTHONPATH``); the benchmark's own helpers still run this checkout's code."""
    global CHECKOUT
    if path is None:
        return
    CHECKOUT = Path(path).resolve()
    if not (CHECKOUT / "Snakefile").is_file() or not (CHECKOUT / "nvmeta").is_dir():
        sys.exit(f"--checkout {path}: no Snakefile and nvmeta/ there")
    os.environ["PYTHONPATH"] = str(CHECKOUT)


def make_workdir(wf: str | os.PathLike, config: dict) -> Path:
    """Copy the workflow into ``wf`` with ``config`` as ``bench.yaml`` (default profile included)."""
    return copy_workflow(wf, config, "bench.yaml", source=CHECKOUT)


def snakemake(wf: Path, *args: str, cores: int = 2, check: bool = True, prefix: tuple[str, ...] = ()):
    """Run ``python -m snakemake --cores N ARGS --configfile bench.yaml`` in ``wf`` (the config file last:
    ``--configfile`` takes several values and would swallow targets).

    Returns ``(wall seconds, CompletedProcess)``; stdout and stderr are merged in ``.stdout``.
    ``prefix`` goes between the interpreter and ``-m snakemake``, e.g. ``("-m", "cProfile", "-o", out)``.
    """
    import subprocess

    cmd = [
        sys.executable,
        *prefix,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        *args,
        "--configfile",
        "bench.yaml",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    secs = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-5000:]}")
    return secs, proc


def load_note() -> str:
    """Load averages and core count, to print next to every figure (the machine is shared)."""
    la = os.getloadavg()
    return f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--pool", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.root.exists() and any(a.root.iterdir()):
        sys.exit(f"{a.root} exists and is not empty")
    make_snapshot(a.root, a.n_images, pool=a.pool, seed=a.seed)


if __name__ == "__main__":
    main()
