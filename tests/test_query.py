"""Image selection (nvmeta.select.query) against an in-memory fake NeuroVault client."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import once_per_log_block, selection
from nilearn.datasets import neurovault as nv

import nvmeta.select.query as query
from nvmeta.errors import ConfigError
from nvmeta.select.query import (
    SELECTION_COLUMNS,
    analysis_query_spec,
    read_selection_ids,
    run_query,
    write_selection,
)

LOG = logging.getLogger("test_query")


class FakeMissing(LookupError):
    """Stands in for the client's NotFound/Forbidden."""


class FakeClient:
    """In-memory NeuroVault: image(id), collection(cid), iter_results(path, limit, log)."""

    def __init__(self, collections, images, listings=None, missing_error=KeyError):
        self.collections = {c["id"]: c for c in collections}
        self.images = {im["id"]: im for im in images}
        if listings is None:
            listings = {}
            for im in images:
                listings.setdefault(im["collection_id"], []).append(im)
        self.listings = listings
        self.missing_error = missing_error
        self.calls = []

    def image(self, image_id):
        self.calls.append(("image", image_id))
        if image_id not in self.images:
            raise self.missing_error(f"image {image_id}: not found (404)")
        return dict(self.images[image_id])

    def collection(self, cid):
        self.calls.append(("collection", cid))
        if cid not in self.collections:
            raise self.missing_error(f"collection {cid}: not found (404)")
        return dict(self.collections[cid])

    def iter_results(self, path, limit=1000, log=None):
        self.calls.append(("iter", path))
        if path == "collections/":
            items = [self.collections[c] for c in sorted(self.collections)]
        else:
            parts = path.strip("/").split("/")
            assert parts[0] == "collections" and parts[2] == "images", path
            items = self.listings.get(int(parts[1]), [])
        for item in items:
            yield dict(item)

    def listed(self):
        return [p for kind, p in self.calls if kind == "iter"]


def image(image_id, cid, **kw):
    rec = {
        "id": image_id,
        "collection_id": cid,
        "name": f"image {image_id}",
        "map_type": "T map",
        "image_type": "statistic_map",
        "not_mni": False,
        "is_thresholded": False,
        "analysis_level": "group",
        "number_of_subjects": 20,
        "statistic_parameters": None,
        "modality": "fMRI-BOLD",
        "contrast_definition": None,
        "cognitive_paradigm_cogatlas": None,
        "cognitive_contrast_cogatlas": None,
        "description": "",
        "file": f"https://neurovault.org/media/images/{cid}/map_{image_id}.nii.gz",
        "file_size": 1000 + image_id if isinstance(image_id, int) else 1000,
        "modify_date": "2020-07-20T22:14:30.314520Z",
    }
    rec.update(kw)
    return rec


def collection(cid, n=1, **kw):
    return {"id": cid, "name": f"collection {cid}", "number_of_images": n, **kw}


def ids(records):
    return [r["id"] for r in records]


@pytest.fixture
def small():
    """Three collections; collection 2 is empty by the default collection terms."""
    collections = [collection(1, 4), collection(2, None), collection(3, 3)]
    images = [
        image(10, 1),
        image(11, 1, map_type="Z map"),
        image(12, 1, image_type="atlas"),
        image(13, 1, not_mni=None),
        image(20, 2),
        image(30, 3, map_type="ROI/mask"),
        image(31, 3, number_of_subjects=8),
        image(32, 3, is_thresholded=True),
    ]
    return FakeClient(collections, images)


# ----------------------------------------------------------------------------- terms mode


def test_terms_mode_default_terms_filter_on_client(small):
    records = run_query(small, selection(), LOG)
    # atlas, null not_mni, ROI/mask, thresholded rejected; collection 2 (number_of_images null) not listed
    assert ids(records) == [10, 11, 31]
    assert "collections/2/images/" not in small.listed()
    assert small.listed() == ["collections/", "collections/1/images/", "collections/3/images/"]
    assert [r["collection_name"] for r in records] == ["collection 1", "collection 1", "collection 3"]


def test_terms_mode_matches_nilearn_reference(small):
    cfg = {
        "image_terms": {"map_type": {"in": ["T map", "Z map"]}, "number_of_subjects": {"ge": 10}},
        "collection_terms": {"name": {"pattern": "coll"}},
    }
    # independent reference: nilearn's own objects applied to every listed image, in order
    ref_image = nv.ResultFilter(
        dict(
            nv.basic_image_terms(),
            map_type=nv.IsIn("T map", "Z map"),
            number_of_subjects=nv.GreaterOrEqual(10),
        )
    )
    ref_collection = nv.ResultFilter(dict(nv.basic_collection_terms(), name=nv.Pattern("coll")))
    expected = [
        im["id"]
        for cid in sorted(small.collections)
        if ref_collection(small.collections[cid])
        for im in sorted(small.listings.get(cid, []), key=lambda r: r["id"])
        if ref_image(im)
    ]
    assert expected == [10, 11]
    assert ids(run_query(small, selection(cfg), LOG)) == expected


