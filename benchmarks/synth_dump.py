"""A synthetic NeuroVault database export (nv-data layout) at full scale, for benchmarks.

Writes ``<dest>.tar.gz`` holding ``neurovault_data/statmaps_*.csv`` in the layout of the published
exports (``docs/neurovault-dump.md``; the same writer conventions as :mod:`nvmeta.testing.dump`):
codes instead of labels, ``t``/``f`` booleans, empty fields for missing values, quoted multi-line
descriptions, a ``data`` JSON column, and the ~90 acquisition columns of the collection table
reduced to a handful of extra ones. Proportions follow the February 2024 export as described there:

- ``n_maps`` statistic maps (default 560,000) in ``n_collections`` collections (default 14,000),
  collection sizes heavy-tailed; one automated owner (owner_id 5761, "Neuroscout") holds about half
  the maps in large collections; 4 % of the collections are private;
- map types: T 45 %, Z 18 %, U (beta) 2.5 %, F 3 %, P 2 %, Other 25 %, R/A/Pa/V the rest;
  analysis level: single-subject 55 %, group 30 %, other (NIDM, with n = 0) 5 %, empty 10 %;
- task key: the literal ``None`` for ~300,000 maps, empty for 10 %, else one of 800 tasks;
- ~2 % of the items are not statistic maps (atlases: in basecollectionitem and image only).

Deterministic given ``--seed``. Usage::

    python benchmarks/synth_dump.py /tmp/nv_dump --n-maps 560000

(about 1 minute and 150 MB for the default size).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nvmeta.neurovault.dump import TABLES as TABLE_FILES  # the export's file names, one source

MAP_CODES = ["T", "Z", "U", "F", "P", "Other", "R", "A", "Pa", "V", "X2", "IP", "M"]
MAP_P = [0.45, 0.18, 0.025, 0.03, 0.02, 0.25, 0.02, 0.005, 0.005, 0.0001, 0.005, 0.003, 0.0069]
LEVELS = ["S", "G", "Other", ""]
LEVEL_P = [0.55, 0.30, 0.05, 0.10]


def make_tables(n_maps: int, n_collections: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The six tables as DataFrames of strings (the CSV cells)."""
    rng = np.random.default_rng(seed)
    n_items = int(n_maps * 1.02)
    cids = np.arange(1, n_collections + 1)
    # heavy-tailed sizes: half the items in the 2 % largest ("Neuroscout") collections
    big = rng.random(n_collections) < 0.02
    w = np.where(big, rng.pareto(1.0, n_collections) + 50.0, rng.pareto(1.5, n_collections) + 1.0)
    w[big] *= (0.5 / 0.5) * w[~big].sum() / w[big].sum()
    item_cid = rng.choice(cids, size=n_items, p=w / w.sum())
    item_cid.sort()
    item_ids = np.arange(1, n_items + 1)
    private = rng.random(n_collections) < 0.04
    owner = np.where(big, 5761, rng.integers(1, 20_000, n_collections))
    descs = np.array(
        [
            "",
            "Group maps of a pain study.\nSecond line, with a comma.",
            'A "quoted" word, a comma\nand a line',
        ]
    )
    collection = pd.DataFrame(
        {
            "id": cids.astype(str),
            "name": [f"collection {c}" for c in cids],
            "DOI": np.where(rng.random(n_collections) < 0.3, [f"10.1000/x{c}" for c in cids], ""),
            "authors": "A. Author, B. Author",
            "paper_url": "",
            "description": descs[rng.integers(0, 3, n_collections)],
            "private": np.where(private, "t", "f"),
            "private_token": np.where(private, "tok", ""),
            "add_date": "2019-05-01 12:00:00+00",
            "modify_date": "2020-05-01 12:00:00+00",
            "owner_id": owner.astype(str),
            "journal_name": "",
            "software_package": rng.choice(["SPM", "FSL", "AFNI", ""], n_collections),
            "smoothing_fwhm": "",
            "type_of_design": rng.choice(["blocked", "eventrelated", ""], n_collections),
        }
    )
    is_map = rng.random(n_items) >= 0.02
    item = pd.DataFrame(
        {
            "id": item_ids.astype(str),
            "name": [f"map {i}" for i in item_ids],
            "description": descs[rng.integers(0, 3, n_items)],
            "add_date": "2019-05-01 12:00:00+00",
            "modify_date": "2020-05-01 12:00:00+00",
            "collection_id": item_cid.astype(str),
            "polymorphic_ctype_id": np.where(is_map, "30", "31"),
            "is_valid": np.where(rng.random(n_items) < 0.97, "t", "f"),
        }
    )
    nidm = rng.random(n_items) < 0.05
    files = [
        f"images/{c}/pack_{i}.nidm/TStatistic.nii.gz" if m else f"images/{c}/map_{i}.nii.gz"
        for c, i, m in zip(item_cid, item_ids, nidm, strict=True)
    ]
    image = pd.DataFrame(
        {
            "basecollectionitem_ptr_id": item_ids.astype(str),
            "file": files,
            "data": [json.dumps({"custom_field": int(i % 7)}) for i in item_ids],
            "target_template_image": "GenericMNI",
            "subject_species": "homo sapiens",
            "data_origin": "volume",
            "thumbnail": [f"images/{c}/glass_brain_{i}.jpg" for c, i in zip(item_cid, item_ids, strict=True)],
            "reduced_representation": "",
            "surface_left_file": "",
            "surface_right_file": "",
        }
    )
    sm = item_ids[is_map]
    n_sm = len(sm)
    tasks = [f"trm_{k:05d}" for k in range(800)]
    task_key = np.where(
        rng.random(n_sm) < 300_000 / 560_000,
        "None",
        np.where(rng.random(n_sm) < 0.2, "", np.array(tasks)[rng.integers(0, 800, n_sm)]),
    )
    level = rng.choice(LEVELS, n_sm, p=LEVEL_P)
    n_sub = rng.integers(8, 200, n_sm).astype(str)
    n_sub = np.where(level == "Other", "0", np.where(rng.random(n_sm) < 0.3, "", n_sub))
    statmap = pd.DataFrame(
        {
            "image_ptr_id": sm.astype(str),
            "map_type": rng.choice(MAP_CODES, n_sm, p=np.array(MAP_P) / sum(MAP_P)),
            "statistic_parameters": np.where(rng.random(n_sm) < 0.05, "24.0", ""),
            "smoothness_fwhm": "",
            "contrast_definition": np.where(rng.random(n_sm) < 0.5, "task > baseline", ""),
            "contrast_definition_cogatlas": "",
            "modality": rng.choice(["fMRI-BOLD", "fMRI-BOLD", "fMRI-BOLD", "PET FDG", "Other", ""], n_sm),
            "cognitive_paradigm_cogatlas_id": task_key,
            "cognitive_contrast_cogatlas_id": "",
            "is_thresholded": np.where(rng.random(n_sm) < 0.1, "t", "f"),
            "not_mni": np.where(rng.random(n_sm) < 0.05, "t", "f"),
            "brain_coverage": "85.2",
            "perc_bad_voxels": "3.1",
            "perc_voxels_outside": "1.2",
            "analysis_level": level,
            "number_of_subjects": n_sub,
            "ignore_file_warning": "f",
            "cognitive_paradigm_description_url": "",
        }
    )
    task = pd.DataFrame(
        {"name": ["None / Other"] + [f"task {k}" for k in range(800)], "cog_atlas_id": ["None", *tasks]}
    )
    contrast = pd.DataFrame({"name": ["c"], "cog_atlas_id": ["cnt_1"], "task_id": [tasks[0]]})
    return {
        "collection": collection,
        "item": item,
        "image": image,
        "statmap": statmap,
        "task": task,
        "contrast": contrast,
    }


def write_synthetic_dump(dest: Path, n_maps: int, n_collections: int, seed: int = 0) -> Path:
    """Write ``dest`` (a ``.tar.gz``); return it."""
    tables = make_tables(n_maps, n_collections, seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
            for name, df in tables.items():
                path = Path(tmp) / TABLE_FILES[name]
                df.to_csv(path, index=False)
                tar.add(path, arcname=f"neurovault_data/{TABLE_FILES[name]}")
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", type=Path, help="output path (.tar.gz appended when missing)")
    p.add_argument("--n-maps", type=int, default=560_000)
    p.add_argument("--n-collections", type=int, default=14_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dest = (
        args.dest if args.dest.name.endswith(".tar.gz") else args.dest.with_name(args.dest.name + ".tar.gz")
    )
    t0 = time.perf_counter()
    write_synthetic_dump(dest, args.n_maps, args.n_collections, args.seed)
    print(f"{dest}: {dest.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
