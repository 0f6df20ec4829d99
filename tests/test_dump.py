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
from helpers import selection

from nvmeta.images.download import fetch_image
from nvmeta.neurovault import make_client
from nvmeta.neurovault.dump import TABLES, DumpError, DumpSource
from nvmeta.neurovault.dump_files import dump_digest
from nvmeta.neurovault.layout import write_snapshot
from nvmeta.select.query import EmptySelection, query_job, read_selection_ids, run_query, select
from nvmeta.testing.dump import write_dump
from nvmeta.testing.server import FixtureServer
from nvmeta.workflow.config import defaults

LOG = logging.getLogger("test_dump")
MEDIA = "https://neurovault.org/media/"
FIELD_BYTES = defaults("neurovault")["max_dump_field_bytes"]
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
    src = DumpSource(dump, MEDIA, max_field_bytes=FIELD_BYTES)
    got = [r["id"] for r in run_query(src, selection(max_images=None), LOG)]
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
            DumpSource(
                dump,
                MEDIA,
                terms.get("image_terms", {}),
                terms.get("collection_terms", {}),
                max_field_bytes=FIELD_BYTES,
            ),
            selection({**terms, "default_terms": False}, max_images=None),
            LOG,
        )
    ]
    assert got == expected and got, (got, expected)
    assert 20 not in got and 40 not in got  # private / not explicitly public


def test_records_normalised_to_api_fields(dump):
    src = DumpSource(dump, MEDIA, max_field_bytes=FIELD_BYTES)
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
    src = DumpSource(dump, MEDIA, max_field_bytes=FIELD_BYTES)
    records = run_query(src, selection({"image_ids": [33, 20, 10], "collection_ids": [3]}), LOG)
    # the private image is a stub (its download records why); the collection's maps follow by id
    assert [r["id"] for r in records] == [33, 20, 10, 30, 31, 32]
    assert records[1] == {"id": 20}