def test_terms_mode_without_default_terms(small):
    records = run_query(small, selection({"default_terms": False}, max_images=None), LOG)
    assert ids(records) == [10, 11, 12, 13, 20, 30, 31, 32]


def test_terms_mode_user_term_overrides_default(small):
    cfg = {"image_terms": {"not_mni": {"ne": True}}}
    assert ids(run_query(small, selection(cfg), LOG)) == [10, 11, 13, 31]


def _big_client(n_collections=3, per_collection=60):
    collections = [collection(c, per_collection) for c in range(1, n_collections + 1)]
    images = [image(c * 1000 + i, c) for c in range(1, n_collections + 1) for i in range(per_collection)]
    return FakeClient(collections, images)


def test_terms_mode_default_max_images_is_100_and_stops_listing():
    client = _big_client()
    records = run_query(client, selection(), LOG)
    assert len(records) == 100
    assert ids(records) == [1000 + i for i in range(60)] + [2000 + i for i in range(40)]
    assert "collections/3/images/" not in client.listed()


@pytest.mark.parametrize(("max_images", "n"), [(5, 5), (None, 100), (1000, 180)])
def test_terms_mode_max_images(max_images, n):
    assert len(run_query(_big_client(), selection({"max_images": max_images}), LOG)) == n
    assert len(run_query(_big_client(), selection(max_images=None), LOG)) == 180  # a selection's None: no cap


def test_the_terms_cap_is_the_schema_s():
    """A null max_images with terms is nilearn's 100, which only the schema writes."""
    from nvmeta.select.spec import terms_max_images
    from nvmeta.workflow.config import SCHEMA_PATH

    node = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["analyses"]["additionalProperties"]
    assert terms_max_images() == node["properties"]["max_images"]["terms_default"] == 100
    assert selection()["max_images"] == 100 and selection({"image_ids": [1]})["max_images"] is None


def test_images_sorted_by_id_within_a_collection():
    images = [image(5, 1), image(3, 1), image(4, 1)]
    client = FakeClient([collection(1, 3)], images, listings={1: images})
    assert ids(run_query(client, selection(), LOG)) == [3, 4, 5]


def test_mismatched_collection_and_bad_ids_are_skipped_and_logged(caplog):
    listed = [
        image(10, 1),
        image(11, 2),  # listed under 1 but belongs to 2
        image(12, None),
        image(0, 1),
        image(-3, 1),
        image("14", 1),
        image(True, 1),
        image(None, 1),
        image(15, 1),
    ]
    client = FakeClient([collection(1, 9)], [], listings={1: listed})
    with caplog.at_level(logging.INFO, logger="test_query"):
        records = run_query(client, selection(), LOG)
    assert ids(records) == [10, 15]
    text = caplog.text
    assert "image 11 has collection_id 2 (listed under 1); skipped" in text
    assert "image 12 has collection_id None" in text
    for bad in ("0", "-3", "'14'", "True", "None"):
        assert f"listed image with invalid id {bad} skipped" in text


def test_duplicates_in_a_listing_are_selected_once():
    listed = [image(10, 1), image(11, 1), image(10, 1)]
    client = FakeClient([collection(1, 3)], [], listings={1: listed})
    assert ids(run_query(client, selection(), LOG)) == [10, 11]


def test_pinned_collection_fetched_directly(small):
    records = run_query(small, selection({"collection_terms": {"id": 3}}), LOG)
    assert ids(records) == [31]
    assert ("iter", "collections/") not in small.calls
    assert ("collection", 3) in small.calls


def test_pinned_by_image_collection_id_in(small):
    records = run_query(small, selection({"image_terms": {"collection_id": {"in": [3, 1]}}}), LOG)
    assert ids(records) == [31, 10, 11]  # collections in the given order
    assert ("iter", "collections/") not in small.calls


def test_non_pinning_id_term_scans_collections(small):
    records = run_query(small, selection({"collection_terms": {"id": {"ge": 3}}}), LOG)
    assert ids(records) == [31]
    assert ("iter", "collections/") in small.calls


