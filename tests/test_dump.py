"""Selecting from a NeuroVault database export (nvmeta.neurovault.dump): small dumps in the real
layout with every pitfall, checked against independent pandas queries on the same CSV files."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile

import pandas as pd
import pytest
from conftest import fast_config, md5, nifti_bytes

from nvmeta.images.download import fetch_image
from nvmeta.neurovault import make_client
from nvmeta.neurovault.dump import DumpError, DumpSource
from nvmeta.neurovault.layout import write_snapshot
from nvmeta.select.query import query_job, read_selection_ids, run_query, select
from nvmeta.testing.dump import write_dump
from nvmeta.testing.server import FixtureServer

LOG = logging.getLogger("test_dump")
MEDIA = "https://neurovault.org/media/"
DESCRIPTION = 'Line one, with a comma\nline two "quoted"\n\nline four'

# image id -> (collection, map_type code, analysis_level code, n, task key, thresholded, not_mni)
MAPS = {
    10: (1, "T", "G", "20", "trm_pain", "f", "f"),
    11: (1, "Z", "G", "25", "None", "f", "f"),  # the literal task key None ("None / Other")
    12: (1, "T", "S", "1", "", "f", "f"),  # single subject, no task
    13: (1, "T", "G", "18", "trm_pain", "t", "f"),  # thresholded
    14: (1, "R", "G", "", "", "f", "f"),  # ROI/mask
    15: (1, "U", "G", "30", "None", "f", "f"),  # univariate beta
    20: (2, "T", "G", "40", "trm_pain", "f", "f"),  # private collection: never selected
    30: (3, "T", "Other", "0", "", "f", "f"),  # NIDM map: analysis level "other", n = 0
    31: (3, "T", "G", "12", "trm_pain", "f", "t"),  # not MNI
    32: (3, "P", "G", "12", "trm_wm", "f", "f"),
    33: (3, "T", "G", "22", "trm_wm", "f", "f"),
    40: (5, "T", "G", "16", "trm_pain", "f", "f"),  # collection 5: private flag empty -> not public
}


def dump_tables(tmp_path=None) -> dict:
    collections = [
        {"id": 1, "name": 'Pain, "hot"', "description": DESCRIPTION, "private": "f", "owner_id": 7},
        {"id": 2, "name": "secret", "private": "t", "private_token": "abc", "owner_id": 8},
        {"id": 3, "name": "NIDM pack", "description": "x", "private": "f", "owner_id": 9,
         "software_package": "FSL"},
        {"id": 4, "name": "empty", "private": "f", "owner_id": 9},
        {"id": 5, "name": "unknown privacy", "private": "", "owner_id": 9},
    ]  # fmt: skip
    items, images, stats = [], [], []
    for iid, (cid, mt, level, n, task, thr, notmni) in MAPS.items():
        items.append(
            {
                "id": iid,
                "name": f"map {iid}",
                "description": DESCRIPTION if iid == 10 else "",
                "add_date": "2020-01-01 10:00:00+00",
                "modify_date": "2021-02-03 04:05:06+00",
                "collection_id": cid,
                "polymorphic_ctype_id": 30,
                "is_valid": "t",
            }
        )
        fname = f"pain_{iid}.nidm/TStatistic.nii.gz" if cid == 3 else f"map {iid}.nii.gz"
        images.append(
            {
                "basecollectionitem_ptr_id": iid,
                "file": f"images/{cid}/{fname}",
                "data": json.dumps({"custom": iid}),
                "target_template_image": "GenericMNI",
                "subject_species": "homo sapiens",
                "data_origin": "volume",
            }
        )
        stats.append(
            {
                "image_ptr_id": iid,
                "map_type": mt,
                "statistic_parameters": "19.0" if iid == 10 else "",
                "modality": "fMRI-BOLD",
                "contrast_definition": 'pain > rest, "warm"\nsecond line' if iid == 10 else "",
                "cognitive_paradigm_cogatlas_id": task,
                "cognitive_contrast_cogatlas_id": "cnt_pain" if task == "trm_pain" else "",
                "is_thresholded": thr,
                "not_mni": notmni,
                "brain_coverage": "88.5",
                "analysis_level": level,
                "number_of_subjects": n,
                "ignore_file_warning": "f",
            }
        )
    # an atlas: a collection item and an image, but not a statistic map
    items.append({"id": 50, "name": "atlas", "collection_id": 1, "is_valid": "t"})
    images.append({"basecollectionitem_ptr_id": 50, "file": "images/1/atlas.nii.gz"})
    tasks = [
        {"name": "pain task", "cog_atlas_id": "trm_pain"},
        {"name": "None / Other", "cog_atlas_id": "None"},
        {"name": "working memory", "cog_atlas_id": "trm_wm"},
    ]
    contrasts = [{"name": "pain vs rest", "cog_atlas_id": "cnt_pain", "task_id": "trm_pain"}]
    return {
        "collection": collections,
        "item": items,
        "image": images,
        "statmap": stats,
        "task": tasks,
        "contrast": contrasts,
    }


@pytest.fixture
def dump(tmp_path):
    return write_dump(tmp_path / "november_2022.tar.gz", dump_tables())


# ------------------------------------------------------------------------------------------------
# independent reference: pandas on the CSV files, written here without nvmeta
# ------------------------------------------------------------------------------------------------
def reference(path) -> pd.DataFrame:
    """Public statistic maps with API labels, by (collection, id), from the .tar.gz with pandas."""
    with tarfile.open(path) as tar:

        def read(name):
            member = next(m for m in tar.getmembers() if m.name.endswith("/" + name))
            return pd.read_csv(tar.extractfile(member), dtype=str, keep_default_na=False)

        col = read("statmaps_collection.csv")
        item = read("statmaps_basecollectionitem.csv")
        img = read("statmaps_image.csv")
        stat = read("statmaps_statisticmap.csv")
        task = read("statmaps_cognitiveatlastask.csv")
    public = col[col["private"] == "f"]
    df = stat.merge(img, left_on="image_ptr_id", right_on="basecollectionitem_ptr_id").merge(
        item, left_on="image_ptr_id", right_on="id"
    )
    df = df[df["collection_id"].isin(public["id"])].copy()
    df["id"] = df["id"].astype(int)
    df["collection_id"] = df["collection_id"].astype(int)
    labels = {
        "T": "T map",
        "Z": "Z map",
        "R": "ROI/mask",
        "U": "univariate-beta map",
        "P": "P map (given null hypothesis)",
    }
    df["map_label"] = df["map_type"].map(labels)
    df["level_label"] = df["analysis_level"].map({"G": "group", "S": "single-subject", "Other": "other"})
    df["task_name"] = df["cognitive_paradigm_cogatlas_id"].map(
        dict(zip(task["cog_atlas_id"], task["name"], strict=True))
    )
    counts = item[item["collection_id"].isin(public["id"])]["collection_id"].value_counts()
    df["n_in_collection"] = df["collection_id"].astype(str).map(counts).fillna(0)
    return df.sort_values(["collection_id", "id"])


def test_default_terms_select_exactly_what_pandas_selects(dump):
    ref = reference(dump)
    # nilearn's default terms: not_mni False, is_thresholded False, map_type not ROI/anatomical/
    # parcellation, image_type not atlas; collections with images
    expected = ref[
        (ref["not_mni"] == "f")
        & (ref["is_thresholded"] == "f")
        & ~ref["map_label"].isin(["ROI/mask", "anatomical", "parcellation"])
        & (ref["n_in_collection"] > 0)
    ]["id"].tolist()
    src = DumpSource(dump, MEDIA)
    got = [r["id"] for r in run_query(src, {"max_images": "all"}, LOG)]
    assert got == expected == [10, 11, 12, 15, 30, 32, 33]
    assert src.n_requests == 0


@pytest.mark.parametrize(
    ("terms", "reference_rows"),
    [
        ({"image_terms": {"map_type": "T map", "analysis_level": "group"}},
         lambda r: (r["map_label"] == "T map") & (r["level_label"] == "group")),
        ({"image_terms": {"cognitive_paradigm_cogatlas": "None / Other"}},
         lambda r: r["cognitive_paradigm_cogatlas_id"] == "None"),
        ({"image_terms": {"cognitive_paradigm_cogatlas": {"null": True}}},
         lambda r: r["cognitive_paradigm_cogatlas_id"] == ""),
        ({"image_terms": {"cognitive_paradigm_cogatlas": {"in": ["pain task", "working memory"]},
                          "number_of_subjects": {"gt": 0}}},
         lambda r: r["task_name"].isin(["pain task", "working memory"]) & (pd.to_numeric(r["number_of_subjects"], errors="coerce") > 0)),
        ({"collection_terms": {"software_package": "FSL"}},
         lambda r: r["collection_id"] == 3),
        ({"image_terms": {"description": {"pattern": "Line one, with a comma\nline two"}}},
         lambda r: r["description"].str.startswith('Line one, with a comma\nline two "quoted"')),
    ],
)  # fmt: skip
def test_terms_on_dump_match_pandas(dump, terms, reference_rows):
    ref = reference(dump)
    expected = ref[reference_rows(ref)]["id"].tolist()
    got = [
        r["id"]
        for r in run_query(
            DumpSource(dump, MEDIA, terms.get("image_terms", {}), terms.get("collection_terms", {})),
            {**terms, "default_terms": False, "max_images": "all"},
            LOG,
        )
    ]
    assert got == expected and got, (got, expected)
    assert 20 not in got and 40 not in got  # private / not explicitly public


def test_records_normalised_to_api_fields(dump):
    src = DumpSource(dump, MEDIA)
    rec = src.image(10)
    assert rec["id"] == 10 and rec["collection_id"] == 1 and type(rec["id"]) is int
    assert rec["map_type"] == "T map" and rec["analysis_level"] == "group"
    assert (
        rec["cognitive_paradigm_cogatlas"] == "pain task"
        and rec["cognitive_paradigm_cogatlas_id"] == "trm_pain"
    )
    assert rec["cognitive_contrast_cogatlas"] == "pain vs rest"
    assert rec["is_thresholded"] is False and rec["not_mni"] is False and rec["is_valid"] is True
    assert rec["number_of_subjects"] == 20 and rec["statistic_parameters"] == 19.0
    assert (
        rec["description"] == DESCRIPTION and rec["contrast_definition"] == 'pain > rest, "warm"\nsecond line'
    )
    assert rec["file"] == MEDIA + "images/1/map%2010.nii.gz"  # URL-quoted file column
    assert rec["image_type"] == "statistic_map" and rec["modality"] == "fMRI-BOLD"
    assert src.image(11)["cognitive_paradigm_cogatlas"] == "None / Other"
    assert (
        src.image(12)["cognitive_paradigm_cogatlas"] is None and src.image(12)["statistic_parameters"] is None
    )
    nidm = src.image(30)
    assert nidm["number_of_subjects"] == 0 and nidm["analysis_level"] == "other"
    assert nidm["file"] == MEDIA + "images/3/pain_30.nidm/TStatistic.nii.gz"
    col = src.collection(1)
    assert col["name"] == 'Pain, "hot"' and col["description"] == DESCRIPTION and col["owner"] == 7
    assert col["number_of_images"] == 7 and col["private"] is False  # 6 maps + the atlas
    for missing in (20, 40, 50, 999):  # private, not public, not a statistic map, absent
        with pytest.raises(Exception, match="not a statistic map of a public collection"):
            src.image(missing)
    with pytest.raises(Exception, match="not a public collection"):
        src.collection(2)
    assert [c["id"] for c in src.iter_results("collections/")] == [1, 3, 4]


def test_explicit_ids_from_the_dump(dump):
    src = DumpSource(dump, MEDIA)
    records = run_query(src, {"image_ids": [33, 20, 10], "collection_ids": [3]}, LOG)
    # the private image is a stub (its download records why); the collection's maps follow by id
    assert [r["id"] for r in records] == [33, 20, 10, 30, 31, 32]
    assert records[1] == {"id": 20}


def test_directory_and_tarball_agree(tmp_path, dump):
    d = write_dump(tmp_path / "unpacked", dump_tables(), packed=False)
    a, b = DumpSource(dump, MEDIA), DumpSource(d, MEDIA)
    assert [r["id"] for r in run_query(a, {"max_images": "all"}, LOG)] == [
        r["id"] for r in run_query(b, {"max_images": "all"}, LOG)
    ]
    assert a.identity["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert a.identity["bytes"] == dump.stat().st_size and a.identity["path"] == str(dump.resolve())
    assert b.identity["kind"] == "dump" and len(b.identity["sha256"]) == 64


def test_broken_dumps_fail_clearly(tmp_path):
    with pytest.raises(DumpError, match="no such file"):
        DumpSource(tmp_path / "missing.tar.gz", MEDIA)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DumpError, match="not a readable .tar.gz"):
        DumpSource(tmp_path / "junk.tar.gz", MEDIA)
    tables = dump_tables()
    del tables["statmap"]
    with pytest.raises(DumpError, match="statmaps_statisticmap.csv not found"):
        DumpSource(write_dump(tmp_path / "partial.tar.gz", tables), MEDIA)


def test_misspelled_field_on_a_dump_fails(dump):
    from nvmeta.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean map_type"):
        run_query(DumpSource(dump, MEDIA, {"map_typ"}), {"image_terms": {"map_typ": "T map"}}, LOG)


def test_selection_from_the_dump_sends_no_request_and_downloads_only_files(tmp_path, dump):
    """The query reads the dump (0 requests); each download then costs exactly one request, the file,
    with the record from the dump (metadata.json says so)."""
    ids = [10, 11, 30]
    served = {iid: nifti_bytes(seed=iid) for iid in ids}
    files = {
        "media/images/1/map 10.nii.gz": served[10],
        "media/images/1/map 11.nii.gz": served[11],
        "media/images/3/pain_30.nidm/TStatistic.nii.gz": served[30],
    }
    root = write_snapshot(tmp_path / "media_only", [], [], files)
    res = tmp_path / "results"
    with FixtureServer(root) as srv:
        nv = fast_config(srv.url, dump=str(dump))
        from nvmeta.neurovault.cache import query_client
        from nvmeta.neurovault.urls import media_base

        src = query_client(nv, res, LOG, {"image_ids": ids})
        assert isinstance(src, DumpSource) and src.media_base == media_base(srv.url) == srv.base + "/media/"
        sel = res / "analyses" / "a" / "selection.tsv"
        query_job(src, {"image_ids": [*ids, 20]}, sel, sel.with_name("query_funnel.json"), LOG,
                  records_dir=res / "records", collections_dir=res / "collections")  # fmt: skip
        assert srv.requests == []  # the selection sent no request at all
        assert read_selection_ids(sel) == [*ids, 20]  # 20 (private collection): a stub
        row = pd.read_csv(sel, sep="\t", dtype=str).iloc[0]
        assert row["record_source"] == (
            f"dump {dump.resolve()} bytes={dump.stat().st_size} sha256={hashlib.sha256(dump.read_bytes()).hexdigest()}"
        )
        client = make_client(nv)
        for iid in ids:
            fetch_image(client, iid, res / "images" / str(iid), "download_new", res / "collections")
        assert all(p.startswith("/media/") for p in srv.requests) and len(srv.requests) == len(ids)
        for iid in ids:
            meta = json.loads((res / "images" / str(iid) / "metadata.json").read_text())
            assert meta["nvmeta"]["status"] == "ok", meta["nvmeta"]
            assert meta["nvmeta"]["md5"] == md5(served[iid])
            assert meta["nvmeta"]["record_source"]["kind"] == "dump"
            assert meta["nvmeta"]["record_source"]["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
            assert meta["nvmeta"]["collection"]["id"] == meta["collection_id"]
        assert json.loads((res / "images" / "30" / "metadata.json").read_text())["number_of_subjects"] == 0
        # overwrite re-downloads the file, still with the record from the dump: no API request
        srv.reset_log()
        fetch_image(
            make_client({**nv, "mode": "overwrite"}),
            10,
            res / "images" / "10",
            "overwrite",
            res / "collections",
        )
        assert srv.requests == ["/media/images/1/map%2010.nii.gz"]
        # the private image asked by id: failed with the dump's reason, no request
        srv.reset_log()
        block = fetch_image(client, 20, res / "images" / "20", "download_new", res / "collections")
        assert block["status"] == "failed" and not (res / "images" / "20" / "map.nii.gz").exists()
        assert (
            block["reason"]
            == "image record: image 20 is not a statistic map of a public collection in the dump"
        )
        assert srv.requests == []
        # an image the dump selection does not hold: failed with its reason, no API request
        block = fetch_image(client, 99, res / "images" / "99", "download_new", res / "collections")
        assert block["status"] == "failed" and "not in the query's selection from the dump" in block["reason"]
        assert srv.requests == []


def test_select_funnel_records_the_dump(dump):
    records, funnel = select(DumpSource(dump, MEDIA), {"image_terms": {"map_type": "T map"}}, LOG)
    assert funnel["source"]["kind"] == "dump" and funnel["source"]["bytes"] == dump.stat().st_size
    assert funnel["images_examined"] == 11 - 1  # statistic maps of public collections (not 20, 40)
    assert [r["id"] for r in records] == [10, 12, 30, 33]


def test_workflow_selects_from_the_dump_without_api_requests(tmp_path, dump):
    """End to end (snakemake on a copy of the workflow): neurovault.dump set, terms select from it;
    the fixture server sees no API request at all, only one media request per selected map."""
    from helpers import make_workdir, run_snakemake

    served = {10: nifti_bytes(seed=10), 11: nifti_bytes(seed=11), 15: nifti_bytes(seed=15)}
    files = {f"media/images/1/map {iid}.nii.gz": b for iid, b in served.items()}
    root = write_snapshot(tmp_path / "media_only", [], [], files)
    analyses = {"d": {"image_terms": {"map_type": {"in": ["Z map", "univariate-beta map"]}}}}
    with FixtureServer(root) as srv:
        config = {"neurovault": fast_config(srv.url, dump=str(dump)), "analyses": analyses}
        wf = make_workdir(tmp_path, config)
        run_snakemake(wf, "--keep-going", "results/analyses/d/selection.tsv", timeout=600)
        sel = pd.read_csv(wf / "results/analyses/d/selection.tsv", sep="\t", dtype=str, keep_default_na=False)
        assert sel["image_id"].tolist() == ["11", "15"]
        assert sel["map_type"].tolist() == ["Z map", "univariate-beta map"]
        assert set(sel["record_source"]) == {
            f"dump {dump.resolve()} bytes={dump.stat().st_size} sha256={hashlib.sha256(dump.read_bytes()).hexdigest()}"
        }
        assert srv.requests == []
        run_snakemake(
            wf, "--keep-going", "results/images/11/metadata.json", "results/images/15/metadata.json"
        )
        assert sorted(srv.requests) == ["/media/images/1/map%2011.nii.gz", "/media/images/1/map%2015.nii.gz"]
    for iid in (11, 15):
        meta = json.loads((wf / f"results/images/{iid}/metadata.json").read_text())
        assert meta["nvmeta"]["status"] == "ok" and meta["nvmeta"]["md5"] == md5(served[iid])
        assert meta["nvmeta"]["record_source"]["kind"] == "dump"
    funnel = json.loads((wf / "results/analyses/d/query_funnel.json").read_text())
    assert funnel["source"]["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert funnel["selected"] == 2