def test_directory_and_tarball_agree(tmp_path, dump):
    d = write_dump(tmp_path / "unpacked", dump_tables(), packed=False)
    a, b = (
        DumpSource(dump, MEDIA, max_field_bytes=FIELD_BYTES),
        DumpSource(d, MEDIA, max_field_bytes=FIELD_BYTES),
    )
    assert [r["id"] for r in run_query(a, selection(max_images=None), LOG)] == [
        r["id"] for r in run_query(b, selection(max_images=None), LOG)
    ]
    assert a.identity["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert a.identity["bytes"] == dump.stat().st_size and a.identity["path"] == str(dump.resolve())
    assert b.identity["kind"] == "dump" and len(b.identity["sha256"]) == 64


def test_broken_dumps_fail_clearly(tmp_path):
    with pytest.raises(DumpError, match="no such file"):
        DumpSource(tmp_path / "missing.tar.gz", MEDIA, max_field_bytes=FIELD_BYTES)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DumpError, match="not a readable .tar.gz"):
        DumpSource(tmp_path / "junk.tar.gz", MEDIA, max_field_bytes=FIELD_BYTES)
    tables = dump_tables()
    del tables["statmap"]
    with pytest.raises(DumpError, match="statmaps_statisticmap.csv not found"):
        DumpSource(write_dump(tmp_path / "partial.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)


def test_misspelled_field_on_a_dump_fails(dump):
    from nvmeta.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean map_type"):
        run_query(
            DumpSource(dump, MEDIA, {"map_typ"}, max_field_bytes=FIELD_BYTES),
            selection({"image_terms": {"map_typ": "T map"}}),
            LOG,
        )


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
        query_job(src, selection({"image_ids": [*ids, 20]}), sel, sel.with_name("query_funnel.json"), LOG,
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
    records, funnel = select(
        DumpSource(dump, MEDIA, max_field_bytes=FIELD_BYTES),
        selection({"image_terms": {"map_type": "T map"}}),
        LOG,
    )
    assert funnel["source"]["kind"] == "dump" and funnel["source"]["bytes"] == dump.stat().st_size
    assert funnel["images_examined"] == 11 - 1  # statistic maps of public collections (not 20, 40)
    assert [r["id"] for r in records] == [10, 12, 30, 33]


@pytest.mark.e2e
def test_workflow_selects_from_the_dump_without_api_requests(tmp_path, dump):
    """End to end (snakemake on a copy of the workflow): neurovault.dump set, terms select from it;
    the fixture server sees no API request at all, only one media request per selected map. What the
    workflow adds to the test above: the config's dump reaches the query and the download jobs."""
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


# ------------------------------------------------------------------------------------------------
# one export, unique keys, required columns, one boolean parser, values kept as written
# ------------------------------------------------------------------------------------------------
def test_two_exports_in_one_directory_or_archive_fail_naming_both(tmp_path):
    """Tables were taken from whichever export came first in path order (a directory) or the first
    folder of the archive: rows of two days mixed, or the old export used silently."""
    old, new = dump_tables(), dump_tables()
    new["statmap"][0]["number_of_subjects"] = "50"
    d = tmp_path / "exports"
    write_dump(d / "2022_export", old, packed=False)
    write_dump(d / "2024_export", new, packed=False)
    with pytest.raises(
        DumpError, match=r"more than one export \(statmaps tables in 2022_export/, 2024_export/\)"
    ):
        DumpSource(d, MEDIA, max_field_bytes=FIELD_BYTES)
    with pytest.raises(DumpError, match="2022_export/, 2024_export/"):
        dump_digest(d)  # the query rule's params say so before any job
    # an archive holding old/ and new/
    import io

    arc = tmp_path / "two.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        for folder, src in (("old", d / "2022_export"), ("new", d / "2024_export")):
            for f in sorted(src.iterdir()):
                data = f.read_bytes()
                info = tarfile.TarInfo(f"{folder}/{f.name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DumpError, match=r"statmaps tables in new/, old/"):
        DumpSource(arc, MEDIA, max_field_bytes=FIELD_BYTES)


@pytest.mark.parametrize(
    ("table", "row", "match"),
    [
        ("collection", {"id": 1, "name": "dup", "private": "t"}, r"statmaps_collection.csv has 2 rows sharing a id \(1\)"),
        ("item", {"id": 10, "collection_id": 3}, r"statmaps_basecollectionitem.csv has 2 rows sharing a id \(10\)"),
        ("statmap", {"image_ptr_id": 11, "map_type": "T"}, r"statmaps_statisticmap.csv has 2 rows sharing a image_ptr_id \(11\)"),
        ("image", {"basecollectionitem_ptr_id": 12, "file": "x"}, "statmaps_image.csv has 2 rows sharing"),
        ("task", {"name": "other", "cog_atlas_id": "trm_pain"}, "statmaps_cognitiveatlastask.csv has 2 rows sharing a cog_atlas_id"),
    ],
)  # fmt: skip
def test_a_duplicated_key_is_an_error(tmp_path, table, row, match):
    """The first row used to win: a collection listed twice, the second time private, stayed public."""
    tables = dump_tables()
    tables[table].append(row)
    with pytest.raises(DumpError, match=match):
        DumpSource(write_dump(tmp_path / "dup.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)


@pytest.mark.parametrize(
    ("table", "column"),
    [("item", "collection_id"), ("collection", "private"), ("task", "cog_atlas_id"), ("contrast", "cog_atlas_id"),
     ("image", "file"), ("statmap", "image_ptr_id")],
)  # fmt: skip
def test_a_missing_column_is_one_clear_error(tmp_path, monkeypatch, table, column):
    """A table without collection_id or a task table without cog_atlas_id raised a pandas KeyError."""
    import nvmeta.testing.dump as tdump

    monkeypatch.setitem(tdump.COLUMNS, table, [c for c in tdump.COLUMNS[table] if c != column])
    path = write_dump(tmp_path / "cut.tar.gz", dump_tables())
    with pytest.raises(DumpError) as err:
        DumpSource(path, MEDIA, max_field_bytes=FIELD_BYTES)
    msg = str(err.value)
    assert f"{TABLES[table]} has no column {column!r}" in msg and "Fix:" in msg


@pytest.mark.parametrize(
    ("spelling", "public"),
    [("f", True), ("false", True), ("F", True), ("0", True), ("FALSE", True), ("No", True),
     ("t", False), ("true", False), ("T", False), ("1", False), ("yes", False)],
)  # fmt: skip
def test_every_boolean_spelling_means_the_same(tmp_path, spelling, public):
    """private 'false', 'F' or '0' made every collection private (only 'f' was public)."""
    tables = dump_tables()
    for col in tables["collection"]:
        if col["private"] == "f":
            col["private"] = spelling
    for stat in tables["statmap"]:
        stat["is_thresholded"] = {"f": spelling, "t": "T"}[stat["is_thresholded"]]
    src = DumpSource(write_dump(tmp_path / "b.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)
    assert [c["id"] for c in src.iter_results("collections/")] == ([1, 3, 4] if public else [])
    if public:
        assert src.image(10)["is_thresholded"] is False and src.image(13)["is_thresholded"] is True
        assert src.source_counts()["excluded"] == {
            "private collection (private = true)": 1,
            "collection of unknown privacy (private empty: not selected)": 1,
        }


def test_a_database_boolean_the_terms_name_is_a_boolean_as_on_the_api(tmp_path, monkeypatch):
    """A collection field outside the standard ones (e.g. used_smoothing, one of the ~90) stayed the
    string 't', so `collection_terms: {used_smoothing: true}` matched nothing on a dump."""
    import nvmeta.testing.dump as tdump

    monkeypatch.setitem(tdump.COLUMNS, "collection", [*tdump.COLUMNS["collection"], "used_smoothing"])
    tables = dump_tables()
    for col, flag in zip(tables["collection"], ["t", "t", "f", "", "t"], strict=True):
        col["used_smoothing"] = flag
    terms = {"collection_terms": {"used_smoothing": True}}
    src = DumpSource(
        write_dump(tmp_path / "u.tar.gz", tables),
        MEDIA,
        collection_fields={"used_smoothing"},
        max_field_bytes=FIELD_BYTES,
    )
    assert src.collection(1)["used_smoothing"] is True and src.collection(4)["used_smoothing"] is None
    assert {r["collection_id"] for r in run_query(src, selection(terms, max_images=None), LOG)} == {1}


def test_an_unknown_boolean_spelling_names_the_column_and_value(tmp_path):
    tables = dump_tables()
    tables["statmap"][2]["not_mni"] = "maybe"
    with pytest.raises(
        DumpError, match=r"statmaps_statisticmap.csv column not_mni: 'maybe' is not a boolean .* in 1 row"
    ):
        DumpSource(write_dump(tmp_path / "b.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)


def test_an_all_private_dump_says_so_when_nothing_is_selected(tmp_path):
    """'collections examined: 0, loosen the terms' said nothing about privacy."""
    tables = dump_tables()
    for col in tables["collection"]:
        col["private"] = {"f": "t"}.get(col["private"], col["private"])
    src = DumpSource(write_dump(tmp_path / "p.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)
    sel = tmp_path / "a" / "selection.tsv"
    with pytest.raises(EmptySelection) as err:
        query_job(src, selection(), sel, sel.with_name("query_funnel.json"), LOG, key_prefix="analyses.a")
    msg = str(err.value)
    assert "left out by the source before any term:\n" in msg and "collections examined: 0" in msg
    assert "\n    private collection (private = true): 4\n" in msg
    assert "\n    collection of unknown privacy (private empty: not selected): 1\n" in msg
    assert "check that it is an unmodified export (its private column)" in msg
    assert "loosen" not in msg


def test_values_that_are_not_numbers_are_kept_as_written_and_counted(tmp_path):
    """number_of_subjects inf or 1e400 crashed (pandas IntCastingNaNError); twenty, nan, 0x14 became
    a silent missing value. Now each is kept as written, for the image's QC to name."""
    tables = dump_tables()
    raw = {10: "inf", 11: "1e400", 13: "twenty", 15: "nan", 31: "0x14"}
    for stat in tables["statmap"]:
        if stat["image_ptr_id"] in raw:
            stat["number_of_subjects"] = raw[stat["image_ptr_id"]]
    tables["statmap"][1]["statistic_parameters"] = "NaN"
    src = DumpSource(write_dump(tmp_path / "n.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)
    for iid, value in raw.items():
        assert src.image(iid)["number_of_subjects"] == value
    assert src.image(33)["number_of_subjects"] == 22 and type(src.image(33)["number_of_subjects"]) is int
    assert src.image(30)["number_of_subjects"] == 0 and src.image(11)["statistic_parameters"] == "NaN"
    counts = src.source_counts()["flagged"]
    assert counts == {
        "statmaps_statisticmap.csv column number_of_subjects: not a finite number (kept as written)": 5,
        "statmaps_statisticmap.csv column statistic_parameters: not a finite number (kept as written)": 1,
    }
    _, funnel = select(src, selection(max_images=None), LOG)
    assert funnel["flagged_by_source"] == counts
    # the selection carries them as written too (qc.tsv reads the selection)
    sel = tmp_path / "a" / "selection.tsv"
    query_job(src, selection({"image_ids": [13]}), sel, sel.with_name("query_funnel.json"), LOG)
    assert pd.read_csv(sel, sep="\t", dtype=str)["number_of_subjects"].tolist() == ["twenty"]


def test_rows_with_invalid_ids_are_counted_in_the_funnel(tmp_path):
    """An image whose id is 'abc' or empty was dropped with no count anywhere."""
    tables = dump_tables()
    by_id = {r["id"]: r for r in tables["item"]}
    by_id[12]["id"] = "abc"
    by_id[15]["id"] = ""
    by_id[33]["collection_id"] = "3.0"
    tables["statmap"][-1]["image_ptr_id"] = "-40"
    tables["collection"].append({"id": "x7", "name": "bad", "private": "f"})
    src = DumpSource(write_dump(tmp_path / "i.tar.gz", tables), MEDIA, max_field_bytes=FIELD_BYTES)
    _, funnel = select(src, selection({"default_terms": False}, max_images=None), LOG)
    assert funnel["excluded_by_source"] == {
        "collection of unknown privacy (private empty: not selected)": 1,
        "private collection (private = true)": 1,
        "statmaps_basecollectionitem.csv column collection_id: not a positive integer (row left out)": 1,
        "statmaps_basecollectionitem.csv column id: not a positive integer (row left out)": 2,
        "statmaps_collection.csv column id: not a positive integer (row left out)": 1,
        "statmaps_statisticmap.csv column image_ptr_id: not a positive integer (row left out)": 1,
    }
    assert [r["id"] for r in run_query(src, selection({"default_terms": False}, max_images=None), LOG)] == [
        10, 11, 13, 14, 30, 31, 32
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# a bound on one field's size
# ------------------------------------------------------------------------------------------------
def _raw_field(value: str) -> bytes:
    """A field as csv.writer writes it (quoted when it holds a comma, quote or newline)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value])
    return buf.getvalue()[:-1].encode()


def test_field_bound_measures_fields_as_a_csv_parser_splits_them():
    """Random fields with commas, quotes and newlines, fed in random chunks: the longest raw field
    (csv.writer's output for each field, the independent reference) passes a bound of its length
    and fails a bound one byte shorter, wherever the chunks split it."""
    import random

    from nvmeta.neurovault.dump_files import _FieldBound

    rng = random.Random(7)
    alphabet = 'ab,"\n x'
    rows = [
        [("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))) for _ in range(5)]
        for _ in range(300)
    ]
    data = b"".join(b",".join(_raw_field(f) for f in row) + b"\n" for row in rows)
    longest = max(len(_raw_field(f)) for row in rows for f in row)
    for _trial in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 30))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        ok = _FieldBound(longest, "t")
        for c in chunks:
            ok.feed(c)
        short = _FieldBound(longest - 1, "t")
        with pytest.raises(DumpError, match="a field of more than"):
            for c in chunks:
                short.feed(c)


BIG_FIELD = r"""
import resource, sys
from nvmeta.neurovault.dump import DumpSource, DumpError
from nvmeta.workflow.config import defaults
try:
    DumpSource(sys.argv[1], "https://neurovault.org/media/",
               max_field_bytes=defaults("neurovault")["max_dump_field_bytes"])
    print("read")
except DumpError as exc:
    print("error:", exc)
print("peak_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_a_200_mb_field_stops_the_read_with_bounded_memory(tmp_path):
    """A 200 MB description in one row stops the read at the default bound (10 MB) while streaming,
    before the field is held in memory (BENCHMARKS.md, "Query at full scale", has the peaks). Peak RSS of the reading process against the same process on the dump without it."""
    import os
    import subprocess
    import sys

    def peak(path):
        proc = subprocess.run(
            [sys.executable, "-c", BIG_FIELD, str(path)],
            capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )  # fmt: skip
        lines = proc.stdout.splitlines()
        return lines[0], float(lines[-1].split()[1])

    small = write_dump(tmp_path / "small", dump_tables(), packed=False)
    tables = dump_tables()
    tables["item"][0]["description"] = "x" * (200 * 2**20)
    big = write_dump(tmp_path / "big", tables, packed=False)
    first, base_mb = peak(small)
    assert first == "read"
    first, big_mb = peak(big)
    assert first.startswith("error:") and "a field of more than 10000000 bytes" in first
    assert "statmaps_basecollectionitem.csv" in first and "neurovault.max_dump_field_bytes" in first
    assert big_mb < base_mb + 60, (base_mb, big_mb)


# ------------------------------------------------------------------------------------------------
# the content digest the query rule's params carry
# ------------------------------------------------------------------------------------------------
def test_dump_digest_is_the_recorded_sha256_and_follows_content_not_mtime(tmp_path, caplog):
    cache = tmp_path / "cache.json"
    tar = write_dump(tmp_path / "e.tar.gz", dump_tables())
    assert dump_digest(tar, cache) == DumpSource(tar, MEDIA, max_field_bytes=FIELD_BYTES).identity["sha256"]
    d = write_dump(tmp_path / "dir", dump_tables(), packed=False)
    first = dump_digest(d, cache)
    assert first == DumpSource(d, MEDIA, max_field_bytes=FIELD_BYTES).identity["sha256"]
    caplog.clear()  # records of the calls above (kept when an earlier test left the level at INFO)
    with caplog.at_level(logging.INFO, logger="nvmeta.neurovault.dump_files"):
        assert dump_digest(d, cache) == first
    assert "hashing" not in caplog.text  # known files are not read again
    # edited in place, size and mtime kept (what an editor with preserve-timestamps or cp -p leaves)
    csv_file = d / TABLES["statmap"]
    st = csv_file.stat()
    text = csv_file.read_text()
    csv_file.write_text(text.replace(",20,", ",50,", 1))
    os_utime(csv_file, st)
    assert csv_file.stat().st_size == st.st_size and csv_file.stat().st_mtime_ns == st.st_mtime_ns
    second = dump_digest(d, cache)
    assert second != first and second == DumpSource(d, MEDIA, max_field_bytes=FIELD_BYTES).identity["sha256"]


def os_utime(path, st):
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tree(root):
    """Every file under ``root`` with its size and mtime (what a dry run must leave as it was)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_workflow_reruns_the_query_when_the_dump_content_changes_whatever_its_mtime(tmp_path):
    """A replaced export reruns the query whatever its mtime, which Snakemake's mtime trigger alone
    would miss: an archive copied over with an older mtime (cp -p, rsync -a), a CSV edited in place, a
    directory re-extracted over from an archive (old mtimes). The query rule's params carry the
    export's sha256; a touched export with the same content reruns nothing; a dry run changes nothing
    under results/."""
    import os
    import shutil

    from helpers import make_workdir, run_snakemake

    analyses = {"d": {"image_terms": {"map_type": "Z map"}, "default_terms": False}}
    target = "results/analyses/d/selection.tsv"

    def ids(wf):
        return pd.read_csv(wf / target, sep="\t", dtype=str)["image_id"].tolist()

    def sha(wf):
        return pd.read_csv(wf / target, sep="\t", dtype=str)["record_source"].iloc[0].rsplit("sha256=", 1)[1]

    def queried(proc):
        return "checkpoint query:\n" in proc.stdout  # "localcheckpoint" when run, "checkpoint" in a dry run

    # --- a .tar.gz replaced by another export with an older mtime
    live = tmp_path / "live.tar.gz"
    shutil.copy2(write_dump(tmp_path / "v1.tar.gz", dump_tables()), live)
    wf = make_workdir(tmp_path, {"neurovault": {"url": "https://neurovault.org/api/", "dump": str(live)},
                                 "analyses": analyses})  # fmt: skip
    run_snakemake(wf, "--keep-going", target, timeout=600)
    assert ids(wf) == ["11"]
    v2 = dump_tables()
    v2["statmap"][0]["map_type"] = "Z"  # image 10 becomes a Z map
    newer = write_dump(tmp_path / "v2.tar.gz", v2)
    os.utime(newer, (1_000_000_000, 1_000_000_000))  # older than everything under results/
    shutil.copy2(newer, live)  # cp -p: content and the old mtime
    before = _tree(wf / "results")
    dry = run_snakemake(wf, "--keep-going", "-n", target, timeout=600)
    assert queried(dry) and _tree(wf / "results") == before
    proc = run_snakemake(wf, "--keep-going", target, timeout=600)
    assert queried(proc) and ids(wf) == ["10", "11"]
    assert sha(wf) == hashlib.sha256(live.read_bytes()).hexdigest()
    # the same content with a new mtime: nothing to do
    os.utime(live)
    proc = run_snakemake(wf, "--keep-going", target, timeout=600)
    assert not queried(proc), proc.stdout[-2000:]

    # --- an unpacked export: edited in place (mtime kept), then re-extracted over (old mtimes)
    d = tmp_path / "unpacked"
    write_dump(d, dump_tables(), packed=False)
    (wf / "test.yaml").write_text(
        __import__("yaml").safe_dump(
            {"neurovault": {"url": "https://neurovault.org/api/", "dump": str(d)}, "analyses": analyses}
        )  # fmt: skip
    )
    run_snakemake(wf, "--keep-going", target, timeout=600)
    assert ids(wf) == ["11"]
    stat_csv = d / TABLES["statmap"]
    st = stat_csv.stat()
    rows = stat_csv.read_text().splitlines(keepends=True)
    edited = [r.replace(",Z,", ",T,", 1) if r.startswith("11,") else r for r in rows]
    edited = [r.replace(",T,", ",Z,", 1) if r.startswith("33,") else r for r in edited]
    stat_csv.write_text("".join(edited))
    os.utime(stat_csv, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = run_snakemake(wf, "--keep-going", target, timeout=600)
    assert queried(proc) and ids(wf) == ["33"]
    with tarfile.open(newer) as tar:  # v2 (10 and 11 Z maps), members with mtime 0
        for member in tar.getmembers():
            member.name = member.name.split("/", 1)[1]
            tar.extract(member, d, filter="data")
    assert stat_csv.stat().st_mtime < 10
    proc = run_snakemake(wf, "--keep-going", target, timeout=600)
    assert queried(proc) and ids(wf) == ["10", "11"]
    proc = run_snakemake(wf, "--keep-going", target, timeout=600)
    assert not queried(proc)


@pytest.mark.e2e
@pytest.mark.parametrize("broken", ["missing", "two exports"])
def test_workflow_with_an_unusable_dump_stops_before_any_job(tmp_path, broken):
    """A missing dump, or two exports in its directory, stops ``snakemake -n`` before any job with one
    message naming the problem and the fix (not Snakemake's MissingInputException, not silence)."""
    from helpers import make_workdir, run_snakemake

    path = tmp_path / "nope.tar.gz"
    if broken == "two exports":
        path = tmp_path / "exports"
        for name in ("a", "b"):
            write_dump(path / name, dump_tables(), packed=False)
    analyses = {"d": {"image_terms": {"map_type": "T map"}}}
    wf = make_workdir(tmp_path, {"neurovault": {"dump": str(path)}, "analyses": analyses})
    proc = run_snakemake(wf, "-n", check=False, timeout=600)
    out = proc.stdout
    assert proc.returncode == 1 and "Traceback" not in out and "Nothing was run." in out
    expected = "no such file or directory" if broken == "missing" else "more than one export"
    assert out.count("nvmeta: neurovault.dump: ") == 1, out[-2000:]
    if broken == "two exports":
        expected += " (statmaps tables in a/, b/)"
    assert expected in out and "Fix: set neurovault.dump to one NeuroVault export" in out