def test_progress_is_logged(small, caplog):
    with caplog.at_level(logging.INFO, logger="test_query"):
        run_query(small, selection(), LOG, key_prefix="analyses.demo")
    text = caplog.text
    assert "selection by terms (max_images=100)" in text
    assert "collection 1 (collection 1): 4 image(s) listed, 2 matched; 2 selected so far" in text
    assert "done: 3 collections scanned, 2 passed the collection filter, 7 images listed, 3 selected" in text
    assert "analyses.demo: 3 image(s) selected" in text


def test_bad_selection_keys_stop_at_the_config_check():
    """The config check is the one validator of what the query reads: nothing it rejects reaches the query."""
    from nvmeta.workflow.config import SCHEMA_PATH, check_config

    def check(analysis):
        snapshot = Path(__file__).parent / "data" / "snapshot"
        check_config({"neurovault": {"url": str(snapshot)}, "analyses": {"x": analysis}}, SCHEMA_PATH)

    with pytest.raises(ConfigError, match=r"analyses\.x\.image_terms\.map_type: unknown filter operator"):
        check({"image_terms": {"map_type": {"like": "T"}}})
    with pytest.raises(ConfigError, match=r"analyses\.x\.max_images = 0 is out of range"):
        check({"image_terms": {"map_type": "T map"}, "max_images": 0})
    for bad in ("all", 2.5, True):
        with pytest.raises(ConfigError, match=r"analyses\.x\.max_images: .* is not of type"):
            check({"image_terms": {"map_type": "T map"}, "max_images": bad})
    with pytest.raises(ConfigError, match=r"analyses\.x\.image_ids\.1: '11' is not of type 'integer'"):
        check({"image_ids": [10, "11"]})
    with pytest.raises(ConfigError, match=r"analyses\.x\.image_ids: 10 is not of type 'array'"):
        check({"image_ids": 10})


# ----------------------------------------------------------------------------- explicit mode


def test_explicit_ids_ignore_filters(small, caplog):
    cfg = {
        "image_ids": [32, 12, 13],  # thresholded, atlas, null not_mni: all rejected by default terms
        "image_terms": {"map_type": "Z map"},
        "collection_terms": {"name": "nothing"},
        "default_terms": True,
    }
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(small, selection(cfg), LOG, key_prefix="analyses.stopgo")
    assert ids(records) == [32, 12, 13]
    assert "analyses.stopgo: explicit image_ids/collection_ids given, so image_terms" in caplog.text
    assert ("iter", "collections/") not in small.calls


def test_explicit_order_and_dedupe(small):
    cfg = {"image_ids": [31, 10, 31], "collection_ids": [3, 1, 3]}
    records = run_query(small, selection(cfg), LOG)
    # image ids in the given order, then each collection's images by id; first position wins
    assert ids(records) == [31, 10, 30, 32, 11, 12, 13]
    # explicit images get the name of a collection fetched for collection_ids
    assert [r.get("collection_name") for r in records] == ["collection 3", "collection 1"] + [
        "collection 3",
        "collection 3",
        "collection 1",
        "collection 1",
        "collection 1",
    ]


def test_explicit_image_ids_only_have_no_collection_name(small):
    records = run_query(small, selection({"image_ids": [10]}), LOG)
    assert records[0].get("collection_name") is None
    assert small.calls == [("image", 10)]


def test_explicit_collection_listing_sorted_and_checked(caplog):
    listed = [image(7, 4), image(5, 4), image(6, 9)]
    client = FakeClient([collection(4, 3)], [], listings={4: listed})
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(client, selection({"collection_ids": [4]}), LOG)
    assert ids(records) == [5, 7]
    assert "image 6 has collection_id 9 (listed under 4); skipped" in caplog.text


def test_explicit_no_limit_by_default():
    client = _big_client(n_collections=2, per_collection=120)
    assert len(run_query(client, selection({"collection_ids": [1, 2]}), LOG)) == 240
    assert selection({"collection_ids": [1]})["max_images"] is None


def test_explicit_max_images_truncates(caplog):
    client = _big_client(n_collections=2, per_collection=10)
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(
            client, selection({"image_ids": [2003], "collection_ids": [1, 2], "max_images": 12}), LOG
        )
    assert ids(records) == [2003] + [1000 + i for i in range(10)] + [2000]
    assert "max_images=12 reached: explicit selection truncated" in caplog.text
    records = run_query(client, selection({"collection_ids": [1, 2], "max_images": 10}), LOG)
    assert ids(records) == [1000 + i for i in range(10)]
    assert client.calls[-1] == ("iter", "collections/1/images/")  # collection 2 never fetched


