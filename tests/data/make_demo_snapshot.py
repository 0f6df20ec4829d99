"""Build the bundled offline demo snapshot ``tests/data/snapshot`` from a NeuroVault sample folder
(the pain maps, NeuroVault's test maps and recorded API replies; not part of the repository).

Run once by a maintainer (a fresh clone already has the result committed and needs no sample)::

    python tests/data/make_demo_snapshot.py /path/to/shared/neurovault-sample

The layout is the one read by :class:`nvmeta.neurovault.layout.Snapshot` (see README, "Snapshot layout").
Image records follow the shape of NeuroVault's real replies (``api_responses/read_image.json``).
Image ids 990001-990034 are placeholders: the real NeuroVault ids of these NIDM-derived pain maps
and NeuroVault test fixtures are not known offline. Ids 396069 and 10426 are real.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "snapshot"
NV = "https://neurovault.org"


def image_record(template: dict, **fields) -> dict:
    rec = copy.deepcopy(template)
    for key in ("surface_left_file", "surface_right_file", "reduced_representation", "thumbnail"):
        rec[key] = None
    rec.update(
        {
            "cognitive_paradigm_cogatlas": None,
            "cognitive_paradigm_cogatlas_id": None,
            "cognitive_contrast_cogatlas": None,
            "cognitive_contrast_cogatlas_id": None,
            "analysis_level": "group",
            "description": "",
            "is_valid": True,
            "contrast_definition": None,
            "statistic_parameters": None,
            "number_of_subjects": None,
            "image_type": "statistic_map",
        }
    )
    rec.update(fields)
    iid, cid = rec["id"], rec["collection_id"]
    rec["url"] = f"{NV}/images/{iid}/"
    rec["collection"] = f"{NV}/collections/{cid}/"
    return rec


def collection_record(template: dict, **fields) -> dict:
    rec = copy.deepcopy(template)
    rec.update(fields)
    rec["url"] = f"{NV}/collections/{rec['id']}/"
    rec["download_url"] = rec["url"] + "download"
    return rec


def main(sample: Path) -> None:
    img_t = json.loads((sample / "api_responses/read_image.json").read_text())["response"]["json"]
    col_t = json.loads((sample / "api_responses/read_collection.json").read_text())["response"]["json"]
    if OUT.exists():
        shutil.rmtree(OUT)
    images: list[tuple[dict, dict[str, Path]]] = []

    def add(rec: dict, files: dict[str, Path]) -> None:
        images.append((rec, files))

    # 21 pain t-maps (collection 1425) with their sample sizes (pbj samplesize.csv == NiMARE).
    pain = sorted((sample / "pain21_collection1425").glob("pain_*_tstat_derived.nii.gz"))
    assert len(pain) == 21, pain
    for k, path in enumerate(pain, start=1):
        side = json.loads(path.with_suffix("").with_suffix(".json").read_text())
        name = f"pain_{k:02d}"
        rel = f"images/1425/{name}.nidm/TStatistic.nii.gz"
        add(
            image_record(
                img_t,
                id=990000 + k,
                collection_id=1425,
                name=f"{name}: T statistic",
                map_type="T map",
                number_of_subjects=side["number_of_subjects"],
                contrast_definition="painful stimulation vs baseline (group-level pain contrast)",
                cognitive_paradigm_cogatlas="pain monitor/discrimination task",
                description=f"Group-level pain t-map of study {name} (NIDM-Results pain dataset), "
                "t = contrast / standard error.",
                file=f"{NV}/media/{rel}",
                file_size=path.stat().st_size,
                modify_date=f"2016-04-26T13:30:{k:02d}.000000Z",
                add_date="2016-04-26T13:30:00.000000Z",
                brain_coverage=90.0,
                perc_bad_voxels=75.0,
                perc_voxels_outside=2.0,
            ),
            {rel: path},
        )
    # A real truncated gzip, served as an image of the same collection (download must refuse it).
    bad = sample / "pain21_collection1425/corrupt_truncated_gzip.nii.gz"
    rel = "images/1425/contrast_.nii.gz"
    add(
        image_record(
            img_t,
            id=990022,
            collection_id=1425,
            name="pain_22: contrast (truncated upload)",
            map_type="T map",
            number_of_subjects=20,
            contrast_definition="painful stimulation vs baseline (group-level pain contrast)",
            file=f"{NV}/media/{rel}",
            file_size=bad.stat().st_size,
            modify_date="2016-04-26T13:31:00.000000Z",
        ),
        {rel: bad},
    )
    fx = sample / "neurovault_server_fixtures"
    # Image 396069 as recorded (Z map, no sample size needed).
    rec = copy.deepcopy(img_t)
    rec["image_type"] = "statistic_map"
    rec["contrast_definition"] = "lip movement vs rest (motor task)"
    add(rec, {"images/8477/motor_lips.nii.gz": fx / "motor_lips.nii.gz"})
    # NaN-background variant.
    add(
        image_record(
            img_t,
            id=990031,
            collection_id=1615,
            name="motor lips, NaN background",
            map_type="Z map",
            contrast_definition="lip movement vs rest (motor task)",
            file=f"{NV}/media/images/1615/motor_lips_nan.nii.gz",
            file_size=(fx / "motor_lips_nan.nii.gz").stat().st_size,
        ),
        {"images/1615/motor_lips_nan.nii.gz": fx / "motor_lips_nan.nii.gz"},
    )
    # AFNI 5-D file with two sub-bricks (mean, Tstat df=22).
    add(
        image_record(
            img_t,
            id=990032,
            collection_id=1616,
            name="saccade I-C (AFNI 3dttest, two sub-bricks)",
            map_type="T map",
            number_of_subjects=23,
            statistic_parameters=22.0,
            contrast_definition="saccade incongruent vs congruent",
            file=f"{NV}/media/images/1616/saccade.I_C.MNI.nii.gz",
            file_size=(fx / "saccade.I_C.MNI.nii.gz").stat().st_size,
        ),
        {"images/1616/saccade.I_C.MNI.nii.gz": fx / "saccade.I_C.MNI.nii.gz"},
    )
    # SPM Analyze pair (.hdr + .img), T map with df = 14, non-MNI grid.
    add(
        image_record(
            img_t,
            id=990033,
            collection_id=1617,
            name="box 0-back vs 1-back (SPM Analyze)",
            map_type="T map",
            number_of_subjects=15,
            statistic_parameters=14.0,
            contrast_definition="0-back vs 1-back working memory",
            cognitive_paradigm_cogatlas="n-back task",
            file=f"{NV}/media/images/1617/box_0b_vs_1b.hdr",
            file_size=(fx / "box_0b_vs_1b.hdr").stat().st_size,
        ),
        {
            "images/1617/box_0b_vs_1b.hdr": fx / "box_0b_vs_1b.hdr",
            "images/1617/box_0b_vs_1b.img": fx / "box_0b_vs_1b.img",
        },
    )
    # A beta map (not a t/z statistic: must be excluded by map type).
    add(
        image_record(
            img_t,
            id=990034,
            collection_id=1617,
            name="beta 1 (SPM)",
            map_type="univariate-beta map",
            number_of_subjects=15,
            file=f"{NV}/media/images/1617/beta_0001.nii.gz",
            file_size=(fx / "beta_0001.nii.gz").stat().st_size,
        ),
        {"images/1617/beta_0001.nii.gz": fx / "beta_0001.nii.gz"},
    )
    # nilearn's sample image 10426 (collection 658): T map, no sample size recorded.
    p = sample / "nilearn_image_10426/image_10426.nii.gz"
    add(
        image_record(
            img_t,
            id=10426,
            collection_id=658,
            name="left vs right button press",
            map_type="T map",
            contrast_definition="left vs right button press",
            cognitive_paradigm_cogatlas="motor fMRI task paradigm",
            file=f"{NV}/media/images/658/image_10426.nii.gz",
            file_size=p.stat().st_size,
        ),
        {"images/658/image_10426.nii.gz": p},
    )

    collections = {
        1425: dict(
            name="NIDM-Results pain dataset: 21 group-level pain studies (derived t-maps)",
            DOI="10.1038/sdata.2016.102",
            authors="Maumet C, Auer T, Bowring A, et al.",
            description="21 pain studies shared as NIDM-Results packs (Maumet et al. 2016).",
        ),
        8477: dict(),
        1615: dict(name="motor lips test maps", DOI=None, description="NeuroVault test maps (motor task)."),
        1616: dict(name="saccade AFNI example", DOI=None, description="AFNI 3dttest++ output, 5-D."),
        1617: dict(name="SPM box example", DOI=None, description="SPM Analyze output (n-back task)."),
        658: dict(
            name="button press example", DOI=None, description="Motor task, left vs right button press."
        ),
    }
    for cid, fields in collections.items():
        n = sum(1 for rec, _ in images if rec["collection_id"] == cid)
        rec = collection_record(col_t, id=cid, number_of_images=n, **fields)
        dest = OUT / "api/collections" / f"{cid}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(rec, indent=1) + "\n")
    manifest = []
    for rec, files in images:
        dest = OUT / "api/images" / f"{rec['id']}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(rec, indent=1) + "\n")
        for rel, src in files.items():
            d = OUT / "media" / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, d)
            manifest.append(
                {
                    "image_id": rec["id"],
                    "path": f"media/{rel}",
                    "md5": hashlib.md5(src.read_bytes()).hexdigest(),
                }
            )
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(images)} images, {len(collections)} collections to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/make_demo_snapshot.py SAMPLE_DIR")
    main(Path(sys.argv[1]))
