"""nvmeta.images.download.fetch_image: metadata.json + map.nii.gz, modes, failures as statuses, fault matrix."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from conftest import fast_config, md5
from helpers import selection

from nvmeta.images.download import OFFLINE_MISSING, fetch_image
from nvmeta.neurovault import UnsafeInput, make_client
from nvmeta.neurovault.layout import write_snapshot
from nvmeta.testing.server import FixtureServer
from nvmeta.workflow.config import defaults

NVMETA_KEYS = {"status", "reason", "collection", "md5", "bytes", "source_url", "source_format", "fetched_at"}


@pytest.fixture
def res(tmp_path):
    d = tmp_path / "results"
    (d / "images").mkdir(parents=True)
    return d


def fetch(client, iid, res, mode="download_new"):
    return fetch_image(client, iid, res / "images" / str(iid), mode, res / "collections")


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def meta(res, iid) -> dict:
    return json.loads((res / "images" / str(iid) / "metadata.json").read_text())


def assert_failed(res, iid, match):
    d = res / "images" / str(iid)
    m = meta(res, iid)
    assert m["nvmeta"]["status"] == "failed" and match in m["nvmeta"]["reason"], m["nvmeta"]["reason"]
    assert files_in(d) == ["metadata.json"]  # no map, no temp leftovers
    return m


# ------------------------------------------------------------------------------------------------
def test_fetch_ok_layout(fixture_server, client, res):
    r = fetch(client, 101, res)
    d = res / "images" / "101"
    assert r["status"] == "ok" and r["image_id"] == 101 and r["reason"] is None
    assert files_in(d) == ["map.nii.gz", "metadata.cache.json", "metadata.json"]
    served = fixture_server.tiny.served[101]
    assert (d / "map.nii.gz").read_bytes() == served
    m = meta(res, 101)
    nv = m.pop("nvmeta")
    assert NVMETA_KEYS <= set(nv)
    assert nv["md5"] == md5(served) == md5((d / "map.nii.gz").read_bytes()) and nv["bytes"] == len(served)
    assert nv["source_format"] == "nii.gz"
    assert nv["source_url"] == f"{fixture_server.base}/media/images/11/zstat1.nii.gz"
    assert nv["collection"]["id"] == 11 and nv["collection"]["name"] == "collection 11"
    # the record exactly as served
    assert m == json.loads(
        json.dumps(fixture_server.tiny.records[101]).replace("https://neurovault.org", fixture_server.base)
    )
    assert json.loads((res / "collections" / "11.json").read_text()) == nv["collection"]


def test_collection_fetched_once(fixture_server, client, res):
    for iid in (101, 102, 103):
        assert fetch(client, iid, res)["status"] == "ok"
    assert fixture_server.count(r"^/api/collections/11/") == 1
    assert files_in(res / "collections") == ["11.json"]


def test_formats(fixture_server, client, res):
    import nibabel as nib
    import numpy as np

    r = fetch(client, 103, res)
    assert (
        r["status"] == "ok"
        and r["source_format"] == "nii"
        and r["md5"] == md5(fixture_server.tiny.served[103])
    )
    assert gzip.decompress((res / "images/103/map.nii.gz").read_bytes()) == fixture_server.tiny.served[103]
    r = fetch(client, 104, res)
    assert r["status"] == "ok" and r["source_format"] == "analyze"
    np.testing.assert_array_equal(
        nib.load(res / "images/104/map.nii.gz").get_fdata(dtype=np.float32), fixture_server.tiny.analyze_data
    )
    r = fetch(client, 105, res)  # 5 volumes: stored as served; the zmap stage excludes it
    assert r["status"] == "ok" and nib.load(res / "images/105/map.nii.gz").shape == (4, 5, 6, 5)


def test_download_new_reuses(fixture_server, client, res):
    fetch(client, 101, res)
    before = meta(res, 101)
    fixture_server.reset_log()
    r = fetch(client, 101, res)
    assert r["status"] == "ok" and fixture_server.requests == []  # nothing re-downloaded
    assert meta(res, 101) == before


def test_download_new_reuses_map_without_metadata(fixture_server, client, res):
    """A job killed after the map was renamed but before metadata.json: the map is not downloaded again."""
    fetch(client, 101, res)
    (res / "images/101/metadata.json").unlink()
    (res / "images/101/metadata.cache.json").unlink()
    fixture_server.reset_log()
    r = fetch(client, 101, res)
    assert r["status"] == "ok" and r["md5"] == md5(fixture_server.tiny.served[101])
    assert fixture_server.requests == ["/api/images/101/"]  # record only; collection cached, no media


@pytest.mark.parametrize("mode", ["download_new", "offline"])
def test_forced_rerun_restores_metadata_from_disk(fixture_server, client, res, mode):
    """Snakemake deletes metadata.json before a forced rerun: it is restored from the disk copy,
    byte-identical, without any request (also in offline mode)."""
    fetch(client, 101, res)
    before = (res / "images/101/metadata.json").read_bytes()
    (res / "images/101/metadata.json").unlink()
    fixture_server.reset_log()
    r = fetch(client, 101, res, mode=mode)
    assert r["status"] == "ok"
    assert fixture_server.requests == []
    assert (res / "images/101/metadata.json").read_bytes() == before


def test_download_new_replaces_corrupt_map(fixture_server, client, res):
    fetch(client, 101, res)
    (res / "images/101/map.nii.gz").write_bytes(b"garbage")
    fixture_server.reset_log()
    assert fetch(client, 101, res)["status"] == "ok"
    assert fixture_server.count("media") == 1
    assert (res / "images/101/map.nii.gz").read_bytes() == fixture_server.tiny.served[101]


def test_overwrite_refetches(fixture_server, client, res):
    fetch(client, 101, res)
    fixture_server.reset_log()
    assert fetch(client, 101, res, mode="overwrite")["status"] == "ok"
    assert fixture_server.count("media") == 1 and fixture_server.count("collections/11/") == 1


def test_overwrite_failure_removes_stale_map(fixture_server, client, res):
    fetch(client, 101, res)
    fixture_server.add_fault("zstat1", "not_nifti")
    fetch(client, 101, res, mode="overwrite")
    assert_failed(res, 101, "not a NIfTI image")


def test_offline_mode(fixture_server, res):
    online = make_client(fast_config(fixture_server.url))
    fetch(online, 101, res)
    fixture_server.reset_log()
    off = make_client(fast_config(fixture_server.url, mode="offline"))
    assert fetch_image(off, 101, res / "images/101", None, res / "collections")["status"] == "ok"
    r = fetch_image(off, 102, res / "images/102", None, res / "collections")
    assert r["status"] == "failed" and r["reason"] == OFFLINE_MISSING
    assert_failed(res, 102, OFFLINE_MISSING)
    assert meta(res, 102)["id"] == 102
    # explicit offline mode with an online client: still no network
    r = fetch(online, 103, res, mode="offline")
    assert r["reason"] == OFFLINE_MISSING
    assert fixture_server.requests == []


@pytest.mark.parametrize(
    "iid,match",
    [
        (999, "image record: not found (HTTP 404)"),
        (201, "image record: not found (HTTP 404)"),  # private collection
        (106, "corrupt gzip"),
        (107, "file_size is 0"),
    ],
)
def test_failures_are_statuses(fixture_server, client, res, iid, match):
    r = fetch(client, iid, res)
    assert r["status"] == "failed" and match in r["reason"]
    m = assert_failed(res, iid, match)
    assert m["id"] == iid


def test_too_large(fixture_server, res):
    c = make_client(fast_config(fixture_server.url, max_file_bytes=100))
    assert fetch(c, 101, res)["status"] == "failed"
    assert_failed(res, 101, "file too large")
    assert fixture_server.count("media") == 0  # refused from file_size, before any download


def test_media_forbidden(fixture_server, client, res):
    fixture_server.add_fault("zstat1", "status", code=403)
    fetch(client, 101, res)
    assert_failed(res, 101, "forbidden (HTTP 403")


def test_invalid_id_and_mode_raise(client, res):
    for bad in ("abc", "0", -1, "1/../2"):
        with pytest.raises(UnsafeInput):
            fetch_image(client, bad, res / "images" / "x", "download_new", res / "collections")
    with pytest.raises(ValueError, match="mode"):
        fetch(client, 101, res, mode="sometimes")
    assert not (res / "images" / "x").exists() or files_in(res / "images" / "x") == []


@pytest.mark.parametrize(
    "file,match",
    [
        ("file:///etc/passwd", "unsafe file URL"),
        ("../../etc/passwd", "unsafe file URL"),
        ("http://evil.example.org/media/images/11/x.nii.gz", "foreign host"),
        ("{base}/media/images/11/%2e%2e/%2e%2e/%2e%2e/etc/passwd.nii.gz", "path traversal"),
        (None, "no file URL"),
        ("{base}/media/images/11/x.mgz", "not a NIfTI file name"),
    ],
)
def test_hostile_records(tmp_path, res, file, match):
    rec = {"id": 5, "collection_id": 1, "file_size": 10, "file": file}
    write_snapshot(tmp_path / "hostile", [rec], [{"id": 1}])
    with FixtureServer(tmp_path / "hostile") as srv:
        if isinstance(file, str):  # the server's base is known only once it runs: rewrite the record
            rec["file"] = file.replace("{base}", srv.base)
            write_snapshot(tmp_path / "hostile", [rec], [{"id": 1}])
        srv.snapshot = type(srv.snapshot)(tmp_path / "hostile")
        r = fetch(make_client(fast_config(srv.url)), 5, res)
        assert r["status"] == "failed"
        assert_failed(res, 5, match)
        assert srv.count("media") == 0


def test_hostile_record_id_mismatch(tmp_path, res):
    write_snapshot(tmp_path / "h", [{"id": 5, "collection_id": 1}], [{"id": 1}])
    (tmp_path / "h/api/images/5.json").write_text(json.dumps({"id": "5; rm -rf /", "collection_id": 1}))
    with FixtureServer(tmp_path / "h") as srv:
        fetch(make_client(fast_config(srv.url)), 5, res)
    assert_failed(res, 5, "server returned a record with id")


def test_collection_error_does_not_fail_image(fixture_server, client, res):
    fixture_server.add_fault("collections/11/", "status", code=500)
    r = fetch(client, 101, res)
    assert r["status"] == "ok" and r["collection"] is None and "500" in r["collection_error"]
    assert not (res / "collections" / "11.json").exists()


def test_snapshot_client_fetch(tiny_snapshot, res):
    s = make_client({**defaults("neurovault"), "url": str(tiny_snapshot.root)})
    assert fetch(s, 101, res)["md5"] == md5(tiny_snapshot.served[101])
    assert meta(res, 101)["file"] == tiny_snapshot.records[101]["file"]
    assert fetch(s, 104, res)["status"] == "ok"
    assert fetch(s, 201, res)["status"] == "failed"
    assert fetch(s, 106, res)["status"] == "failed"
    assert_failed(res, 106, "corrupt gzip")


def test_lean_import():
    """The download module must not pull nibabel or heavy libraries at import time."""
    import subprocess

    code = (
        "import sys, nvmeta.images.download, nvmeta.neurovault; "
        "heavy = [m for m in ('nibabel', 'numpy', 'pandas', 'nilearn', 'matplotlib', 'sklearn', 'requests') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# fault matrix: each fault on the map of image 101 (or its record / its collection listing);
# image 102 fetched alongside must be unaffected. Outcome: recovered (same bytes as served) or
# failed with a specific reason; never a partial file.
# ------------------------------------------------------------------------------------------------
MATRIX = [
    # (name, path regex, kind, times, opts, expected outcome, reason substring)
    ("500 then ok", "zstat1", "status", 2, {"code": 500}, "recovered", None),
    ("502 then ok", "zstat1", "status", 2, {"code": 502}, "recovered", None),
    ("503 then ok", "zstat1", "status", 2, {"code": 503}, "recovered", None),
    ("503 always", "zstat1", "status", None, {"code": 503}, "failed", "HTTP 503 after 3 retries"),
    ("429 Retry-After", "zstat1", "retry_after", 1, {"seconds": 0}, "recovered", None),
    ("body cut short once", "zstat1", "truncate", 1, {}, "recovered", None),
    ("body cut short always", "zstat1", "truncate", None, {}, "failed", "download incomplete"),
    ("reset mid-file once", "zstat1", "reset", 1, {}, "recovered", None),
    ("reset mid-file always", "zstat1", "reset", None, {}, "failed", "download incomplete"),
    ("stall once", "zstat1", "stall", 1, {"seconds": 1.5}, "recovered", None),
    ("stall always", "zstat1", "stall", None, {"seconds": 1.5}, "failed", "timed out"),
    (
        "record 404",
        "images/101/",
        "status",
        None,
        {"code": 404},
        "failed",
        "image record: not found (HTTP 404)",
    ),
    ("media 403", "zstat1", "status", None, {"code": 403}, "failed", "forbidden (HTTP 403"),
    ("HTML 200 record", "images/101/", "html200", None, {}, "failed", "server returned HTML instead of JSON"),
    ("HTML 200 map once", "zstat1", "html200", 1, {}, "recovered", None),
    (
        "HTML 200 map always",
        "zstat1",
        "html200",
        None,
        {},
        "failed",
        "server returned HTML instead of a NIfTI",
    ),
    (
        "redirect record",
        "^/api/images/101/$",
        "redirect",
        1,
        {"location": "{base}/api/images/101"},
        "recovered",
        None,
    ),
    (
        "redirect map",
        "zstat1",
        "redirect",
        1,
        {"location": "{base}/media/images/11/zstat1.nii.gz?x=1"},
        "recovered",
        None,
    ),
    ("redirect loop", "zstat1", "redirect_loop", None, {}, "failed", "too many redirects"),
    ("gzip of non-NIfTI", "zstat1", "not_nifti", None, {}, "failed", "not a NIfTI image"),
    ("connection dropped", "zstat1", "down", 2, {}, "recovered", None),
    ("server down", "zstat1", "down", None, {}, "failed", "connection failed"),
]


@pytest.fixture(scope="module")
def matrix_rows():
    rows = []
    yield rows
    if rows:
        w = max(len(r[0]) for r in rows)
        lines = [
            "",
            "fault matrix (fetch_image, image 101 faulted, image 102 alongside):",
            f"{'fault':<{w}}  outcome    reason",
        ]
        lines += [f"{n:<{w}}  {o:<9}  {reason or ''}" for n, o, reason in rows]
        print("\n".join(lines), file=sys.__stdout__)


@pytest.mark.reliability
@pytest.mark.parametrize("name,rx,kind,times,opts,outcome,reason", MATRIX, ids=[m[0] for m in MATRIX])
def test_fault_matrix(tiny_snapshot, res, matrix_rows, name, rx, kind, times, opts, outcome, reason):
    with FixtureServer(tiny_snapshot.root) as srv:
        c = make_client(fast_config(srv.url, timeout=[1.0, 0.5]))
        srv.add_fault(rx, kind, times=times, **opts)
        r = fetch(c, 101, res)
        other = fetch(c, 102, res)
    d = res / "images" / "101"
    if outcome == "recovered":
        assert r["status"] == "ok", r["reason"]
        assert (d / "map.nii.gz").read_bytes() == tiny_snapshot.served[101]
        assert r["md5"] == md5(tiny_snapshot.served[101])
        assert files_in(d) == ["map.nii.gz", "metadata.cache.json", "metadata.json"]
    else:
        assert r["status"] == "failed" and reason in r["reason"], r["reason"]
        assert files_in(d) == ["metadata.json"]
    assert other["status"] == "ok" and other["md5"] == md5(tiny_snapshot.served[102])
    assert files_in(res / "images" / "102") == ["map.nii.gz", "metadata.cache.json", "metadata.json"]
    matrix_rows.append((name, "recovered" if r["status"] == "ok" else "excluded", r["reason"]))


def test_download_reuses_the_record_the_query_kept(fixture_server, res):
    """Issue 12: a selection from a listing keeps each record; the download then costs one request
    (the file), and mode overwrite asks for the record again."""
    import logging

    from nvmeta.select.query import query_job

    client = make_client(fast_config(fixture_server.url))
    sel = res / "analyses" / "a" / "selection.tsv"
    records = query_job(
        client,
        selection({"collection_ids": [13]}),
        sel,
        sel.with_name("query_funnel.json"),
        logging.getLogger("test_download"),
        records_dir=res / "records",
        collections_dir=res / "collections",
    )
    ids = [r["id"] for r in records]
    assert ids == fixture_server.tiny.ids["many"]
    assert sorted(p.name for p in (res / "records").iterdir()) == sorted(f"{i}.json" for i in ids)
    fixture_server.reset_log()
    for iid in ids:
        assert fetch(client, iid, res)["status"] == "ok"
    # one request per image, the file; no record, no collection record
    assert len(fixture_server.requests) == len(ids)
    assert all(p.startswith("/media/images/13/") for p in fixture_server.requests)
    m = meta(res, ids[0])
    listed = json.loads((res / "records" / f"{ids[0]}.json").read_text())["record"]
    assert {k: v for k, v in m.items() if k != "nvmeta"} == listed
    assert m["nvmeta"]["record_source"] == {"kind": "api", "url": fixture_server.url, "kept_by": "query"}
    assert m["nvmeta"]["collection"]["id"] == 13
    assert m["nvmeta"]["md5"] == md5(fixture_server.tiny.served[ids[0]])
    # overwrite: the record is asked for again (and the collection record), then the file
    fixture_server.reset_log()
    fetch(client, ids[0], res, mode="overwrite")
    assert fixture_server.requests[0] == f"/api/images/{ids[0]}/"
    assert meta(res, ids[0])["nvmeta"]["record_source"]["request"] == f"images/{ids[0]}/"
    # a kept record of another image (or unreadable) is ignored: the API is asked
    (res / "records" / f"{ids[1]}.json").write_text(json.dumps({"record": {"id": 1}, "source": {}}))
    for p in (res / "images" / str(ids[1])).iterdir():
        p.unlink()
    fixture_server.reset_log()
    assert fetch(client, ids[1], res)["status"] == "ok"
    assert f"/api/images/{ids[1]}/" in fixture_server.requests


def test_explicit_ids_of_one_collection_cost_one_record_one_listing_and_one_request_per_file(
    fixture_server, res
):
    """Issue 12, explicit ids (nilearn's fetch_neurovault_ids case) over HTTP: the first id's record
    names its collection, whose listing holds the other ids' records (was: one record request per
    id); the downloads then ask only for the files, the collection record being the query's."""
    import logging

    from nvmeta.select.query import query_job

    client = make_client(fast_config(fixture_server.url))
    ids = fixture_server.tiny.ids["many"]
    sel = res / "analyses" / "a" / "selection.tsv"
    fixture_server.reset_log()
    records = query_job(
        client,
        selection({"image_ids": ids}),
        sel,
        sel.with_name("query_funnel.json"),
        logging.getLogger("test_download"),
        records_dir=res / "records",
        collections_dir=res / "collections",
    )
    assert [r["id"] for r in records] == ids
    cid = fixture_server.tiny.many_cid
    paths = [p.split("?")[0] for p in fixture_server.requests]
    listing = f"/api/collections/{cid}/images/"
    assert paths[:2] == [f"/api/images/{ids[0]}/", f"/api/collections/{cid}/"]
    assert set(paths[2:]) == {listing}  # its pages, nothing else
    assert len(paths) < 1 + 1 + len(ids) // 5
    # each record as /api/images/{id}/ serves it
    for iid in (ids[1], ids[-1]):
        kept = json.loads((res / "records" / f"{iid}.json").read_text())["record"]
        alone = client.image(iid)
        assert kept == {k: v for k, v in alone.items() if k != "collection_name"}
    fixture_server.reset_log()
    for iid in ids:
        assert fetch(client, iid, res)["status"] == "ok"
    assert len(fixture_server.requests) == len(ids)  # the files, nothing else
    assert all(p.startswith(f"/media/images/{cid}/") for p in fixture_server.requests)