def test_explicit_record_with_wrong_id_is_skipped(caplog):
    client = FakeClient([], [image(10, 1)])
    client.images[11] = image(99, 1)
    with caplog.at_level(logging.WARNING, logger="test_query"):
        assert ids(run_query(client, selection({"image_ids": [10, 11]}), LOG)) == [10]
    assert "image 11: server returned a record with id 99; skipped" in caplog.text


def test_explicit_missing_items(monkeypatch, caplog):
    monkeypatch.setattr(query, "_missing_errors", lambda: (FakeMissing,))
    client = FakeClient([collection(1, 1)], [image(10, 1)], missing_error=FakeMissing)
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(client, selection({"image_ids": [404, 10], "collection_ids": [777, 1]}), LOG)
    # a missing image is kept as a stub (its download records the failure); a missing collection is skipped
    assert records[0] == {"id": 404}
    assert ids(records) == [404, 10]
    assert "image 404: " in caplog.text and "kept as a stub" in caplog.text
    assert (
        "collection 777: " in caplog.text and "is it a collection id rather than an image id?" in caplog.text
    )


def test_other_client_errors_propagate():
    client = FakeClient([], [], missing_error=RuntimeError)
    with pytest.raises(RuntimeError):
        run_query(client, selection({"image_ids": [1]}), LOG)


def test_explicit_missing_items_with_real_client_errors(caplog):
    client_mod = pytest.importorskip("nvmeta.neurovault")

    class Raising(FakeClient):
        def image(self, image_id):
            raise client_mod.NotFound("not found (404)")

        def collection(self, cid):
            raise client_mod.Forbidden("forbidden (403)")

    client = Raising([], [])
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(client, selection({"image_ids": [5], "collection_ids": [6]}), LOG)
    assert records == [{"id": 5}]


# ----------------------------------------------------------------------------- selection.tsv


def test_write_selection_columns_and_values(tmp_path, small):
    records = run_query(small, selection({"image_ids": [10], "collection_ids": [3]}), LOG)
    records[0]["description"] = "line one\nline\ttwo"
    records[0]["statistic_parameters"] = 24.0
    records[0]["number_of_subjects"] = None
    records[0]["contrast_definition"] = 'pain "hot" > warm'
    path = tmp_path / "analyses" / "a" / "selection.tsv"
    write_selection(records, path)
    assert [p.name for p in path.parent.iterdir()] == ["selection.tsv"]  # no temp file left

    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(SELECTION_COLUMNS)
    assert df["image_id"].tolist() == ["10", "30", "31", "32"]
    assert df["collection_id"].tolist() == ["1", "3", "3", "3"]
    first = df.iloc[0]
    assert first["description"] == "line one line two"
    assert first["statistic_parameters"] == "24.0"
    assert first["number_of_subjects"] == ""
    assert first["contrast_definition"] == 'pain "hot" > warm'
    assert first["collection_name"] == ""  # explicit image: collection record not fetched
    assert first["file"] == "https://neurovault.org/media/images/1/map_10.nii.gz"
    assert first["file_size"] == "1010"
    assert first["modify_date"] == "2020-07-20T22:14:30.314520Z"
    assert df["collection_name"].tolist()[1:] == ["collection 3"] * 3
    assert df["number_of_subjects"].tolist()[1:] == ["20", "8", "20"]
    assert df["map_type"].tolist() == ["T map", "ROI/mask", "T map", "T map"]
    assert df["cognitive_paradigm_cogatlas"].tolist() == [""] * 4
    assert len(path.read_text().splitlines()) == 5  # header + one line per image

    typed = pd.read_csv(path, sep="\t")
    assert typed["image_id"].tolist() == [10, 30, 31, 32]
    assert typed["number_of_subjects"].isna().tolist() == [True, False, False, False]
    assert read_selection_ids(path) == [10, 30, 31, 32]


