"""The fixture NeuroVault server (nvmeta.testing.server) and the snapshot reader it serves."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from conftest import API_RESPONSES, N_MANY, md5

from nvmeta.neurovault.layout import Snapshot, UnsafePath, api_get, paginate, write_snapshot
from nvmeta.testing import load_recorded
from nvmeta.testing.server import FAULT_KINDS, FixtureServer


def raw_get(srv, path, timeout=5.0, headers=None):
    """One GET with http.client (no retries, no redirects): (status, headers, body)."""
    u = urlsplit(srv.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get_json(srv, path):
    status, headers, body = raw_get(srv, path)
    return status, headers, json.loads(body)


# ------------------------------------------------------------------------------------------------
# snapshot reader / writer
# ------------------------------------------------------------------------------------------------
def test_recorded_layout_used(tiny_snapshot):
    tmpl = load_recorded(API_RESPONSES / "read_image.json")
    rec = tiny_snapshot.records[101]
    assert list(rec)[: len(tmpl)] == list(tmpl)  # same keys, same order as the real reply
    assert rec["file"] == "https://neurovault.org/media/images/11/zstat1.nii.gz"
    assert rec["url"] == "https://neurovault.org/images/101/"
    assert load_recorded(API_RESPONSES / "update_image.json") == {"detail": "Not found."}


def test_snapshot_reader(tiny_snapshot):
    snap = Snapshot(tiny_snapshot.root)
    assert snap.image(101) == tiny_snapshot.records[101]
    assert [r["id"] for r in snap.images()] == sorted(set(tiny_snapshot.records) - {201})
    assert [r["id"] for r in snap.images(include_private=True)][-N_MANY - 1] == 201
    assert [c["id"] for c in snap.collections()] == [11, 13]
    assert [c["id"] for c in snap.collections(include_private=True)] == [11, 12, 13]
    assert [r["id"] for r in snap.collection_images(13)] == tiny_snapshot.ids["many"]
    assert snap.is_private(12) and not snap.is_private(11) and not snap.is_private(None)
    assert snap.neurosynth(101)["data"]["values"]["pain"] == 0.31
    assert snap.neurosynth(102) is None
    with pytest.raises(KeyError):
        snap.image(999)
    # copies: mutating a returned record does not change the snapshot
    snap.image(101)["name"] = "changed"
    assert snap.image(101)["name"] == "map 101"
    p = snap.media_path("https://neurovault.org/media/images/11/zstat1.nii.gz")
    assert p.read_bytes() == tiny_snapshot.served[101]
    assert (
        snap.media_path("/media/images/11/zstat1.nii.gz") == p == snap.media_path("images/11/zstat1.nii.gz")
    )
    assert snap.media_collection("/media/images/11/zstat1.nii.gz") == 11


def test_collection_images_are_a_scan_of_every_image(tiny_snapshot):
    """The per-collection index (built on first use) lists what filtering every image by its
    ``collection_id`` lists, sorted by id, private collection and unknown ids included."""
    snap = Snapshot(tiny_snapshot.root)
    every = snap.images(include_private=True)
    for cid in (11, 12, 13, 999):
        assert snap.collection_images(cid) == [r for r in every if r.get("collection_id") == cid]
    snap.collection_images(13).clear()  # a copy: the index is unchanged
    assert [r["id"] for r in snap.collection_images(13)] == tiny_snapshot.ids["many"]
    status, page = api_get(snap, "collections/13/images/", {"limit": "2", "offset": "1"})
    assert status == 200 and [r["id"] for r in page["results"]] == tiny_snapshot.ids["many"][1:3]


@pytest.mark.parametrize(
    "bad",
    [
        "/media/../api/images/101.json",
        "/media/images/%2e%2e/%2e%2e/private_collections.txt",
        "../../etc/passwd",
        "/etc/passwd",
        "/media//etc/passwd",
        "images/11/a\x00b",
        "images\\..\\x",
    ],
)
def test_media_path_refuses_escape(tiny_snapshot, bad):
    with pytest.raises(UnsafePath):
        Snapshot(tiny_snapshot.root).media_path(bad)


def test_media_path_refuses_symlink_escape(tiny_snapshot, tmp_path):
    (tmp_path / "outside.txt").write_text("secret")
    link = tiny_snapshot.root / "media" / "images" / "11" / "link.nii.gz"
    link.symlink_to(tmp_path / "outside.txt")
    with pytest.raises(UnsafePath):
        Snapshot(tiny_snapshot.root).media_path("/media/images/11/link.nii.gz")


def test_write_snapshot_refuses_escaping_paths(tmp_path):
    with pytest.raises(UnsafePath):
        write_snapshot(tmp_path / "s", [], [], {"../x": b"1"})
    write_snapshot(
        tmp_path / "s", [{"id": 5, "collection_id": 1}], [{"id": 1}], {"media/images/1/a.nii.gz": b"x"}
    )
    assert Snapshot(tmp_path / "s").image(5) == {"id": 5, "collection_id": 1}


def test_paginate_drf_semantics():
    items = list(range(250))
    url = "https://neurovault.org/api/images/"
    p = paginate(items, {}, url)
    assert p["count"] == 250 and len(p["results"]) == 100 and p["previous"] is None
    assert p["next"] == "https://neurovault.org/api/images/?limit=100&offset=100"
    for bad in ("0", "-3", "abc", ""):
        assert len(paginate(items, {"limit": bad}, url)["results"]) == 100
    p = paginate(items, {"limit": "10", "offset": "xyz"}, url)
    assert p["results"] == list(range(10))
    p = paginate(items, {"limit": "10", "offset": "-5"}, url)
    assert p["results"] == list(range(10))
    p = paginate(items, {"limit": "100", "offset": "150"}, url)
    assert p["results"] == list(range(150, 250)) and p["next"] is None
    assert p["previous"] == "https://neurovault.org/api/images/?limit=100&offset=50"
    p = paginate(items, {"limit": "100", "offset": "60"}, url)
    assert p["previous"] == "https://neurovault.org/api/images/?limit=100"  # offset dropped, as DRF does
    assert paginate(items, {"offset": "900"}, url)["results"] == []
    big = list(range(2500))
    p = paginate(big, {"limit": "5000"}, url)
    assert len(p["results"]) == 1000
    assert p["next"] == "https://neurovault.org/api/images/?limit=1000&offset=1000"


def test_recorded_page_shape_matches(tiny_snapshot):
    """Our page has the keys, and next/previous link form, of the recorded limit=1&offset=2 page."""
    rec = load_recorded(API_RESPONSES / "get_collection_images_limit.json")
    status, page = api_get(
        Snapshot(tiny_snapshot.root), "collections/13/images/", {"limit": "1", "offset": "2"}
    )
    assert status == 200 and list(page) == list(rec)
    assert page["next"] == "https://neurovault.org/api/collections/13/images/?limit=1&offset=3"
    assert page["previous"] == "https://neurovault.org/api/collections/13/images/?limit=1&offset=1"
    assert rec["next"].endswith("?limit=1&offset=3") and rec["previous"].endswith("?limit=1&offset=1")


# ------------------------------------------------------------------------------------------------
# normal service
# ------------------------------------------------------------------------------------------------
def test_trailing_slash_redirect(fixture_server):
    status, headers, _ = raw_get(fixture_server, "/api/images/101?format=json")
    assert status == 301
    assert headers["Location"] == f"{fixture_server.base}/api/images/101/?format=json"
    status, _, _ = raw_get(fixture_server, "/api/collections/11")
    assert status == 301


def test_image_record_json_and_rewrite(fixture_server):
    status, headers, obj = get_json(fixture_server, "/api/images/101/")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    expect = json.loads(
        json.dumps(fixture_server.tiny.records[101]).replace("https://neurovault.org", fixture_server.base)
    )
    assert obj == expect
    assert obj["file"] == f"{fixture_server.base}/media/images/11/zstat1.nii.gz"


def test_not_found_and_private(fixture_server):
    assert get_json(fixture_server, "/api/images/999/")[::2] == (404, {"detail": "Not found."})
    assert get_json(fixture_server, "/api/images/abc/")[0] == 404
    # image of a private collection by public id: 404, as on the real server
    assert get_json(fixture_server, "/api/images/201/")[::2] == (404, {"detail": "Not found."})
    assert get_json(fixture_server, "/api/collections/12/")[0] == 403
    assert get_json(fixture_server, "/api/collections/12/images/")[0] == 403
    assert raw_get(fixture_server, "/media/images/12/secret.nii.gz")[0] == 403
    assert raw_get(fixture_server, "/media/images/11/nothing.nii.gz")[0] == 404
    assert raw_get(fixture_server, "/media/images/%2e%2e/%2e%2e/private_collections.txt")[0] == 404
    # public listing leaves the private image out
    _, _, page = get_json(fixture_server, "/api/images/?limit=1000")
    assert 201 not in [r["id"] for r in page["results"]]


def test_private_image_status_option(tiny_snapshot):
    with FixtureServer(tiny_snapshot.root, private_image_status=403) as srv:
        assert get_json(srv, "/api/images/201/")[0] == 403


def test_media_bytes(fixture_server):
    status, headers, body = raw_get(fixture_server, "/media/images/11/zstat1.nii.gz")
    assert status == 200 and body == fixture_server.tiny.served[101]
    assert int(headers["Content-Length"]) == len(body)
    assert "Content-Encoding" not in headers


def test_listing_pagination_over_http(fixture_server):
    status, _, page = get_json(fixture_server, "/api/collections/13/images/?limit=10&offset=0")
    assert status == 200 and page["count"] == N_MANY and len(page["results"]) == 10
    assert page["next"] == f"{fixture_server.base}/api/collections/13/images/?limit=10&offset=10"
    ids = []
    url = "/api/collections/13/images/?limit=10"
    while url:
        _, _, page = get_json(fixture_server, url)
        ids += [r["id"] for r in page["results"]]
        url = page["next"] and urlsplit(page["next"])._replace(scheme="", netloc="").geturl()
    assert ids == fixture_server.tiny.ids["many"]
    _, _, page = get_json(fixture_server, "/api/collections/13/images/")
    assert len(page["results"]) == N_MANY and page["next"] is None  # default limit 100


def test_neurosynth_route(fixture_server):
    status, _, obj = get_json(fixture_server, "/api/decode/?neurovault=101")
    assert status == 200 and obj["data"]["values"] == {"pain": 0.31, "motor": 0.12}
    assert get_json(fixture_server, "/api/decode/?neurovault=102")[0] == 404
    assert raw_get(fixture_server, "/api/decode?neurovault=101")[0] == 301


def test_request_log_counters_latency(tiny_snapshot):
    with FixtureServer(tiny_snapshot.root, latency=0.3) as srv:
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=raw_get, args=(srv, f"/api/images/{i}/")) for i in (101, 102, 103, 104)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - t0 >= 0.3
        assert sorted(srv.requests) == [f"/api/images/{i}/" for i in (101, 102, 103, 104)]
        assert srv.count(r"^/api/images/10[12]/") == 2
        assert srv.max_in_flight >= 2  # they were served concurrently
        assert all(e["status"] == 200 for e in srv.log)
        srv.reset_log()
        assert srv.requests == [] and srv.count() == 0


# ------------------------------------------------------------------------------------------------
# faults (raw HTTP view; the client's reaction is in test_client.py / test_download.py)
# ------------------------------------------------------------------------------------------------
def test_unknown_fault_kind(fixture_server):
    with pytest.raises(ValueError, match="unknown fault kind"):
        fixture_server.add_fault("x", "explode")
    assert len(FAULT_KINDS) == 13


def test_fault_status_times(fixture_server):
    f = fixture_server.add_fault(r"^/api/images/101/", "status", times=2, code=502)
    assert raw_get(fixture_server, "/api/images/101/")[0] == 502
    status, headers, body = raw_get(fixture_server, "/api/images/101/")
    assert status == 502 and b"502 Bad Gateway" in body and headers["Content-Type"].startswith("text/html")
    assert raw_get(fixture_server, "/api/images/101/")[0] == 200
    assert raw_get(fixture_server, "/api/images/102/")[0] == 200  # not matched
    assert f.hits == 2
    fixture_server.add_fault(r"images/102", "status", code=503)
    assert [raw_get(fixture_server, "/api/images/102/")[0] for _ in range(3)] == [503] * 3
    fixture_server.clear_faults()
    assert raw_get(fixture_server, "/api/images/102/")[0] == 200


def test_fault_retry_after(fixture_server):
    fixture_server.add_fault("images/101", "retry_after", times=1, seconds=7)
    status, headers, _ = raw_get(fixture_server, "/api/images/101/")
    assert status == 429 and headers["Retry-After"] == "7"


def test_fault_truncate(fixture_server):
    fixture_server.add_fault("zstat1", "truncate", times=1)
    u = urlsplit(fixture_server.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/media/images/11/zstat1.nii.gz")
    r = conn.getresponse()
    assert int(r.getheader("Content-Length")) == len(fixture_server.tiny.served[101])
    with pytest.raises(http.client.IncompleteRead) as exc:
        r.read()
    assert len(exc.value.partial) == len(fixture_server.tiny.served[101]) // 2
    conn.close()


def test_fault_reset(fixture_server):
    fixture_server.add_fault("zstat1", "reset", times=1, fraction=0.25)
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        raw_get(fixture_server, "/media/images/11/zstat1.nii.gz")


def test_fault_stall(fixture_server):
    fixture_server.add_fault("images/101", "stall", times=1, seconds=1.0)
    with pytest.raises(socket.timeout):
        raw_get(fixture_server, "/api/images/101/", timeout=0.2)
    assert raw_get(fixture_server, "/api/images/101/")[0] == 200


def test_fault_html200(fixture_server):
    fixture_server.add_fault("images/101", "html200")
    status, headers, body = raw_get(fixture_server, "/api/images/101/")
    assert (
        status == 200
        and headers["Content-Type"].startswith("text/html")
        and body.startswith(b"<!DOCTYPE html>")
    )


def test_fault_redirects(fixture_server):
    fixture_server.add_fault("images/101", "redirect", location="{base}/api/images/102/")
    status, headers, _ = raw_get(fixture_server, "/api/images/101/")
    assert status == 301 and headers["Location"] == f"{fixture_server.base}/api/images/102/"
    fixture_server.add_fault("images/103", "redirect_loop")
    status, headers, _ = raw_get(fixture_server, "/api/images/103/")
    assert status == 301 and headers["Location"] == f"{fixture_server.base}/api/images/103/"


def test_fault_empty_page(fixture_server):
    fixture_server.add_fault(r"offset=10", "empty_page", times=1)
    _, _, page = get_json(fixture_server, "/api/collections/13/images/?limit=10&offset=10")
    assert page["results"] == [] and page["count"] == N_MANY and page["next"].endswith("offset=20")
    _, _, page = get_json(fixture_server, "/api/collections/13/images/?limit=10&offset=10")
    assert len(page["results"]) == 10


@pytest.mark.parametrize("mode", ["prepend", "replace"])
def test_fault_duplicate(fixture_server, mode):
    fixture_server.add_fault(r"offset=10", "duplicate", mode=mode)
    _, _, page = get_json(fixture_server, "/api/collections/13/images/?limit=10&offset=10")
    ids = [r["id"] for r in page["results"]]
    many = fixture_server.tiny.ids["many"]
    assert ids[0] == many[9]  # the previous page's last item
    assert ids[1:] == (many[10:20] if mode == "prepend" else many[10:19])


def test_fault_down(fixture_server):
    fixture_server.add_fault("images/101", "down", times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        raw_get(fixture_server, "/api/images/101/")
    fixture_server.add_fault("images/102", "down", mode="503")
    assert raw_get(fixture_server, "/api/images/102/")[0] == 503


def test_fault_not_nifti(fixture_server):
    fixture_server.add_fault("zstat1", "not_nifti")
    status, headers, body = raw_get(fixture_server, "/media/images/11/zstat1.nii.gz")
    assert status == 200 and int(headers["Content-Length"]) == len(body)
    assert gzip.decompress(body).startswith(b"this is not a NIfTI")
    assert md5(body) != md5(fixture_server.tiny.served[101])


def test_faults_thread_safe_counting(fixture_server):
    f = fixture_server.add_fault("images/101", "status", times=5, code=500)
    codes = []
    lock = threading.Lock()

    def worker():
        c = raw_get(fixture_server, "/api/images/101/")[0]
        with lock:
            codes.append(c)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 7 + [500] * 5 and f.hits == 5


def test_fault_miscount_and_max_limit(tiny_snapshot):
    """``miscount`` rewrites a listing's count only; ``max_limit`` caps the page size."""
    with FixtureServer(tiny_snapshot.root, max_limit=4) as srv:
        srv.add_fault(r"collections/13/images/", "miscount", times=1, count=3)
        status, _, body = raw_get(srv, "/api/collections/13/images/?limit=1000")
        page = json.loads(body)
        assert status == 200 and page["count"] == 3 and len(page["results"]) == 4
        assert page["next"].endswith("limit=4&offset=4")
        status, _, body = raw_get(srv, "/api/collections/13/images/?limit=1000&offset=4")
        assert json.loads(body)["count"] == 25  # times=1: normal service again