@pytest.mark.e2e
def test_workflow_downloads_cost_one_request_per_file(tmp_path):
    """Issue 12, end to end (snakemake on a copy of the workflow, a few collections, selection by
    terms): the query costs its listing pages (collections, then one per collection), the downloads
    exactly one request per file and nothing else (records and collection records are the query's);
    ``neurovault.mode: overwrite`` asks for every record again."""
    import yaml
    from conftest import API_RESPONSES, nifti_bytes
    from helpers import make_workdir, run_snakemake

    from nvmeta.testing import collection_record, image_record, load_recorded

    img_t = load_recorded(API_RESPONSES / "read_image.json")
    col_t = load_recorded(API_RESPONSES / "read_collection.json")
    cids = [41, 42, 43]
    records, files, served = [], {}, {}
    for k, cid in enumerate(cids):
        for j in range(3):
            iid = 4100 + 10 * k + j
            served[iid] = nifti_bytes(shape=(3, 3, 3), seed=iid)
            files[f"media/images/{cid}/m{iid}.nii.gz"] = served[iid]
            map_type = "T map" if (cid, j) == (43, 2) else "Z map"  # one listed image the terms reject
            records.append(
                image_record(img_t, iid, cid, f"m{iid}.nii.gz", file_size=len(served[iid]), map_type=map_type)
            )
    root = write_snapshot(
        tmp_path / "snap",
        records,
        [collection_record(col_t, c, name=f"c{c}", number_of_images=3) for c in cids],
        files,
    )
    selected = sorted(r["id"] for r in records if r["map_type"] == "Z map")
    targets = [f"results/images/{i}/metadata.json" for i in selected]
    with FixtureServer(root) as srv:
        cfg = {
            "neurovault": fast_config(srv.url),
            "analyses": {"a": {"image_terms": {"map_type": "Z map"}}},
        }
        wf = make_workdir(tmp_path, cfg)
        run_snakemake(wf, "--keep-going", "results/analyses/a/selection.tsv", timeout=600)
        listings = sorted(p.split("?")[0] for p in srv.requests)
        assert listings == ["/api/collections/", *(f"/api/collections/{c}/images/" for c in cids)]
        sel = (wf / "results/analyses/a/selection.tsv").read_text().splitlines()[1:]
        assert sorted(int(line.split("\t", 1)[0]) for line in sel) == selected

        srv.reset_log()
        run_snakemake(wf, "--keep-going", *targets, timeout=600)
        media = {iid: f"/media/images/{iid // 10 % 10 + 41}/m{iid}.nii.gz" for iid in selected}
        assert sorted(srv.requests) == sorted(media.values())  # one request per file, nothing else
        for iid in selected:
            m = json.loads((wf / f"results/images/{iid}/metadata.json").read_text())
            assert m["nvmeta"]["status"] == "ok" and m["nvmeta"]["md5"] == md5(served[iid])
            assert m["nvmeta"]["record_source"]["kept_by"] == "query"
            assert m["nvmeta"]["collection"]["id"] == m["collection_id"]

        # overwrite: each download asks for its record (and collection record) again, then the file
        cfg["neurovault"]["mode"] = "overwrite"
        (wf / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        srv.reset_log()
        run_snakemake(wf, "--forcerun", "download", *targets, timeout=600)
        for iid in selected:
            assert srv.count(f"^/api/images/{iid}/$") == 1 and srv.count(f"^{media[iid]}$") == 1
            m = json.loads((wf / f"results/images/{iid}/metadata.json").read_text())
            assert m["nvmeta"]["record_source"]["request"] == f"images/{iid}/"
        others = [p for p in srv.requests if not p.startswith(("/api/images/", "/media/"))]
        assert others and all(p in {f"/api/collections/{c}/" for c in cids} for p in others)
        assert len(srv.requests) == 2 * len(selected) + len(others)


def test_a_changed_kept_record_rewrites_the_metadata_with_the_map_on_disk(fixture_server, res):
    """The query kept a new record (e.g. number_of_subjects 50 instead of 25 in a new dump): the
    rerun download restored the old record from metadata.cache.json (Snakemake removes
    metadata.json first). Now the new record is written, the map on disk reused when its file is
    the same; a new file is fetched; a record that is no longer public fails."""
    import logging

    from nvmeta.select.query import query_job

    client = make_client(fast_config(fixture_server.url))
    sel = res / "analyses" / "a" / "selection.tsv"
    iid = fixture_server.tiny.ids["many"][0]
    query_job(client, selection({"image_ids": [iid]}), sel, sel.with_name("query_funnel.json"),
              logging.getLogger("test_download"), records_dir=res / "records")  # fmt: skip
    assert fetch(client, iid, res)["status"] == "ok"
    first = meta(res, iid)
    kept_path = res / "records" / f"{iid}.json"
    kept = json.loads(kept_path.read_text())
    kept["record"]["number_of_subjects"] = 50
    kept_path.write_text(json.dumps(kept))
    (res / "images" / str(iid) / "metadata.json").unlink()  # as Snakemake does before the rerun
    fixture_server.reset_log()
    block = fetch(client, iid, res)
    assert block["status"] == "ok" and fixture_server.requests == []
    for name in ("metadata.json", "metadata.cache.json"):
        m = json.loads((res / "images" / str(iid) / name).read_text())
        assert m["number_of_subjects"] == 50
        assert {k: v for k, v in m.items() if k != "nvmeta"} == kept["record"]
        assert m["nvmeta"]["map_md5"] == first["nvmeta"]["map_md5"] and m["nvmeta"]["status"] == "ok"
    # another file: fetched again
    other = fixture_server.tiny.ids["many"][1]
    kept["record"]["file"] = fixture_server.tiny.records[other]["file"].replace(
        "https://neurovault.org", fixture_server.base
    )
    kept_path.write_text(json.dumps(kept))
    fixture_server.reset_log()
    assert fetch(client, iid, res)["status"] == "ok"
    assert len(fixture_server.requests) == 1 and "/media/" in fixture_server.requests[0]
    assert meta(res, iid)["nvmeta"]["md5"] == md5(fixture_server.tiny.served[other])
    # the dump's record says the image is no longer a public statistic map: failed, map removed
    kept_path.write_text(json.dumps({"record": {"id": iid}, "source": {"kind": "dump"}, "missing": "gone"}))
    block = fetch(client, iid, res)
    assert block["status"] == "failed" and block["reason"] == "image record: gone"
    assert not (res / "images" / str(iid) / "map.nii.gz").exists()


def test_the_query_rewrites_a_kept_record_only_when_the_record_changed(tmp_path):
    """The kept records are the download rule's input: rewriting an unchanged one (or one whose
    source alone changed, e.g. a new export's sha256) would rerun every download and z-map."""
    import logging
    import os

    from helpers import SNAPSHOT

    from nvmeta.neurovault.dump import DumpSource
    from nvmeta.select.query import query_job
    from nvmeta.testing.dump import snapshot_tables, write_dump

    ids = [990001, 990002]
    res = tmp_path / "results"
    sel = res / "analyses" / "a" / "selection.tsv"

    def query(dump):
        query_job(DumpSource(dump, "https://neurovault.org/media/", max_field_bytes=defaults("neurovault")["max_dump_field_bytes"]), selection({"image_ids": ids}), sel,
                  sel.with_name("query_funnel.json"), logging.getLogger("t"), records_dir=res / "records")  # fmt: skip

    tables = snapshot_tables(SNAPSHOT, ids)
    query(write_dump(tmp_path / "v1.tar.gz", tables))
    paths = {i: res / "records" / f"{i}.json" for i in ids}
    for p in paths.values():
        os.utime(p, ns=(1, 1))
    tables["statmap"][0]["number_of_subjects"] = 50
    tables["collection"][0]["name"] = "renamed"  # another export: every record's source differs
    query(write_dump(tmp_path / "v2.tar.gz", tables))
    assert paths[990002].stat().st_mtime_ns == 1  # untouched
    assert paths[990001].stat().st_mtime_ns > 1
    kept = json.loads(paths[990001].read_text())
    assert kept["record"]["number_of_subjects"] == 50
    assert kept["source"]["path"].endswith("v2.tar.gz")