def test_write_selection_stub_and_empty(tmp_path):
    path = tmp_path / "selection.tsv"
    write_selection([{"id": 404}], path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert df.iloc[0].tolist() == ["404"] + [""] * (len(SELECTION_COLUMNS) - 1)

    write_selection([], path)
    assert path.read_text() == "\t".join(SELECTION_COLUMNS) + "\n"
    assert read_selection_ids(path) == []


# ----------------------------------------------------------------------------- query spec

URL = "https://neurovault.org/api/"


def test_query_spec_ignores_non_selection_keys():
    base = {"image_terms": {"map_type": "T map"}, "max_images": 30}
    spec = analysis_query_spec(selection(base), URL)
    other = dict(base, meta={"methods": ["stouffer"]}, ica={"n_components": 8})
    assert analysis_query_spec(selection(other), URL) == spec
    assert json.loads(json.dumps(spec)) == spec
    assert spec == {
        "collection_terms": {},
        "default_terms": True,
        "image_terms": {"map_type": "T map"},
        "max_images": 30,
        "selection_mode": "terms",
        "url": URL,
        "version": query.QUERY_SPEC_VERSION,
    }


@pytest.mark.parametrize(
    "change",
    [
        {"image_terms": {"map_type": "Z map"}},
        {"collection_terms": {"DOI": {"not_null": True}}},
        {"default_terms": False},
        {"max_images": 31},
        {"image_ids": [1]},
    ],
)
def test_query_spec_changes_with_selection_keys(change):
    base = {"image_terms": {"map_type": "T map"}, "max_images": 30}
    assert analysis_query_spec(selection(dict(base, **change)), URL) != analysis_query_spec(
        selection(base), URL
    )


def test_query_spec_canonical_and_url():
    a = selection({"image_terms": {"a": {"in": [1, 2]}, "b": 1}})
    b = selection({"image_terms": {"b": 1, "a": {"in": [1, 2]}}})
    assert list(analysis_query_spec(a, URL)["image_terms"]) == ["a", "b"]
    assert repr(analysis_query_spec(a, URL)) == repr(analysis_query_spec(b, URL))
    assert analysis_query_spec(a, "https://neurovault.org/api")["url"] == URL
    assert analysis_query_spec(a, "https://other.org/api/")["url"] == "https://other.org/api/"
    assert analysis_query_spec(a, "snap/dir/")["url"] == "snap/dir"
    assert analysis_query_spec(selection({"max_images": None}), URL)["max_images"] == 100
    # the dump's path and content digest are in the spec of a dump selection only (an API
    # selection's spec, the query rule's params, stays as it was: no rerun)
    assert not {"dump", "dump_sha256"} & set(analysis_query_spec(a, URL, dump_sha256="ab"))
    with_dump = analysis_query_spec(a, URL, dump="x.tar.gz", dump_sha256="ab")
    assert (with_dump["dump"], with_dump["dump_sha256"]) == ("x.tar.gz", "ab")
    assert analysis_query_spec(a, URL, dump="x.tar.gz", dump_sha256="cd") != with_dump


def test_query_spec_explicit_mode_drops_terms():
    a = selection({"image_ids": [151, 3041, 151], "image_terms": {"map_type": "T map"}, "max_images": None})
    b = selection({"image_ids": [151, 3041], "image_terms": {}, "default_terms": False, "collection_ids": []})
    assert analysis_query_spec(a, URL) == analysis_query_spec(b, URL)
    assert analysis_query_spec(a, URL) == {
        "collection_ids": [],
        "image_ids": [151, 3041],
        "max_images": None,
        "selection_mode": "explicit",
        "url": URL,
        "version": query.QUERY_SPEC_VERSION,
    }


def test_query_module_imports_lean():
    code = (
        "import sys\n"
        "from nvmeta.select.query import analysis_query_spec, analysis_selection\n"
        "block = {'image_ids': [], 'collection_ids': [], 'image_terms': {'map_type': {'in': ['T map']}},\n"
        "         'collection_terms': {}, 'default_terms': True, 'max_images': None, 'hygiene': False}\n"
        "assert analysis_query_spec(analysis_selection(block), 'https://x/api/')['max_images'] == 100\n"
        "heavy = [m for m in ('nilearn', 'pandas', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- ids, listings, funnel


def _write_records(root, images, collections):
    """A snapshot whose records are written verbatim (ids as the server sent them: 5021.0, "abc")."""
    (root / "api" / "images").mkdir(parents=True)
    (root / "api" / "collections").mkdir(parents=True)
    for k, rec in enumerate(images, start=1):
        v = rec["id"]
        stem = int(v) if type(v) in (int, float) and 0 < v < 10**6 and v == int(v) else 9000 + k
        (root / "api" / "images" / f"{stem}.json").write_text(json.dumps(rec))
    for rec in collections:
        (root / "api" / "collections" / f"{int(rec['id'])}.json").write_text(json.dumps(rec))
    return root


HOSTILE_IDS = [5021.0, 5022.5, "abc", -3, True, 1e20, "5024", 5023]


def test_float_ids_from_the_server_validated_once(tmp_path, caplog):
    """Issue 10.3: an integral float id becomes an int; 5022.5, "abc", negative, bool, huge are
    excluded with a reason; selection.tsv holds only ints."""
    from conftest import fast_config

    from nvmeta.neurovault import make_client
    from nvmeta.testing.server import FixtureServer

    images = [image(i, 1.0) for i in HOSTILE_IDS]
    root = _write_records(tmp_path / "snap", images, [collection(1, len(images))])
    with FixtureServer(root) as srv, caplog.at_level(logging.WARNING, logger="test_query"):
        client = make_client(fast_config(srv.url))
        records, funnel = query.select(client, selection({"default_terms": False}, max_images=None), LOG)
        explicit = run_query(client, selection({"image_ids": [5021]}), LOG)
    assert [r["id"] for r in records] == [5021, 5023]
    assert all(type(r["id"]) is int and type(r["collection_id"]) is int for r in records + explicit)
    assert explicit[0]["id"] == 5021 and explicit[0]["collection_id"] == 1
    assert funnel["excluded"] == {"invalid image id or collection_id": 6}
    for bad in ("5022.5", "'abc'", "-3", "True", "1e+20", "'5024'"):
        assert f"listed image with invalid id {bad} skipped" in caplog.text
    path = tmp_path / "selection.tsv"
    write_selection(records, path)
    assert path.read_text().splitlines()[1].split("\t")[:2] == ["5021", "1"]
    with pytest.raises(Exception, match="invalid image id"):
        write_selection([{"id": 5021.5}], tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()


@pytest.mark.parametrize(
    ("value", "expected"), [(5021, 5021), (5021.0, 5021), (1.0, 1), (10**12 - 1, 10**12 - 1)]
)
def test_record_id_accepts(value, expected):
    from nvmeta.neurovault import record_id

    got = record_id(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    "value",
    [5021.5, "abc", "5021", -3, 0, 0.0, True, False, None, 1e20, 10**12, float("nan"), float("inf"), [1]],
)
def test_record_id_rejects(value):
    from nvmeta.neurovault import UnsafeInput, record_id

    with pytest.raises(UnsafeInput, match="invalid id"):
        record_id(value)


def test_under_reported_count_is_followed_to_the_end(tmp_path, caplog):
    """Issue 10.5: count 3, six items behind next links: all six are selected (four before the fix)."""
    from conftest import fast_config

    from nvmeta.neurovault import make_client
    from nvmeta.neurovault.layout import write_snapshot
    from nvmeta.testing.server import FixtureServer

    images = [image(100 + k, 1) for k in range(6)]
    root = write_snapshot(tmp_path / "snap", images, [collection(1, 6)])
    with FixtureServer(root, max_limit=2) as srv:
        srv.add_fault(r"collections/1/images/", "miscount", count=3)
        with caplog.at_level(logging.WARNING):
            records = run_query(make_client(fast_config(srv.url)), selection(max_images=None), LOG)
        assert srv.count("collections/1/images/") == 3  # three pages of two
    assert ids(records) == [100, 101, 102, 103, 104, 105]
    assert "count (3) under-reports its items: 6 records" in caplog.text


def test_misspelled_field_fails_naming_the_closest_fields(small):
    """Issue 10.6: a term on a field no examined record carries fails, with difflib's suggestion."""
    with pytest.raises(ConfigError) as err:
        run_query(small, selection({"image_terms": {"map_typ": "T map"}}), LOG, key_prefix="analyses.pain")
    msg = str(err.value)
    assert msg.startswith("analyses.pain.image_terms.map_typ: no examined record has a field 'map_typ'")
    assert "Did you mean map_type" in msg and "7 image records examined" in msg
    with pytest.raises(ConfigError, match=r"collection_terms.nmae: .*Did you mean name"):
        run_query(
            small,
            selection({"collection_terms": {"nmae": {"pattern": "coll"}}}),
            LOG,
            key_prefix="analyses.pain",
        )
    # a test for missing values on an absent field is legitimate
    assert ids(run_query(small, selection({"image_terms": {"smoothness": {"null": True}}}), LOG)) == [
        10,
        11,
        31,
    ]
    assert ids(run_query(small, selection({"image_terms": {"smoothness": {"not_null": False}}}), LOG)) == [
        10,
        11,
        31,
    ]
    with pytest.raises(ConfigError, match="smoothness"):
        run_query(small, selection({"image_terms": {"smoothness": {"null": False}}}), LOG)


def test_funnel_counts_rejections_per_term(small):
    records, funnel = query.select(
        small, selection({"image_terms": {"number_of_subjects": {"ge": 10}}}), LOG, key_prefix="analyses.a"
    )
    assert ids(records) == [10, 11]
    # independent count: the first failing term of each listed image, in the effective order
    from nvmeta.select.filters import build_terms

    image_terms, collection_terms = build_terms({"image_terms": {"number_of_subjects": {"ge": 10}}}, "a")
    listed = [im for cid in (1, 3) for im in small.listings[cid]]
    expected = dict.fromkeys(image_terms, 0)
    for im in listed:
        for field, matcher in image_terms.items():
            if not nv.ResultFilter({field: matcher})(im):
                expected[field] += 1
                break
    got = {k.split(" ")[0].split(".", 1)[1]: v for k, v in funnel["images_rejected_by_term"].items()}
    assert got == expected and sum(got.values()) == 5
    assert funnel["images_rejected_by_term"]["image_terms.number_of_subjects"] == 1
    assert funnel["collections_examined"] == 3 and funnel["collections_passed"] == 2
    assert funnel["collections_rejected_by_term"]["collection_terms.number_of_images (default_terms)"] == 1
    assert funnel["images_examined"] == 7 and funnel["images_matched"] == 2 and funnel["selected"] == 2


def test_query_job_fails_on_an_empty_selection_with_its_funnel(tmp_path, small):
    sel, fun = tmp_path / "a" / "selection.tsv", tmp_path / "a" / "query_funnel.json"
    with pytest.raises(query.EmptySelection) as err:
        query.query_job(
            small, selection({"image_terms": {"map_type": "F map"}}), sel, fun, LOG, key_prefix="analyses.a"
        )
    msg = str(err.value)
    assert "analyses.a: the query selected no image" in msg
    assert "images examined: 7, matched: 0" in msg and "rejected by image_terms.map_type: 5" in msg
    assert not sel.exists()
    # the funnel is kept where the message says, beside the outputs (which Snakemake removes)
    failed = tmp_path / "a" / "query_funnel.failed.json"
    assert f"Funnel (kept in {failed})" in msg and not fun.exists()
    assert json.loads(failed.read_text())["selected"] == 0
    assert json.loads(failed.read_text())["images_rejected_by_term"]["image_terms.map_type"] == 5
    records = query.query_job(small, selection(), sel, fun, LOG)
    assert read_selection_ids(sel) == ids(records) == [10, 11, 31]
    assert json.loads(fun.read_text())["selected"] == 3
    assert not failed.exists()  # the failure is over: no stale failed funnel


def test_funnel_filters_agree_with_build_filters(small):
    """The per-term filters' conjunction is build_filters' filter, record by record."""
    from nvmeta.select.filters import build_filters, term_filters

    cfg = {"image_terms": {"map_type": {"in": ["T map", "Z map"]}}, "collection_terms": {"id": {"ge": 2}}}
    img_f, col_f = build_filters(cfg, "a")
    img_terms, col_terms = term_filters(cfg, "a")
    for im in small.images.values():
        assert img_f(im) == all(f(im) for _, f in img_terms.values())
    for col in small.collections.values():
        assert col_f(col) == all(f(col) for _, f in col_terms.values())


@pytest.mark.e2e
def test_workflow_fails_on_misspelled_field_and_empty_selection(tmp_path):
    """End to end (snakemake on a copy of the workflow): a misspelled field and a selection of 0
    images each fail their query with the field / the funnel in the message, once each and without a
    traceback; nothing is downloaded. The messages themselves are the unit tests' (above)."""
    from helpers import SNAPSHOT, make_workdir, run_snakemake

    analyses = {
        "typo": {"image_terms": {"map_typ": "T map"}},
        "none": {"image_terms": {"map_type": "F map"}},
    }
    config = {"neurovault": {"url": "tests/data/snapshot"}, "analyses": analyses}
    wf = make_workdir(tmp_path, config, snapshot=SNAPSHOT)
    targets = [f"results/analyses/{a}/selection.tsv" for a in analyses]
    proc = run_snakemake(wf, "--keep-going", *targets, check=False, timeout=600)
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:]
    assert "analyses.typo.image_terms.map_typ: no examined record has a field 'map_typ'" in out, out[-4000:]
    assert "Did you mean map_type" in out
    assert "analyses.none: the query selected no image" in out and "rejected by image_terms.map_type" in out
    assert not any((wf / "results/analyses" / a / "selection.tsv").exists() for a in analyses)
    assert not (wf / "results/images").exists()
    # each error once and without a traceback, and the funnel is where the message says although
    # Snakemake removed the failed job's outputs
    once = once_per_log_block(out)
    assert (
        once.count("the query selected no image") == 1 and once.count("no examined record has a field") == 1
    )
    assert "Traceback" not in out and "EmptySelection" not in out
    failed = "results/analyses/none/query_funnel.failed.json"
    assert f"Funnel (kept in {failed})" in out
    assert not (wf / "results/analyses/none/query_funnel.json").exists()
    funnel = json.loads((wf / failed).read_text())
    assert funnel["selected"] == 0 and funnel["images_rejected_by_term"]["image_terms.map_type"] > 0


def test_explicit_selection_of_exactly_max_images_is_not_called_truncated(caplog):
    """Exactly max_images explicit ids (or a collection of exactly that size) select everything
    asked for: no "truncated" warning (it used to be printed whenever the cap was reached)."""
    client = _big_client(n_collections=2, per_collection=10)
    with caplog.at_level(logging.WARNING, logger="test_query"):
        records = run_query(client, selection({"image_ids": [1003, 2004], "max_images": 2}), LOG)
        assert ids(records) == [1003, 2004]
        records = run_query(client, selection({"collection_ids": [1], "max_images": 10}), LOG)
        assert ids(records) == [1000 + i for i in range(10)]
        records = run_query(client, selection({"image_ids": [1003, 1003], "max_images": 1}), LOG)
        assert ids(records) == [1003]
    assert "truncated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="test_query"):
        run_query(client, selection({"image_ids": [1003, 2004, 2005], "max_images": 2}), LOG)
    assert "max_images=2 reached: explicit selection truncated" in caplog.text


# ----------------------------------------------------------------------------- explicit ids: listing prefetch


def _prefetch_client():
    collections = [collection(1, 10), collection(2, 2), collection(3, 1), collection(4, 1)]
    images = [image(i, 1, name=f"one {i}") for i in range(100, 110)]
    images += [image(5000, 2), image(5001, 2), image(90000, 3), image(110, 4)]
    return FakeClient(collections, images)


def test_explicit_ids_near_each_other_take_their_records_from_the_collection_listing():
    """Issue 12: once an explicit image's record names its collection, the later ids near it come from
    one listing of that collection instead of a record each; the selection is unchanged."""
    wanted = [*range(100, 110), 110, 5000, 5001, 90000]
    client = _prefetch_client()
    records, funnel = query.select(client, selection({"image_ids": wanted}), LOG)
    assert ids(records) == wanted
    assert client.calls == [
        ("image", 100),
        ("collection", 1),  # 10 later ids within 1,000 of 100, a 10-image collection: one page
        ("iter", "collections/1/images/"),  # holds 101-109
        ("image", 110),  # near 100 but in collection 4: not in the listing, asked alone
        ("image", 5000),  # one later id near it: a listing page would save nothing
        ("image", 5001),
        ("image", 90000),
    ]
    # the same records as asked one by one (a local source is never prefetched: compare with it)
    alone = FakeClient(list(client.collections.values()), list(client.images.values()))
    alone.describe_source = lambda: {"kind": "snapshot"}
    ref, _ = query.select(alone, selection({"image_ids": wanted}), LOG)
    assert [c for c in alone.calls if c[0] != "image"] == []
    assert records == ref
    assert all(r.get("collection_name") is None for r in records)  # as before: names only for collection_ids
    # the collection records asked for on the way are kept for the downloads
    assert set(funnel["_collections"]) == {1}
    assert funnel["images_examined"] == funnel["images_matched"] == len(wanted)


def test_explicit_ids_prefetch_nothing_beyond_max_images():
    """With room for one image, the first record fills the selection: no collection listing."""
    client = _prefetch_client()
    records = run_query(client, selection({"image_ids": list(range(100, 110)), "max_images": 1}), LOG)
    assert ids(records) == [100] and client.calls == [("image", 100)]
    client = _prefetch_client()
    records = run_query(client, selection({"image_ids": list(range(100, 110)), "max_images": 2}), LOG)
    # room for one more: one record alone costs less than collection record + listing
    assert ids(records) == [100, 101] and client.calls == [("image", 100), ("image", 101)]


def test_explicit_ids_prefetch_failures_fall_back_on_records_quietly(caplog):
    """A listing that fails (here: incomplete twice) costs nothing but its requests: the ids are asked
    for one by one, and no ERROR says that no selection was written."""
    client = _prefetch_client()
    real = client.iter_results

    def short(path, limit=1000, log=None):
        client.last_listing = {"path": path, "complete": False, "collected": 1, "count": 10}
        yield from list(real(path, limit, log))[:1]

    client.iter_results = short
    with caplog.at_level(logging.DEBUG):
        records = run_query(client, selection({"image_ids": list(range(100, 110))}), LOG)
    assert ids(records) == list(range(100, 110))
    assert [c for c in client.calls if c[0] == "image"] == [("image", i) for i in range(100, 110)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
